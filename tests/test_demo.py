"""`make demo` runs `lorakit demo`: the training job on the real model and the bundled facts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from lorakit.cli import app


@pytest.mark.slow
def test_demo_runs_the_job_end_to_end_learns_on_held_out_prompts_and_prints_no_noise(tmp_path):
    """`make demo` as a user runs it (the packaged job, ~1 minute): a process whose whole output
    (stdout and stderr, not a terminal) is captured."""
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "lorakit", "demo", "--output-dir", str(out)],
                            capture_output=True, text=True, timeout=1800)  # ~1 min alone; CI machines are shared
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Before / after" in output and str(out / "report.md") in output.replace("\n", "")
    # quiet: no bitsandbytes kernel-loader line, no raw Trainer dicts, no warning our own arguments cause
    assert "kernels-community" not in output and "gemm_4bit_forward" not in output
    assert not [line for line in output.splitlines() if line.lstrip().startswith("{'")], output
    assert "FutureWarning" not in output and "is deprecated" not in output and "Loading weights" not in output
    assert "step 10/30  loss" in output  # plain progress lines when the output is not a terminal
    comparison = json.loads((out / "summary.json").read_text())["comparison"]
    groups = {g["group"]: g for g in comparison["groups"]}
    paraphrased, untrained = groups["trained facts, asked another way"], groups["facts not trained (should not change)"]
    # held out: the trained facts asked in words the adapter never saw, which the base cannot know...
    assert paraphrased["base_contains_match"] == 0 and paraphrased["adapter_contains_match"] >= 0.5
    # ...and facts not trained at all, which the adapter leaves as the base knows them
    assert untrained["adapter_contains_match"] >= untrained["base_contains_match"] - 0.15  # 1 of 7 may change
    assert comparison["adapter"]["loss"] < comparison["base"]["loss"]


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
