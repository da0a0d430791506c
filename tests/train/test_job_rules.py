"""The job's rules that keep results right and work safe: partial `lora:` sections, one rule
for relative paths, PiSSA/OLoRA runs compared against the true base and saved for it,
bf16/fp16 settings, and the resume/overwrite/interrupt messages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import lorakit
from chat_model import job_yaml, records, write_jsonl
from lorakit.base_models import load_base, load_tokenizer
from lorakit.cli import app
from lorakit.errors import ConfigError
from lorakit.files.format import read_adapter
from lorakit.train.config import load_job_config
from lorakit.train.data import load_dataset
from lorakit.train.evaluate import score
from lorakit.train.trainer import COMPLETE_MARK

runner = CliRunner()


def run(*args) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def edit(path: Path, change) -> Path:
    config = yaml.safe_load(path.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config))
    return path


# -- lora: a partial section overrides the defaults key by key --------------------------------------
def test_a_partial_lora_section_keeps_the_other_defaults(tmp_path, chat_model_dir):
    config = edit(job_yaml(tmp_path, chat_model_dir), lambda c: c.update(lora={"r": 8}))
    lora = load_job_config(config).lora_config()
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.target_modules) == (8, 32, 0.05, "all-linear")
    no_section = edit(job_yaml(tmp_path, chat_model_dir), lambda c: c.pop("lora"))
    lora = load_job_config(no_section, ["lora.r=8"]).lora_config()
    assert (lora.r, lora.lora_alpha, lora.target_modules) == (8, 32, "all-linear")


def test_a_partial_lora_section_trains_and_reports_the_resolved_config(tmp_path, chat_model_dir):
    config = edit(job_yaml(tmp_path, chat_model_dir, train={"max_steps": 2}), lambda c: c.update(lora={"use_dora": True}))
    code, output = run("train", config)
    assert code == 0, output
    report = (tmp_path / "run" / "report.md").read_text()
    assert "LoRA r=16, alpha=32, dropout 0.05, targets all-linear, init True, DoRA" in report
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 16 and saved["use_dora"] and saved["target_modules"] == "all-linear"


# -- paths: relative to the YAML's folder; --set relative to the working directory -----------------
def test_relative_paths_resolve_against_the_config_folder_from_any_directory(tmp_path, chat_model_dir, monkeypatch):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir(), elsewhere.mkdir()
    write_jsonl(project / "train.jsonl", records("prompt_completion"))
    write_jsonl(elsewhere / "train.jsonl", [{"text": "a stray file that must not win"}])
    config = edit(job_yaml(project, chat_model_dir), lambda c: c.update(
        data={**c["data"], "train": "train.jsonl", "eval": None}, output_dir="runs/x"))
    monkeypatch.chdir(elsewhere)
    job = load_job_config(config)
    assert job.data.train == str(project / "train.jsonl") and job.output_dir == str(project / "runs" / "x")
    job = load_job_config(config, ["output_dir=out"])  # a command-line path is relative to where you are
    assert job.output_dir == str(elsewhere / "out")
    code, output = run("train", config, "--set", "train.max_steps=1")
    assert code == 0, output
    report = (project / "runs" / "x" / "report.md").read_text()
    assert f"train `{project / 'train.jsonl'}`" in report and f"`{project}`" in report
    assert json.loads((project / "runs" / "x" / "summary.json").read_text())["data"]["format"] == "prompt_completion"


# -- mixed precision settings ----------------------------------------------------------------------
def test_bf16_and_fp16_settings(tmp_path, chat_model_dir):
    config = job_yaml(tmp_path, chat_model_dir, train={"max_steps": 2})
    with pytest.raises(ConfigError, match="train.fp16 needs a CUDA GPU"):
        load_job_config(config, ["train.fp16=true"])
    with pytest.raises(ConfigError, match="both true"):
        load_job_config(config, ["train.fp16=true", "train.bf16=true"])
    code, output = run("train", config, "--set", "train.bf16=true")
    assert code == 0, output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["precision"] == "bf16 autocast" and summary["run"]["final_train_loss"] is not None


# -- PiSSA / OLoRA: the true base, and an adapter for it ---------------------------------------------
@pytest.mark.parametrize("init", ["pissa_niter_2", "olora"])
def test_weight_init_job_compares_with_the_true_base_and_saves_a_converted_adapter(tmp_path, chat_model_dir, init):
    config = job_yaml(tmp_path, chat_model_dir, lora={"init_lora_weights": init}, train={"max_steps": 3})
    code, output = run("train", config)
    assert code == 0, output
    out = tmp_path / "run"
    summary = json.loads((out / "summary.json").read_text())
    tokenizer = load_tokenizer(str(chat_model_dir))
    examples = load_dataset(tmp_path / "prompt_completion.jsonl", tokenizer, max_seq_len=64).examples
    true_base = score(load_base(str(chat_model_dir)).eval(), tokenizer, examples, 8)
    assert summary["comparison"]["base"]["loss"] == pytest.approx(true_base["loss"], abs=1e-5)
    assert (out / "adapter_init" / "adapter_model.safetensors").is_file()
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 8  # PEFT's rank-2r conversion
    # the saved adapter loads on the untouched base, identically every time, as the trained model
    loaded = [lorakit.PeftModel.from_pretrained(load_base(str(chat_model_dir)), out / "adapter").eval() for _ in range(2)]
    ids = torch.tensor([examples[0].input_ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded[0](input_ids=ids).logits, loaded[1](input_ids=ids).logits, atol=0, rtol=0)
    reloaded = score(loaded[0], tokenizer, examples, 8)
    assert reloaded["loss"] == pytest.approx(summary["comparison"]["adapter"]["loss"], abs=1e-4)


def test_dora_with_randomized_pissa_is_refused_with_the_alternative(tmp_path, chat_model_dir):
    config = job_yaml(tmp_path, chat_model_dir, lora={"init_lora_weights": "pissa_niter_2", "use_dora": True})
    with pytest.raises(ConfigError, match="Use init_lora_weights: pissa"):
        load_job_config(config)


# -- resume, overwrite, interrupt --------------------------------------------------------------------
def test_resume_and_overwrite_together_are_refused(tmp_path, chat_model_dir):
    code, output = run("train", job_yaml(tmp_path, chat_model_dir), "--resume", "--overwrite")
    assert code == 2 and "pass one of them" in output


def test_a_run_stopped_before_its_first_checkpoint_points_to_overwrite(tmp_path, chat_model_dir):
    config = job_yaml(tmp_path, chat_model_dir)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(load_job_config(config).to_yaml())
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    code, output = run("train", config, "--resume")
    assert code == 2 and "no complete checkpoint" in output and "--overwrite" in output
    assert "without --resume" not in output
    code, output = run("train", config)
    assert code == 2 and "no checkpoint to resume from; pass --overwrite" in output and "pass --resume" not in output
    code, output = run("train", config, "--overwrite", "--set", "train.max_steps=1")
    assert code == 0, output


def test_resume_rules_after_a_finished_run(tmp_path, chat_model_dir):
    config = job_yaml(tmp_path, chat_model_dir)  # 4 steps, linear decay to 0, checkpoints at 2 and 4
    assert run("train", config)[0] == 0
    out = tmp_path / "run"
    code, output = run("train", config, "--resume")
    assert code == 2 and "is finished (4 steps;" in output and "train.max_steps=8 --resume" in output
    code, output = run("train", config, "--resume", "--set", "train.max_steps=2")
    assert code == 2 and "shortening the run is not a resume" in output
    code, output = run("train", config, "--resume", "--set", "train.learning_rate=0.001", "--set", "lora.r=8")
    assert code == 2 and "train.learning_rate: 0.005 → 0.001" in output and "lora.r: 4 → 8" in output
    assert len(json.loads((out / "summary.json").read_text())["comparison"]) > 0  # nothing was touched
    lines_before = (out / "metrics.jsonl").read_text().count("\n")

    before = read_adapter(out / "checkpoint-4").tensors
    code, output = run("train", config, "--resume", "--set", "train.max_steps=5")
    assert code == 0, output
    assert "train.max_steps grew from 4 to 5 under the 'linear' schedule" in " ".join(output.split())
    after = read_adapter(out / "adapter").tensors
    # step 5 ran at the recomputed rate (5e-3 · 1/5), not at the old schedule's final 0
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (out / "metrics.jsonl").read_text().count("\n") > lines_before


INTERRUPT = """
import sys
import signal
signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job starts with SIGINT ignored
from lorakit.cli import app
app(sys.argv[1:])
"""


def interrupt_when(config: Path, ready) -> subprocess.CompletedProcess:
    """Run `lorakit train` in a subprocess, send SIGINT (Ctrl-C) once `ready()`, collect its output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "COLUMNS": "300"}
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPT, "train", str(config)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=180)  # a loaded CI machine finishes the step and the save first
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_ctrl_c_says_where_it_stopped_and_the_exact_resume_command(tmp_path, chat_model_dir):
    endless = {"max_steps": 100000, "save_steps": 2, "eval_steps": 100000, "logging_steps": 1}
    config = job_yaml(tmp_path, chat_model_dir, train=endless)
    out = tmp_path / "run"
    done = interrupt_when(config, lambda: (out / "checkpoint-2" / COMPLETE_MARK).is_file())
    assert done.returncode == 130, done.stderr[-2000:]
    message = " ".join(done.stderr.split())
    assert "Interrupted at step" in message and f"{out / 'checkpoint-'}" in message
    assert f"To continue: lorakit train {config} --resume" in message and "Traceback" not in done.stderr

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    config = job_yaml(fresh, chat_model_dir, train={**endless, "save_steps": 100000})
    metrics = fresh / "run" / "metrics.jsonl"
    done = interrupt_when(config, lambda: metrics.is_file() and metrics.stat().st_size > 0)
    message = " ".join(done.stderr.split())
    assert done.returncode == 130 and "no checkpoint was written yet" in message
    assert f"To continue: lorakit train {config} --overwrite" in message
