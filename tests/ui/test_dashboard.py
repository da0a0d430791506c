"""`lorakit ui` and `lorakit serve --ui` as real processes on 127.0.0.1, driven by headless Chromium
(Playwright, Debian's browser): what a user sees and clicks, checked against the files, the registry and
the server behind the pages. Last, the defects found as a new user (issue 30): a malformed run folder took
the runs page down, a run name became a link in a chart legend, a constant learning rate was drawn at 0,
base fingerprints were cut to the part every base of one architecture shares, a missing runs folder looked
like "no runs yet", and `lorakit ui` answered any Host header (DNS rebinding). (One module: the browser
fixture is session-wide, and a second module importing it would start a second Playwright.)"""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from dashboard_fixtures import (  # noqa: F401
    ADMIN,
    XSS_NAME,
    XSS_SAMPLE,
    browser,
    dashboard_files,
    page,
    screenshot,
)

from chat_model import QUESTION
from lorakit.http.process import ServerProcess
from lorakit.registry import Registry
from lorakit.registry.store import Registry

KEY = "ui-inference-secret"
TRACES = "id => document.getElementById(id).data.map(t => t.x.length)"


@pytest.fixture(scope="module")
def ui(dashboard_files):  # noqa: F811
    files = dashboard_files
    with ServerProcess("--runs", str(files["runs"]), "--registry", str(files["registry"]), "--admin-key", ADMIN,
                       "--data", str(files["data"]), command="ui") as process:
        yield process


def _loss_points(lines: list[str]) -> tuple[int, int]:
    records = [json.loads(line) for line in lines]
    return sum("loss" in r for r in records), sum("eval_loss" in r for r in records)


def test_runs_table_sorts_and_compare_overlays_two_runs(ui, page, tmp_path):  # noqa: F811
    page.goto(f"{ui.url}/")
    rows = page.locator("#runs-table tbody tr")
    assert sorted(rows.evaluate_all("rows => rows.map(r => r.dataset.run)")) == \
        sorted(["lr-5e-3", "sweep/lr-2e-2", "live", XSS_NAME])
    eval_losses = lambda: rows.evaluate_all("rows => rows.map(r => r.children[11].dataset.value)")  # noqa: E731
    page.click("th:has-text('eval loss')")
    shown = eval_losses()
    assert shown[-1] == ""  # the live run has logged no eval yet: blanks sort last either way
    assert [float(v) for v in shown[:-1]] == sorted(float(v) for v in shown[:-1]) and len(shown) == 4
    page.click("th:has-text('eval loss')")
    assert eval_losses() == [*sorted(shown[:-1], key=float, reverse=True), ""]
    screenshot(page, tmp_path, "runs")
    page.check("input.pick[value='lr-5e-3']")
    assert page.is_disabled("#compare-button")  # two to five runs
    page.check("input.pick[value='sweep/lr-2e-2']")
    page.click("#compare-button")
    page.wait_for_url("**/compare?**")
    page.wait_for_function("document.getElementById('compare-chart').data !== undefined")
    names = page.evaluate("document.getElementById('compare-chart').data.map(t => t.name)")
    assert names == ["lr-5e-3 train", "lr-5e-3 eval", "sweep/lr-2e-2 train", "sweep/lr-2e-2 eval"]
    assert page.evaluate(TRACES, "compare-chart") == [4, 2, 4, 2]
    diff = page.locator("#config-diff").inner_text()
    assert "train.learning_rate" in diff and "0.005" in diff and "0.02" in diff
    screenshot(page, tmp_path, "compare")
    assert page.errors == [] and page.refused == []


def test_run_page_draws_every_logged_point(ui, page, tmp_path, dashboard_files):  # noqa: F811
    page.goto(f"{ui.url}/runs/lr-5e-3")
    page.wait_for_function("document.getElementById('loss-chart').data !== undefined")
    lines = (dashboard_files["runs"] / "lr-5e-3" / "metrics.jsonl").read_text().splitlines()
    assert page.evaluate(TRACES, "loss-chart") == list(_loss_points(lines))
    assert page.evaluate(TRACES, "lr-chart") == [_loss_points(lines)[0]]
    summary = json.loads((dashboard_files["runs"] / "lr-5e-3" / "summary.json").read_text())
    assert f"{summary['comparison']['adapter']['loss']:.4f}" in page.locator("#before-after").inner_text()
    assert page.locator("#samples tbody tr").count() == len(summary["comparison"]["samples"])
    screenshot(page, tmp_path, "run")
    assert page.errors == [] and page.refused == []


