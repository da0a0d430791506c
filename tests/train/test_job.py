"""`lorakit train` / `lorakit eval` end to end on a tiny chat model, through typer's runner."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from chat_model import job_yaml
from lorakit.cli import app
from lorakit.files.format import read_adapter
from lorakit.train.trainer import COMPLETE_MARK

runner = CliRunner()


def train(*args: str):
    result = runner.invoke(app, ["train", *map(str, args)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.mark.parametrize("fmt", ["messages", "prompt_completion", "text", "alpaca", "sharegpt"])
def test_train_end_to_end_for_each_format(tmp_path, chat_model_dir, fmt):
    config = job_yaml(tmp_path, chat_model_dir, fmt)
    result = train(config)
    run = tmp_path / "run"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.yaml",
                 "metrics.jsonl", "loss.png", "report.md", "summary.json"):
        assert (run / name).is_file(), name
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # checkpoints at steps 2 and 4, both complete, adapter-only (no full model state dict)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert all((run / f"checkpoint-{s}" / COMPLETE_MARK).is_file() for s in (2, 4))
    assert not list(run.glob("checkpoint-*/model.safetensors"))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [2, 4]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["format"] == fmt
    comparison = summary["comparison"]
    # the adapter learned something on its own training data: eval loss fell
    assert comparison["adapter"]["loss"] < comparison["base"]["loss"]
    has_answers = fmt != "text"
    assert (comparison["adapter"]["exact_match"] is not None) == has_answers
    report = (run / "report.md").read_text()
    assert "## Before / after" in report and "| exact match |" in report
    assert "Before / after" in result.output and "report.md" in result.output
    # the saved adapter is exactly the model's final adapter and equals the last checkpoint's
    final = read_adapter(run / "adapter").tensors
    last = read_adapter(run / "checkpoint-4").tensors
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)


def test_eval_command_prints_json(tmp_path, chat_model_dir):
    config = job_yaml(tmp_path, chat_model_dir, "messages")
    train(config)
    data = tmp_path / "messages.jsonl"
    result = runner.invoke(app, ["eval", "--model", str(chat_model_dir), "--adapter", str(tmp_path / "run" / "adapter"),
                                 "--data", str(data), "--json", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) >= {"base", "adapter"}
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())["comparison"]
    # the standalone eval reproduces the job's own comparison (same examples, same greedy decoding)
    for side in ("base", "adapter"):
        assert out[side]["loss"] == pytest.approx(saved[side]["loss"], abs=1e-5)
        assert out[side]["exact_match"] == saved[side]["exact_match"]


def test_a_second_run_into_the_same_dir_is_refused_then_overwritten(tmp_path, chat_model_dir):
    config = job_yaml(tmp_path, chat_model_dir, "prompt_completion", train={"max_steps": 2})
    train(config)
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 2
    assert "previous run" in result.output and "--resume" in result.output
    train(config, "--overwrite", "--set", "train.max_steps=1")
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1"]


def test_packing_trains_and_reports_rows(tmp_path, chat_model_dir):
    config = job_yaml(tmp_path, chat_model_dir, "prompt_completion", data={"packing": True})
    train(config)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 1 <= summary["data"]["packed_rows"] < summary["data"]["train"]["examples"]
    assert summary["comparison"]["adapter"]["loss"] < summary["comparison"]["base"]["loss"]


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_quantized_base_trains_through_the_job(tmp_path, wide_chat_model_dir, quantize):
    config = job_yaml(tmp_path, wide_chat_model_dir, "prompt_completion", quantize=quantize)
    train(config)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["quantize"] == quantize
    assert summary["comparison"]["adapter"]["loss"] < summary["comparison"]["base"]["loss"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_torch_compile_switch_reports_the_first_step_apart(tmp_path, chat_model_dir):
    config = job_yaml(tmp_path, chat_model_dir, "prompt_completion", train={"torch_compile": True, "max_steps": 3})
    result = train(config)
    assert "torch.compile: 2 blocks" in result.output
    run = json.loads((tmp_path / "run" / "summary.json").read_text())["run"]
    # (compiled code is cached per process, so the first step is only slower in a fresh one)
    assert run["torch_compile"] and run["first_step_seconds"] > 0 and run["median_step_seconds"] > 0
    assert "(includes torch.compile)" in (tmp_path / "run" / "report.md").read_text()


def test_yaml_takes_dora_init_rslora_and_loraplus(tmp_path, chat_model_dir):
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear", "use_dora": True,
            "init_lora_weights": "pissa", "use_rslora": True}
    config = job_yaml(tmp_path, chat_model_dir, "prompt_completion", lora=lora,
                      train={"loraplus_lr_ratio": 16, "max_steps": 3})
    train(config)
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] and saved["use_rslora"] and saved["init_lora_weights"] == "pissa"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["comparison"]["adapter"]["loss"] < summary["comparison"]["base"]["loss"]
