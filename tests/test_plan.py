"""`lorakit plan`: the published figures, exactly; the adapter size of a real model, exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.plan import Shape, parse_count, plan, tenants


def gb(**kwargs):
    result = plan(**kwargs)
    return result.parts_gb, result.total_gb


def test_70b_full_fine_tune_12_and_16_byte_recipes():
    assert gb(shape=Shape(70e9), method="full")[1] == pytest.approx(840)
    assert gb(shape=Shape(70e9), method="full", master_copy=True)[1] == pytest.approx(1120)


def test_lora_frozen_fp16_base_floor():
    assert gb(shape=Shape(70e9), method="lora")[1] == pytest.approx(140)
    assert gb(shape=Shape(65e9), method="lora")[1] == pytest.approx(130)


def test_65b_full_and_qlora_figures():
    assert gb(shape=Shape(65e9), method="full")[1] == pytest.approx(780)
    parts, total = gb(shape=Shape(65e9), method="qlora")
    assert parts["weights (NF4 values)"] == pytest.approx(32.5)
    assert total == pytest.approx(33.5, abs=0.05)  # 32.5 + 1.03 of double-quantized constants


def test_fifty_tenants():
    result = tenants(50, base_gb=14, adapter_mb=128)
    assert result["merged_gb"] == 700 and result["shared_gb"] == 20.25
    assert round(result["saving_x"], 1) == 34.6


def test_adapter_size_of_smollm2_equals_the_wrapped_model_count():
    from lorakit.base_models import resolve_model_path

    shape = Shape.from_model_dir(resolve_model_path("smollm2-135m-instruct"))
    assert shape.lora_params(16) == 4_884_480  # what print_trainable_parameters reports (and PEFT)
    assert shape.params == 134_515_008


def test_cli_prints_the_figures_and_json():
    run = CliRunner().invoke(app, ["plan", "--params", "70B", "--method", "full", "--master-copy", "--json"])
    assert run.exit_code == 0, run.output
    assert json.loads(run.output)["total_gb"] == pytest.approx(1120)
    run = CliRunner().invoke(app, ["plan", "--params", "14B", "--method", "lora", "--tenants", "50",
                                   "--adapter-mb", "128", "--base-gb", "14"])
    assert run.exit_code == 0 and "700.00 GB as merged copies vs 20.25 GB" in run.output and "34.6x" in run.output


@pytest.mark.parametrize("text, value", [("70B", 70e9), ("135M", 135e6), ("7.5e9", 7.5e9), ("1.5T", 1.5e12)])
def test_parse_count(text, value):
    assert parse_count(text) == value


def test_bad_plan_input_is_a_clear_error():
    run = CliRunner().invoke(app, ["plan", "--params", "seventy"])
    assert run.exit_code == 2 and "70B, 135M" in run.output
    run = CliRunner().invoke(app, ["plan", "--params", "7B", "--method", "prefix"])
    assert run.exit_code == 2 and "--method must be one of" in run.output


# -- against measured peaks ---------------------------------------------------------------------
MEASURE = Path(__file__).resolve().parents[1] / "bench" / "measure_step_memory.py"


def measured(*args: str) -> dict:
    """One real training step configuration of SmolLM2-135M, alone in a subprocess (RSS is per process)."""
    done = subprocess.run([sys.executable, str(MEASURE), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("method, batch, seq, ckpt", [
    ("lora", 2, 128, False), ("qlora", 4, 128, False), ("qlora", 1, 512, False),  # none is the fit point (lora 4x128)
])
def test_plan_matches_measured_peak_memory_of_real_steps(method, batch, seq, ckpt):
    """How it is measured: bench/measure_step_memory.py runs 3 full steps (forward, loss, backward,
    AdamW) in its own process and reads the kernel's peak RSS (VmHWM), reset after loading so a
    loading spike does not count. The plan gets that process's own RSS after `import torch` as
    its runtime, fp32 sizes (the CPU trains in fp32), and the model's shape from its config."""
    from lorakit.base_models import resolve_model_path

    run = measured("--method", method, "--batch", str(batch), "--seq", str(seq), *(["--grad-ckpt"] if ckpt else []))
    shape = Shape.from_model_dir(resolve_model_path("smollm2-135m-instruct"))
    predicted = plan(shape, method, r=16, batch=batch, seq=seq, grad_ckpt=ckpt, weight_bytes=4,
                     runtime_gb=run["rss_after_import_mb"] * 2**20 / 1e9).total_gb
    actual = run["step_peak_mb"] * 2**20 / 1e9
    assert abs(predicted - actual) / actual < 0.20, f"planned {predicted:.2f} GB, measured {actual:.2f} GB"


@pytest.mark.parametrize("size", ["7B", "8B", "13B", "34B", "65B", "70B"])
def test_params_alone_assume_the_standard_shape_and_count_the_adapter(size):
    """The assumed shape is the real model's: its transformers config (on the meta device) has the
    stated size within 5%, and r·(in + out) summed over its linear layers is the adapter we plan."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.plan import standard_shape

    shape, note = standard_shape(parse_count(size))
    assert "assumed the" in note and f"{shape.layers} layers" in note
    config = LlamaConfig(num_hidden_layers=shape.layers, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_attention_heads=shape.hidden // 128, num_key_value_heads=shape.kv_dim // 128,
                         vocab_size=shape.vocab)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(parse_count(size), rel=0.05)
    adapter = sum(16 * (m.in_features + m.out_features) for name, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and name != "lm_head")
    assert shape.lora_params(16) == adapter


def test_cli_plan_70b_lora_counts_the_adapter_and_shows_both_full_recipes():
    run = CliRunner().invoke(app, ["plan", "--params", "70B", "--method", "lora", "--json"])
    result = json.loads(run.output)
    assert result["parts_gb"]["adapters (fp32)"] == pytest.approx(207_093_760 * 4 / 1e9)  # r=16, Llama-2-70B
    assert "assumed the Llama-2-70B shape" in result["notes"][0]
    run = CliRunner().invoke(app, ["plan", "--params", "70B", "--method", "full"])
    text = " ".join(run.output.split())
    assert "12-byte (no master copy): 840.00 GB ← this plan" in text and "16-byte (fp32 master copy): 1,120.00 GB" in text
    run = CliRunner().invoke(app, ["plan", "--params", "70B", "--method", "lora", "--layers", "8", "--hidden", "64"])
    assert "assumed" not in run.output  # a shape given is a shape used
