"""The real example configs of both tools, shipped in foreign_corpus/ (YAML only, with their licences):
Axolotl's 165 `examples/**/*lora*` files and LLaMA-Factory's 95 `examples/**/*.yaml`, with excerpts of
LLaMA-Factory's bundled demo data (alpaca_en_demo 24 records, identity 91, dpo_en_demo 8, kto_en_demo 8,
glaive_toolcall_en_demo 6, mllm_demo 6, alpaca_zh_demo 12, c4_demo 8, v1_sft_demo 24, v1_dpo_demo 6).

- Every key of each tool's schema (foreign_corpus/*/SCHEMA_KEYS, and HF's Seq2SeqTrainingArguments under
  LLaMA-Factory) has a handler: mapped, ignored with the reason, or refused with the reason.
- Every shipped example imports, or is refused with reasons — never for a key of the tool's own schema
  being unknown. Axolotl's Hub dataset paths are given as local folders, as a user who downloaded them
  would have them; LLaMA-Factory's configs are read from its repository root (its data/ folder).
- For ten representative examples, the resolved job equals what the tool documents for that file: the
  values it sets, the tool's defaults for the rest (Axolotl's schema, LLaMA-Factory's hparams, HF's
  TrainingArguments).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from lorakit.errors import ConfigError
from lorakit.train.config import JobConfig, check_config, read_yaml
from lorakit.train.config_errors import validated
from lorakit.train.foreign import DIALECTS, to_lorakit

CORPUS = Path(__file__).parent / "foreign_corpus"
AXOLOTL = sorted((CORPUS / "axolotl" / "examples").rglob("*.y*ml"))
LLAMAFACTORY = sorted((CORPUS / "llamafactory" / "examples").rglob("*.yaml"))


def schema_keys(dialect: str) -> list[str]:
    lines = (CORPUS / dialect / "SCHEMA_KEYS").read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_every_key_of_each_tools_schema_has_a_handler(dialect):
    keys = schema_keys(dialect)
    if dialect == "llamafactory":
        from transformers import Seq2SeqTrainingArguments

        keys += [f.name for f in dataclasses.fields(Seq2SeqTrainingArguments)]
    missing = [key for key in keys if key not in DIALECTS[dialect].handlers()]
    assert len(keys) > 200 and missing == []


@pytest.fixture(scope="module")
def axolotl_data(tmp_path_factory):
    """A folder where every dataset path the Axolotl examples name exists locally (one small file each)."""
    root = tmp_path_factory.mktemp("axolotl-data")
    for config in AXOLOTL:
        raw = yaml.safe_load(config.read_text())
        for entry in (raw.get("datasets") or []) + (raw.get("test_datasets") or []):
            files = entry.get("data_files")
            files = files[0] if isinstance(files, list) and len(files) == 1 else files
            target = root / entry["path"] / (files if isinstance(files, str) else "data.jsonl")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text('{"instruction": "Say hi.", "input": "", "output": "Hi."}\n')
    return root


def resolve(config: Path) -> JobConfig | str:
    """The job a foreign file resolves to, or the refusal's text."""
    try:
        job = validated(JobConfig, to_lorakit(read_yaml(config), config).config)
        check_config(job)
        return job
    except ConfigError as error:
        return str(error)


def outcomes(configs: list[Path]) -> dict[str, JobConfig | str]:
    return {str(config.relative_to(CORPUS)): resolve(config) for config in configs}


def test_every_axolotl_example_imports_or_is_refused_for_a_real_reason(axolotl_data, monkeypatch):
    monkeypatch.chdir(axolotl_data)
    results = outcomes(AXOLOTL)
    check_outcomes(results, "axolotl", imported_at_least=70)


def test_every_llamafactory_example_imports_or_is_refused_for_a_real_reason(monkeypatch):
    monkeypatch.chdir(CORPUS / "llamafactory")  # LLaMA-Factory resolves dataset_dir from its repository root
    results = outcomes(LLAMAFACTORY)
    check_outcomes(results, "llamafactory", imported_at_least=12)


def check_outcomes(results: dict, dialect: str, imported_at_least: int) -> None:
    schema = set(schema_keys(dialect))
    refused = {name: why for name, why in results.items() if isinstance(why, str)}
    for name, why in refused.items():
        assert why.strip(), name
        unknown = why.split("unknown key(s) ", 1)[1].split(":", 1)[0] if "unknown key(s) " in why else ""
        named = {part.split("'")[1] for part in unknown.split(", '") if "'" in part}
        assert not named & schema, f"{name}: a key of {dialect}'s own schema reported unknown: {named & schema}"
    imported = len(results) - len(refused)
    assert imported >= imported_at_least, f"{imported} of {len(results)} imported; refusals: {refused}"


