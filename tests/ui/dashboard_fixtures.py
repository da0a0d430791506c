"""Dashboard fixtures (imported by the ui tests; not a conftest.py, which would shadow tests/conftest.py):
real `lorakit train` runs on the tiny chat model, an unfinished run, a run whose name and sample hold
markup, a registry with two versions, and a headless Debian Chromium driven by Playwright.

Screenshots go to the test's temp folder; with LORAKIT_UI_SCREENSHOTS=DIR they are copied there too
(that is how docs/ui-*.png were made: `LORAKIT_UI_SCREENSHOTS=docs pytest tests/ui`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from typer.testing import CliRunner

from chat_model import FACTS, build_chat_model, job_yaml, save_adapter, write_jsonl

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As the machine notes say: without the background-networking flags Chromium keeps dialing Google's hosts.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
XSS_NAME = "<img src=x onerror=window.__xss=1>"
XSS_SAMPLE = "<script>window.__xss=2</script>"
ADMIN = "ui-admin-secret"


def train_run(tmp: Path, model: Path, out: Path, **train) -> Path:
    from lorakit.cli import app

    tmp.mkdir(parents=True, exist_ok=True)
    config = job_yaml(tmp, model, "messages", output_dir=str(out), train=train)
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


@pytest.fixture(scope="session")
def dashboard_files(tmp_path_factory):
    """{"model", "runs", "registry", "data", "adapters"}: two finished runs (learning rates 5e-3 and 2e-2),
    `live` (config and the first metrics lines of a run, no summary), the XSS run, and a registry
    `support` with v1 (prod) and v2."""
    from transformers import LlamaForCausalLM

    from lorakit.registry.store import Registry

    tmp = tmp_path_factory.mktemp("dashboard")
    model = build_chat_model(tmp / "base")
    runs = tmp / "runs"
    slow = train_run(tmp / "job-slow", model, runs / "lr-5e-3", learning_rate=5e-3)
    train_run(tmp / "job-fast", model, runs / "sweep" / "lr-2e-2", learning_rate=2e-2)
    live = runs / "live"
    live.mkdir()
    shutil.copy(slow / "config.yaml", live / "config.yaml")
    lines = (slow / "metrics.jsonl").read_text().splitlines()
    (live / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    xss = runs / XSS_NAME
    shutil.copytree(slow, xss, ignore=shutil.ignore_patterns("checkpoint-*", "adapter*"))
    summary = json.loads((xss / "summary.json").read_text())
    summary["comparison"]["samples"][0]["prompt"] = XSS_SAMPLE
    (xss / "summary.json").write_text(json.dumps(summary))

    base = LlamaForCausalLM.from_pretrained(model).eval()
    adapters = {f"v{i}": save_adapter(base, tmp / "adapters" / f"support-v{i}", seed=60 + i) for i in (1, 2)}
    registry = tmp / "registry"
    store = Registry.open(str(registry), None)
    store.push("support", adapters["v1"], alias="prod")
    store.push("support", adapters["v2"])
    data = tmp / "data"
    data.mkdir()
    write_jsonl(data / "eval.jsonl", [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                                      for q, a in FACTS])
    return {"model": model, "runs": runs, "registry": registry, "data": data, "adapters": adapters, "live": live,
            "metrics_lines": lines}


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        reason = "Chromium is not installed (Debian: apt-get install chromium; .ci/run does this)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the dashboard's browser tests, but {reason}.")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh page that records script errors and uncaught exceptions (`page.errors`) and, apart from them,
    every HTTP refusal it got (`page.refused`: (status, path)), which Chromium also logs to the console."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    tab = context.new_page()
    tab.errors, tab.refused = [], []

    def console(message) -> None:
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            tab.errors.append(message.text)

    tab.on("console", console)
    tab.on("response", lambda reply: tab.refused.append((reply.status, urlsplit(reply.url).path))
           if reply.status >= 400 else None)
    tab.on("pageerror", lambda error: tab.errors.append(str(error)))
    yield tab
    context.close()


def screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"ui-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    target = os.environ.get("LORAKIT_UI_SCREENSHOTS")
    if target:
        shutil.copy(path, Path(target) / path.name)
    return path