def test_a_run_in_progress_gains_points_without_a_reload(ui, page, dashboard_files):  # noqa: F811
    path, lines = dashboard_files["live"] / "metrics.jsonl", dashboard_files["metrics_lines"]
    before = path.read_text()
    page.goto(f"{ui.url}/runs/live")
    page.wait_for_function("document.getElementById('loss-chart').data !== undefined")
    assert page.evaluate(TRACES, "loss-chart") == list(_loss_points(lines[:2]))
    page.evaluate("window.__sameDocument = true")
    try:
        path.write_text(before + "\n".join(lines[2:4]) + "\n")  # the job logs an eval and a step
        expected = list(_loss_points(lines[:4]))
        page.wait_for_function(f"JSON.stringify(({TRACES})('loss-chart')) === '{json.dumps(expected, separators=(',', ':'))}'",
                               timeout=10_000)
    finally:
        path.write_text(before)
    assert page.evaluate("window.__sameDocument") is True  # no reload happened
    assert page.inner_text("#run-step") == str(json.loads(lines[3])["step"])
    assert page.errors == [] and page.refused == []


def test_markup_in_a_run_name_or_sample_is_shown_as_text(ui, page):  # noqa: F811
    page.goto(f"{ui.url}/")
    assert XSS_NAME in page.locator("#runs-table").inner_text()
    page.click(f"a:has-text('{XSS_NAME}')")
    page.wait_for_function("document.getElementById('loss-chart').data !== undefined")
    assert XSS_NAME in page.locator("h1").inner_text()
    assert XSS_SAMPLE in page.locator("#samples").inner_text()
    assert page.evaluate("window.__xss") is None and page.locator("main img").count() == 0
    assert page.errors == [] and page.refused == []


def test_promote_and_rollback_through_the_page_need_the_admin_key_and_pass_the_gates(ui, page, tmp_path,
                                                                                       dashboard_files):  # noqa: F811
    registry = Registry.open(str(dashboard_files["registry"]), None)
    prod = lambda: registry.aliases("support")["prod"]  # noqa: E731
    assert prod() == 1
    page.goto(f"{ui.url}/adapters")
    assert "prod → v1" in page.locator("#adapters-table").inner_text()
    page.click("#adapters-table a:has-text('support')")
    page.wait_for_url("**/adapters/support")
    questions = []
    page.on("dialog", lambda dialog: (questions.append(dialog.message), dialog.accept()))
    result = page.locator("#action-result")

    def promote(version: str, key: str = "", gates: str = "", eval_file: str = "") -> str:
        page.select_option("#promote-form select[name=version]", version)
        page.fill("#admin-key", key)
        page.fill("#promote-form input[name=gates]", gates)
        page.fill("#promote-form input[name=eval]", eval_file)
        page.click("#promote-button")
        page.wait_for_function("!['', 'working…'].includes(document.getElementById('action-result').textContent)",
                               timeout=120_000)
        return result.inner_text()

    assert "refused" in promote("2") and "admin key" in result.inner_text() and prod() == 1
    assert "refused" in promote("2", key="wrong") and prod() == 1
    # the same gates as the CLI: measured by `lorakit eval` on the held-out file, recorded, and refused
    assert "fails its gate" in promote("2", key=ADMIN, gates="loss<0.001", eval_file="eval.jsonl") and prod() == 1
    assert "eval:eval.jsonl" in registry.show("support@2").metrics
    assert "not a file under --data" in promote("2", key=ADMIN, gates="loss<0.001", eval_file="../registry/registry.db")
    assert questions[0] == "Point support:prod at v2?" and "after its gates (loss<0.001)" in questions[2]
    assert "support:prod → v2 (was v1)" in promote("2", key=ADMIN) and prod() == 2
    page.wait_for_function("document.querySelector('#aliases').textContent.includes('prod → v2')")  # reloaded
    page.fill("#admin-key", ADMIN)
    page.click("#rollback-button")
    page.wait_for_function("document.getElementById('action-result').textContent.includes('→ v1')")
    assert prod() == 1
    page.wait_for_function("document.querySelector('#aliases').textContent.includes('prod → v1')")
    actions = page.locator("#audit-log tbody tr td:nth-child(3)").all_inner_texts()
    assert actions[:2] == ["rollback", "promote"]
    screenshot(page, tmp_path, "adapter")
    assert page.refused == [(401, "/api/registry/promote")] * 2 + [(400, "/api/registry/promote")] * 2
    assert page.errors == []


