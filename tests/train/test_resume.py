"""A run killed with SIGKILL in the middle of writing a checkpoint resumes cleanly and ends
with the same adapter as an uninterrupted run (same seed, dropout on: RNG state is restored)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from chat_model import job_yaml
from lorakit.cli import app
from lorakit.files.format import read_adapter
from lorakit.train.trainer import COMPLETE_MARK

runner = CliRunner()
SETTINGS = {"lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": "all-linear"},
            "train": {"max_steps": 6, "save_steps": 2, "eval_steps": 3}}

# Dies by SIGKILL inside the step-4 checkpoint: after the adapter is written, before the
# optimizer state and the completion mark.
KILLER = textwrap.dedent("""
    import os, signal, sys
    from lorakit.train.trainer import LoraTrainer
    from lorakit.cli import app

    original = LoraTrainer._save_optimizer_and_scheduler

    def dying(self, output_dir):
        if self.state.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, output_dir)

    LoraTrainer._save_optimizer_and_scheduler = dying
    app(sys.argv[1:])
""")


def test_resume_after_sigkill_mid_save_matches_an_uninterrupted_run(tmp_path, chat_model_dir):
    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"
    whole_dir.mkdir(), killed_dir.mkdir()
    whole = job_yaml(whole_dir, chat_model_dir, **SETTINGS)
    killed = job_yaml(killed_dir, chat_model_dir, **SETTINGS)
    assert runner.invoke(app, ["train", str(whole)]).exit_code == 0

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", KILLER, "train", str(killed)], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    run = killed_dir / "run"
    assert (run / "checkpoint-4" / "adapter_model.safetensors").is_file()  # half-written checkpoint
    assert not (run / "checkpoint-4" / COMPLETE_MARK).exists()

    result = runner.invoke(app, ["train", str(killed), "--resume"])
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["run"]["resumed_from"] == 2 and summary["run"]["steps"] == 6
    ours, reference = read_adapter(run / "adapter").tensors, read_adapter(whole_dir / "run" / "adapter").tensors
    assert ours.keys() == reference.keys()
    for key in ours:  # same data order, optimizer state and dropout masks: equal to float rounding
        torch.testing.assert_close(ours[key], reference[key], atol=1e-6, rtol=0)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]  # lines the killed run wrote after step 2 were dropped


def test_resume_refuses_a_changed_config_and_a_run_without_checkpoints(tmp_path, chat_model_dir):
    config = job_yaml(tmp_path, chat_model_dir, train={"max_steps": 2})
    result = runner.invoke(app, ["train", str(config), "--resume"])
    assert result.exit_code == 2 and "no complete checkpoint" in result.output
    assert runner.invoke(app, ["train", str(config)]).exit_code == 0
    result = runner.invoke(app, ["train", str(config), "--resume", "--set", "lora.r=8"])
    assert result.exit_code == 2 and "differs" in result.output and "lora" in result.output
    # more steps is the one change allowed
    result = runner.invoke(app, ["train", str(config), "--resume", "--set", "train.max_steps=3"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["run"]["steps"] == 3


# Dies by SIGKILL as step 4 starts: checkpoint-2 is the newest complete one.
KILL_AT_STEP_3 = textwrap.dedent("""
    import os, signal, sys
    from lorakit.train.trainer import LoraTrainer
    from lorakit.cli import app

    original = LoraTrainer.training_step

    def dying(self, *args, **kwargs):
        if self.state.global_step == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)

    LoraTrainer.training_step = dying
    app(sys.argv[1:])
""")
METHODS = {  # what PEFT's file alone cannot resume: an encoder's weights, AdaLoRA's masks and scores
    "p_tuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 16},
    "prefix_tuning": {"num_virtual_tokens": 4, "prefix_projection": True, "encoder_hidden_size": 16},
    "adalora": {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "deltaT": 1},
    "ia3": {},
}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_killed_at_step_3_resumes_to_the_uninterrupted_adapter(tmp_path, chat_model_dir, method):
    settings = {"method": method, method: METHODS[method],
                "train": {"max_steps": 6, "save_steps": 2, "eval_steps": 3, "learning_rate": 1e-2}}
    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"
    whole_dir.mkdir(), killed_dir.mkdir()
    whole, killed = job_yaml(whole_dir, chat_model_dir, **settings), job_yaml(killed_dir, chat_model_dir, **settings)
    assert runner.invoke(app, ["train", str(whole)]).exit_code == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", KILL_AT_STEP_3, "train", str(killed)], env=env, capture_output=True,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    result = runner.invoke(app, ["train", str(killed), "--resume"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    run = killed_dir / "run"
    assert json.loads((run / "summary.json").read_text())["run"]["resumed_from"] == 2
    ours, reference = read_adapter(run / "adapter"), read_adapter(whole_dir / "run" / "adapter")
    assert ours.tensors.keys() == reference.tensors.keys()
    for key in ours.tensors:
        torch.testing.assert_close(ours.tensors[key], reference.tensors[key], atol=1e-6, rtol=0, msg=key)
    if method == "adalora":
        assert ours.config.rank_pattern == reference.config.rank_pattern
