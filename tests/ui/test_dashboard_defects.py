"""Dashboard defects (issue 30), each pinned by a test that failed before the fix: a malformed run folder
took the runs page down, a run name became a link in a chart legend, a constant learning rate was drawn
at 0, base fingerprints were cut to the part that is equal for every base of one architecture, a missing
runs folder looked like "no runs yet", and `lorakit ui` answered any Host header (DNS rebinding)."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from dashboard_fixtures import browser, dashboard_files, page  # noqa: F401

from lorakit.registry import Registry
from lorakit.serve.process import ServerProcess

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