@pytest.fixture(scope="module")
def served(dashboard_files):  # noqa: F811
    files = dashboard_files
    with ServerProcess("--model", str(files["model"]), "--adapter-dir", str(files["adapters"]["v1"].parent),
                       "--api-key", KEY, "--admin-key", ADMIN, "--ui", "--ui-runs", str(files["runs"]),
                       "--max-model-len", "256", "--kv-cache-memory", "32") as process:
        yield process


def test_serve_ui_is_behind_the_servers_key_and_answers_only_its_own_host(served, page):  # noqa: F811
    for path in ("/ui/", "/ui/adapters", "/ui/runs/lr-5e-3"):  # pages: to the sign-in form
        reply = httpx.get(f"{served.url}{path}", follow_redirects=False)
        assert reply.status_code == 303 and reply.headers["location"].startswith("/ui/login")
    for path in ("/ui/api/server", "/ui/api/runs"):  # the server's roots and the runs: not without the key
        assert httpx.get(f"{served.url}{path}").status_code == 401
        assert httpx.get(f"{served.url}{path}", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.post(f"{served.url}/ui/api/server/chat", json={"adapter": "support-v1", "prompt": "hi"}).status_code == 401
    rebound = httpx.get(f"{served.url}/ui/api/runs", headers={"Host": "attacker.example",
                                                             "Authorization": f"Bearer {KEY}"})
    assert rebound.status_code == 400 and "Host" in rebound.json()["error"]["message"]  # DNS rebinding
    page.goto(f"{served.url}/ui/adapters")
    page.fill("#login-key", "wrong")
    page.click("#login-button")
    assert "Wrong key" in page.inner_text("#login-error")
    page.fill("#login-key", KEY)
    page.click("#login-button")
    page.wait_for_url(f"{served.url}/ui/adapters")  # back where it was going, with a session
    assert page.errors == []


def test_serve_ui_shows_the_live_server_and_the_playground_relays_both_answers(served, page, tmp_path):  # noqa: F811
    page.goto(f"{served.url}/ui/")
    page.fill("#login-key", KEY)
    page.click("#login-button")
    page.wait_for_url(f"{served.url}/ui/")
    page.click("#runs-table a:has-text('lr-5e-3')")
    page.wait_for_url(f"{served.url}/ui/runs/lr-5e-3")  # links stay under the mount
    page.goto(f"{served.url}/ui/server")
    page.wait_for_function("document.querySelectorAll('#models-table tbody tr').length === 3")
    assert page.inner_text("#server-health") == "ok"
    assert page.locator("#playground-adapter option").all_inner_texts() == ["support-v1", "support-v2"]
    page.select_option("#playground-adapter", "support-v2")
    page.fill("#playground textarea", QUESTION[0]["content"])
    page.fill("#playground input[name=max_tokens]", "6")
    page.click("#playground-send")  # the session was made from the server's own key: the relay needs no more
    page.wait_for_function("!['', '…'].includes(document.getElementById('answer-base').textContent)", timeout=60_000)
    shown = {side: page.inner_text(f"#answer-{side}") for side in ("adapter", "base")}
    headers = {"Authorization": f"Bearer {KEY}"}
    base_name = httpx.get(f"{served.url}/v1/models", headers=headers).json()["data"][0]["id"]

    def direct(model: str) -> str:
        body = {"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": 6}
        return httpx.post(f"{served.url}/v1/chat/completions", json=body, headers=headers, timeout=60).json()[
            "choices"][0]["message"]["content"]

    assert shown == {"adapter": direct("support-v2"), "base": direct(base_name)}
    assert shown["adapter"] != shown["base"]  # the adapter, not the base, answered on the left
    # the next scrapes see those requests: a rate above zero and a time to first token
    page.wait_for_function("document.getElementById('rps-chart').data[0].y.some(v => v > 0)", timeout=15_000)
    page.wait_for_function("document.getElementById('latency-chart').data[0].y.some(v => v > 0)", timeout=15_000)
    assert int(page.inner_text("#g-adapters")) >= 1
    screenshot(page, tmp_path, "server")
    snapshot = httpx.get(f"{served.url}/ui/api/server", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert sum(snapshot["metrics"]["requests"].values()) >= 4
    assert page.errors == [] and page.refused == []


# -- defects found as a new user (issue 30): each test failed before the fix -----------------------------
LINK_NAME = "<a href=x>click<br>me"  # no '/': a run id is a folder name
CONSTANT_LR = 2e-4


@pytest.fixture(scope="module")
def odd_runs(dashboard_files, tmp_path_factory):  # noqa: F811
    """A runs root with a good run, a run named like a link, a constant-LR run, and two malformed folders."""
    root = tmp_path_factory.mktemp("odd") / "runs"
    source = dashboard_files["runs"] / "lr-5e-3"
    shutil.copytree(source, root / "good", ignore=shutil.ignore_patterns("checkpoint-*", "adapter*"))
    shutil.copytree(source, root / LINK_NAME, ignore=shutil.ignore_patterns("checkpoint-*", "adapter*"))
    constant = root / "constant"
    constant.mkdir()
    shutil.copy(source / "config.yaml", constant / "config.yaml")
    (constant / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 3.0 - 0.1 * s, "learning_rate": CONSTANT_LR}) + "\n" for s in range(1, 6)))
    listed = root / "summary-is-a-list"
    listed.mkdir()
    shutil.copy(source / "config.yaml", listed / "config.yaml")
    (listed / "summary.json").write_text("[1, 2, 3]")
    odd_lines = root / "odd-metrics"
    odd_lines.mkdir()
    shutil.copy(source / "config.yaml", odd_lines / "config.yaml")
    (odd_lines / "metrics.jsonl").write_text('[1, 2]\n"text"\n{"step": 1, "loss": 2.5}\n')
    return root


