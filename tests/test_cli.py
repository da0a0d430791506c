"""The `lorakit` command: typer app, `python -m lorakit`, version."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

import lorakit
from lorakit.cli import app


def test_help_lists_demo():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and lorakit.__version__ in result.output


def test_python_dash_m_is_the_same_entry_point():
    result = subprocess.run([sys.executable, "-m", "lorakit", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and f"lorakit {lorakit.__version__}" in result.stdout


def test_inspect_shows_the_adapter_and_json_is_machine_readable(tmp_path):
    import json

    from conftest import tiny_llama

    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    model.save_pretrained(tmp_path)
    human = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert human.exit_code == 0 and "base fingerprint" in human.output and "verified" in human.output
    info = json.loads(CliRunner().invoke(app, ["inspect", str(tmp_path), "--json"]).output)
    assert info["ranks"] == {"4": 3} and info["parameters"] == sum(
        p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert info["target_modules"] == ["model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert info["fingerprint"] != "none" and info["made_by"].startswith("lorakit")
    assert set(info["tensors"]["model.embed_tokens.lora_embedding_A"]) == {"shape", "dtype", "mean_abs", "std", "max_abs"}


def test_inspect_reports_a_broken_adapter_as_an_error(tmp_path):
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "not a directory" in result.output
