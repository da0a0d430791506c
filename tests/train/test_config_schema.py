"""The config schema, written once: JSON Schema export, --print-config, error messages that name
the key, the value and the allowed range, and the README's keys all known to it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from chat_model import job_yaml
from lorakit.cli import app
from lorakit.errors import ConfigError
from lorakit.train.config import documented_keys, flatten, json_schema, load_job_config

runner = CliRunner()
README = Path(__file__).parents[2] / "README.md"


def schema_keys(schema: dict, prefix: str = "") -> set[str]:
    keys = set()
    definitions = schema.get("$defs", {})
    for name, prop in schema["properties"].items():
        ref = prop.get("$ref") or next((p.get("$ref") for p in prop.get("anyOf", []) if "$ref" in p), None)
        keys.add(prefix + name)
        if ref:
            keys |= schema_keys({**definitions[ref.split("/")[-1]], "$defs": definitions}, f"{prefix}{name}.")
        elif "properties" in prop:
            keys |= schema_keys(prop, f"{prefix}{name}.")
    return keys


def test_every_documented_key_is_in_the_exported_schema():
    code = runner.invoke(app, ["schema"])
    assert code.exit_code == 0, code.output
    schema = json.loads(code.output)
    assert schema == json.loads(json.dumps(json_schema()))
    keys = schema_keys(schema)
    assert {key for key, *_ in documented_keys()} <= keys
    # lora: spelled out from LoraConfig's fields, with the job's defaults
    assert {"lora.r", "lora.use_dora", "lora.init_lora_weights", "lora.target_modules"} <= keys
    assert schema["properties"]["lora"]["properties"]["r"]["default"] == 16
    assert schema["properties"]["train"]["$ref"].endswith("TrainConfig")
    # every key the README's job example shows
    block = re.search(r"```yaml\n(model:.*?)```", README.read_text(), re.S).group(1)
    readme_keys = set(flatten(yaml.safe_load(block)))
    assert readme_keys and readme_keys <= keys, readme_keys - keys


@pytest.mark.parametrize("override, expected", [
    ("data.eval_fraction=1.5", "data.eval_fraction must be >= 0 and < 1, got 1.5."),
    ("train.warmup_ratio=-0.1", "train.warmup_ratio must be >= 0 and < 1, got -0.1."),
    ("eval.samples=-1", "eval.samples must be >= 0, got -1."),
    ("train.batch_size=true", "train.batch_size must be int, got True."),
    ("train.lr_scheduler=cosin", "train.lr_scheduler must be one of linear, cosine, constant, constant_with_warmup, "
                                 "cosine_with_restarts, polynomial; got 'cosin'. Did you mean 'cosine'?"),
    ("train=5", "train must be a mapping of keys (max_steps, epochs,"),
    ("train.epochs=2", "train.max_steps (4) and train.epochs (2.0) are both set; give one"),
    ("data.format=sharegpt4", "data.format must be one of auto, messages, prompt_completion, text, alpaca, sharegpt"),
])
def test_an_invalid_value_names_the_key_the_value_and_what_is_allowed(tmp_path, chat_model_dir, override, expected):
    with pytest.raises(ConfigError) as info:
        load_job_config(job_yaml(tmp_path, chat_model_dir), [override])
    assert expected in str(info.value)


def test_print_config_shows_the_resolved_job_and_trains_nothing(tmp_path, chat_model_dir):
    config = job_yaml(tmp_path, chat_model_dir, lora={"r": 2})
    result = runner.invoke(app, ["train", str(config), "--print-config", "--set", "train.max_steps=9"])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    assert printed["train"]["max_steps"] == 9 and printed["lora"]["r"] == 2
    assert printed["eval"]["max_examples"] == 64  # a default, resolved
    assert printed["data"]["train"] == str(tmp_path / "prompt_completion.jsonl")
    assert not (tmp_path / "run").exists()
    reread = tmp_path / "printed.yaml"
    reread.write_text(result.output)
    assert load_job_config(reread).to_dict() == load_job_config(config, ["train.max_steps=9"]).to_dict()


def test_help_and_eval_defaults_come_from_the_schema():
    from lorakit.train.config import EvalConfig

    text = " ".join(runner.invoke(app, ["train", "--help"]).output.split())
    assert "train.learning_rate (float, default 0.0002)" in text and "data.packing (bool, default False)" in text
    text = " ".join(runner.invoke(app, ["eval", "--help"]).output.split())
    assert f"--max-examples <int range> [x>=1] [default: {EvalConfig().max_examples}]" in text


def test_epochs_derive_the_step_count_from_the_data(tmp_path, chat_model_dir):
    config = job_yaml(tmp_path, chat_model_dir, data={"eval": None, "eval_fraction": 0.34})
    result = runner.invoke(app, ["train", str(config), "--set", "train.max_steps=null", "--set", "train.epochs=2"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["run"]["steps"] == 4  # 4 train examples / batch 2 = 2 steps an epoch, 2 epochs


@pytest.mark.parametrize("warmup", ["train.warmup_ratio=0.5", "train.warmup_steps=2"])
def test_warmup_ratio_and_steps_both_warm_up_for_two_of_four_steps(tmp_path, chat_model_dir, warmup):
    config = job_yaml(tmp_path, chat_model_dir, train={"lr_scheduler": "constant_with_warmup"})
    result = runner.invoke(app, ["train", str(config), "--set", warmup])
    assert result.exit_code == 0, result.output
    rates = [json.loads(line)["learning_rate"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "learning_rate" in json.loads(line)]
    assert rates == pytest.approx([0.0, 2.5e-3, 5e-3, 5e-3])  # the rate each step ran at: 0, 1/2, then the peak