@pytest.fixture(scope="module")
def odd_ui(odd_runs, dashboard_files):  # noqa: F811
    with ServerProcess("--runs", str(odd_runs), "--registry", str(dashboard_files["registry"]), command="ui") as process:
        yield process


def test_one_malformed_run_folder_never_takes_the_runs_page_down(odd_ui):
    runs = httpx.get(f"{odd_ui.url}/api/runs")
    assert runs.status_code == 200
    ids = {row["id"] for row in runs.json()}
    assert {"good", "constant", "odd-metrics", LINK_NAME} <= ids and "summary-is-a-list" not in ids
    page = httpx.get(f"{odd_ui.url}/")
    assert page.status_code == 200 and "summary-is-a-list" in page.text and "not a run summary" in page.text
    assert httpx.get(f"{odd_ui.url}/api/runs/odd-metrics/metrics").json()["records"] == [{"step": 1, "loss": 2.5}]


def test_a_run_name_is_text_in_a_chart_legend_and_a_constant_learning_rate_is_drawn_where_it_is(odd_ui, page):  # noqa: F811
    page.goto(f"{odd_ui.url}/compare?run=good&run={LINK_NAME}")
    page.wait_for_function("document.getElementById('compare-chart').data !== undefined")
    assert page.locator("#compare-chart .legend a").count() == 0  # no link drawn from a name
    assert LINK_NAME in page.evaluate("document.querySelector('#compare-chart .legend').textContent")
    page.goto(f"{odd_ui.url}/runs/constant")
    page.wait_for_function("document.getElementById('lr-chart')._fullLayout !== undefined")
    low, high = page.evaluate("document.getElementById('lr-chart')._fullLayout.yaxis.range")
    assert low <= CONSTANT_LR <= high and high < 10 * CONSTANT_LR  # not Plotly's ±1 around a line that reads 0
    assert page.errors == []


def test_fingerprints_are_shown_whole_so_two_bases_of_one_architecture_differ(dashboard_files, tmp_path):  # noqa: F811
    from transformers import LlamaForCausalLM

    from chat_model import build_chat_model, save_adapter

    other = LlamaForCausalLM.from_pretrained(build_chat_model(tmp_path / "other-base", seed=11)).eval()
    registry = Registry.open(str(tmp_path / "registry"))
    one = registry.push("svc", dashboard_files["adapters"]["v1"])
    two = registry.push("svc", save_adapter(other, tmp_path / "other-adapter", 3))
    assert one.fingerprint != two.fingerprint and one.fingerprint[:10] == two.fingerprint[:10]  # same architecture
    with ServerProcess("--runs", str(tmp_path), "--registry", str(tmp_path / "registry"), command="ui") as ui:
        text = httpx.get(f"{ui.url}/adapters/svc").text
    assert one.fingerprint in text and two.fingerprint in text


def test_a_missing_runs_folder_says_so_and_a_foreign_host_is_refused(tmp_path):
    with ServerProcess("--runs", str(tmp_path / "nowhere"), command="ui") as ui:
        page = httpx.get(f"{ui.url}/")
        assert "does not exist" in page.text and "No runs yet" not in page.text
        rebound = httpx.get(f"{ui.url}/api/runs", headers={"Host": "attacker.example"})
        assert rebound.status_code == 400  # a rebound DNS name reaching the loopback dashboard
        assert httpx.get(f"{ui.url}/api/runs", headers={"Host": "localhost"}).status_code == 200
