"""`make demo` runs `lorakit demo`: the training job on the real model and the bundled facts."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lorakit.cli import app


@pytest.mark.slow
def test_demo_runs_the_job_end_to_end_and_the_adapter_learns(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--output-dir", str(out), "--set", "train.max_steps=14",
                                      "--set", "train.save_steps=7", "--set", "train.eval_steps=7"])
    assert result.exit_code == 0, result.output
    assert "Before / after" in result.output and str(out / "report.md") in result.output.replace("\n", "")
    comparison = json.loads((out / "summary.json").read_text())["comparison"]
    assert comparison["base"]["contains_match"] == 0  # the facts are made up: the base model cannot know them
    assert comparison["adapter"]["loss"] < 0.5 * comparison["base"]["loss"]
    assert comparison["adapter"]["contains_match"] >= 0.5


def test_demo_replaces_only_its_own_runs(tmp_path, chat_model_dir):
    out = tmp_path / "demo"
    quick = ["--model", str(chat_model_dir), "--output-dir", str(out), "--set", "train.max_steps=2",
             "--set", "train.save_steps=2", "--set", "eval.max_examples=2"]
    for _ in range(2):  # the second demo replaces the first
        result = CliRunner().invoke(app, ["demo", *quick])
        assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["run"]["steps"] == 2

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own run\n")
    result = CliRunner().invoke(app, ["demo", *quick[:2], "--output-dir", str(mine)])
    assert result.exit_code == 2 and "not a lorakit demo run" in result.output
    assert (mine / "config.yaml").read_text() == "my own run\n" and len(list(mine.iterdir())) == 1