AXOLOTL_DOCUMENTED = {  # their values, and Axolotl's defaults where a file says nothing
    "axolotl/examples/llama-3/lora-1b.yml": dict(
        lr=2e-4, r=16, alpha=32, dropout=0.05, targets=["gate_proj", "down_proj", "up_proj", "q_proj", "v_proj",
                                                         "k_proj", "o_proj"],
        scheduler="cosine", epochs=1.0, max_steps=None, batch=2, grad_accum=2, max_len=2048, packing=True,
        eval_fraction=0.1, eval_count=None, split=None, warmup=0.1, optimizer="adamw_8bit", quantize=None,
        fmt="alpaca", prompt_style="alpaca", too_long="drop"),
    "axolotl/examples/llama-3/qlora.yml": dict(
        lr=2e-4, r=32, alpha=16, dropout=0.05, targets="all-linear", scheduler="cosine", epochs=4.0, max_steps=None,
        batch=2, grad_accum=4, max_len=4096, packing=True, eval_fraction=0.0, eval_count=None, split=None,
        warmup=0.1, optimizer="paged_adamw_32bit", quantize="nf4", fmt="alpaca", prompt_style="alpaca",
        too_long="drop"),
    "axolotl/examples/mistral/qlora.yml": dict(  # lora_target_linear and lora_target_modules: the union
        lr=2e-4, r=32, alpha=16, dropout=0.05, targets=["all-linear", "gate_proj", "down_proj", "up_proj", "q_proj",
                                                         "v_proj", "k_proj", "o_proj"],
        scheduler="cosine", epochs=1.0, max_steps=None, batch=2, grad_accum=4, max_len=8192, packing=True,
        eval_fraction=0.1, eval_count=None, split=None, warmup=0.1, optimizer="adamw_8bit", quantize="nf4",
        fmt="alpaca", prompt_style="alpaca", too_long="drop"),
    "axolotl/examples/llama-3/instruct-lora-8b.yml": dict(
        lr=2e-4, r=32, alpha=16, dropout=0.05, targets="all-linear", scheduler="cosine", epochs=4.0, max_steps=None,
        batch=2, grad_accum=4, max_len=4096, packing=False, eval_fraction=0.05, eval_count=None, split=None,
        warmup=0.1, optimizer="adamw_8bit", quantize="int8", fmt="messages", prompt_style="template",
        too_long="drop"),
    "axolotl/examples/qwen3/8b-lora-fused-attn.yaml": dict(
        lr=2e-4, r=32, alpha=64, dropout=0.0, targets="all-linear", scheduler="cosine", epochs=1.0, max_steps=None,
        batch=1, grad_accum=4, max_len=4096, packing=True, eval_fraction=0.05, eval_count=None, split=None,
        warmup=0.1, optimizer="adamw", quantize=None, fmt="alpaca", prompt_style="alpaca", too_long="drop"),
}
LF_COMMON = dict(  # every one of these examples: its values, LLaMA-Factory's and HF's defaults for the rest
    lr=1e-4, r=8, alpha=16, dropout=0.0, targets="all-linear", scheduler="cosine", epochs=3.0, max_steps=None,
    batch=1, grad_accum=8, max_len=2048, packing=False, eval_fraction=0.0, eval_count=None, split="train[:1000]",
    warmup=0.1, optimizer="adamw", quantize=None, fmt="alpaca", prompt_style="template", too_long="truncate")
LLAMAFACTORY_DOCUMENTED = {
    "llamafactory/examples/train_lora/qwen3_lora_sft.yaml": LF_COMMON,
    "llamafactory/examples/extras/loraplus/llama3_lora_sft.yaml": {**LF_COMMON, "loraplus": 16.0},
    "llamafactory/examples/extras/pissa/llama3_lora_sft.yaml": {**LF_COMMON, "init": "pissa_niter_16"},
    "llamafactory/examples/train_qlora/qwen3_lora_sft_otfq.yaml": {**LF_COMMON, "quantize": "nf4"},
    "llamafactory/examples/extras/fsdp_qlora/llama3_lora_sft.yaml": {**LF_COMMON, "quantize": "nf4"},
}


def resolved(job: JobConfig, expected: dict) -> dict:
    lora, train, data = job.lora, job.train, job.data
    values = dict(lr=train.learning_rate, r=lora["r"], alpha=lora["lora_alpha"], dropout=lora["lora_dropout"],
                  targets=lora["target_modules"], scheduler=train.lr_scheduler, epochs=train.epochs,
                  max_steps=train.max_steps if train.epochs is None else None, batch=train.batch_size,
                  grad_accum=train.grad_accum, max_len=data.max_seq_len, packing=data.packing,
                  eval_fraction=data.eval_fraction, eval_count=data.eval_count, split=data.train_split,
                  warmup=train.warmup_ratio, optimizer=train.optimizer, quantize=job.quantize, fmt=data.format,
                  prompt_style=data.prompt_style, too_long=data.too_long, loraplus=train.loraplus_lr_ratio,
                  init=lora.get("init_lora_weights"))
    return {key: values[key] for key in expected}


@pytest.mark.parametrize("name", [*AXOLOTL_DOCUMENTED, *LLAMAFACTORY_DOCUMENTED])
def test_representative_examples_resolve_to_what_their_tool_documents(name, axolotl_data, monkeypatch):
    axolotl = name.startswith("axolotl/")
    monkeypatch.chdir(axolotl_data if axolotl else CORPUS / "llamafactory")
    job = resolve(CORPUS / name)
    assert isinstance(job, JobConfig), job
    expected = (AXOLOTL_DOCUMENTED if axolotl else LLAMAFACTORY_DOCUMENTED)[name]
    assert resolved(job, expected) == expected
