"""Axolotl's config keys (https://docs.axolotl.ai/docs/config-reference.html) as lorakit's.

Axolotl writes every key of its examples, unset ones as `key:` (empty), so empty values are
skipped; the rest map one to one, or are ignored with the reason, or refused when running
without them would train something else (another adapter type, an existing adapter).
"""

from __future__ import annotations

from typing import Any

import torch

from lorakit.errors import ConfigError
from lorakit.train.foreign.mapping import (
    DISTRIBUTED,
    Mapper,
    eval_fraction,
    ignore,
    optimizer,
    refuse_unless,
    to,
)

HALLMARKS = ("base_model", "datasets", "micro_batch_size", "lora_r", "sequence_len")
# Axolotl's dataset `type` as our data.format
DATASET_TYPES = {"alpaca": "alpaca", "sharegpt": "sharegpt", "chat_template": "messages", "completion": "text"}

TRACKING = "experiment trackers are not wired in; metrics.jsonl, loss.png and report.md hold the run"
KERNELS = "attention kernels: transformers picks SDPA (or flash attention when installed) itself"


def adapter(mapper: Mapper, value: Any, key: str) -> None:
    if value not in ("lora", "qlora"):
        raise ConfigError(f"axolotl {key}: {value!r}: lorakit trains LoRA adapters here (adapter: lora or qlora).")
    if value == "qlora" and not mapper.get("quantize"):
        mapper.set("quantize", "nf4", key, given=value, note="QLoRA: 4-bit NF4 base")
    else:
        mapper.ignore(key, value, "a LoRA adapter (quantization comes from load_in_4bit / load_in_8bit)")


def load_in(bits: str):
    def handle(mapper: Mapper, value: Any, key: str) -> None:
        if value:
            mapper.set("quantize", bits, key, given=value)
        else:
            mapper.ignore(key, value, "false: no quantization")
    return handle


def target_linear(mapper: Mapper, value: Any, key: str) -> None:
    if value:
        mapper.set("lora.target_modules", "all-linear", key, given=value)
    else:
        mapper.ignore(key, value, "false: lora_target_modules decides")


def precision(name: str):
    def handle(mapper: Mapper, value: Any, key: str) -> None:
        if value == "auto":  # Axolotl: bf16 where the GPU has it
            on = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            mapper.set(f"train.{name}", on, key, given=value, note=f"auto: {'on' if on else 'off'} on this machine")
        else:
            mapper.set(f"train.{name}", bool(value), key, given=value)
    return handle


def datasets(target: str):
    """`datasets: [{path, type}]` (or test_datasets) as data.train / data.eval and data.format."""
    def handle(mapper: Mapper, value: Any, key: str) -> None:
        if not isinstance(value, list) or not value or not all(isinstance(d, dict) and "path" in d for d in value):
            raise ConfigError(f"axolotl {key}: expected a list of {{path, type}}, got {value!r:.120}.")
        formats = set()
        for number, entry in enumerate(value):
            kind = entry.get("type", "alpaca")
            if isinstance(kind, dict) or kind not in DATASET_TYPES:
                raise ConfigError(f"axolotl {key}[{number}].type: {kind!r}: lorakit reads {', '.join(DATASET_TYPES)} "
                                  "(custom prompt formats: convert the file to one of them).")
            extra = sorted(set(entry) - {"path", "type", "ds_type", "data_files", "split", "field_messages"})
            if extra or entry.get("field_messages", "messages") != "messages":
                raise ConfigError(f"axolotl {key}[{number}]: {extra or ['field_messages']} re-map the file's columns, "
                                  "which lorakit does not; rename the columns in the file instead.")
            formats.add(DATASET_TYPES[kind])
        files = [mapper.local_file(f"{key}[{n}].path", d.get("data_files") or d["path"]) for n, d in enumerate(value)]
        mapper.set(target, files[0] if len(files) == 1 else files, key, given=value)
        if target == "data.train":
            mapper.set("data.format", formats.pop() if len(formats) == 1 else "auto", f"{key}[].type",
                       given=sorted({d.get("type", "alpaca") for d in value}))
    return handle


def not_supported(why: str):
    return refuse_unless(lambda value: not value, why)


HANDLERS = {
    "base_model": to("model"), "base_model_config": ignore("the config is read from the model folder"),
    "model_type": ignore("lorakit loads AutoModelForCausalLM"), "tokenizer_type": ignore("lorakit loads AutoTokenizer"),
    "tokenizer_config": not_supported("a separate tokenizer folder is not supported; put the tokenizer in the model folder."),
    "trust_remote_code": ignore("lorakit runs no model code from the model folder"),
    "strict": ignore("lorakit always refuses unknown keys"),
    "adapter": adapter, "load_in_4bit": load_in("nf4"), "load_in_8bit": load_in("int8"),
    "lora_model_dir": not_supported("continuing from an existing adapter is not supported by `lorakit train`."),
    "lora_r": to("lora.r"), "lora_alpha": to("lora.lora_alpha"), "lora_dropout": to("lora.lora_dropout"),
    "lora_target_modules": to("lora.target_modules"), "lora_target_linear": target_linear,
    "lora_modules_to_save": to("lora.modules_to_save"), "lora_fan_in_fan_out": to("lora.fan_in_fan_out"),
    "peft_use_dora": to("lora.use_dora"), "peft_use_rslora": to("lora.use_rslora"),
    "datasets": datasets("data.train"), "test_datasets": datasets("data.eval"),
    "dataset_prepared_path": ignore("lorakit tokenizes in memory; nothing is cached"),
    "val_set_size": eval_fraction, "output_dir": to("output_dir"),
    "sequence_len": to("data.max_seq_len"), "sample_packing": to("data.packing"),
    "pad_to_sequence_len": ignore("batches are padded to their longest row"),
    "train_on_inputs": to("data.train_on_prompt"),
    "micro_batch_size": to("train.batch_size"), "gradient_accumulation_steps": to("train.grad_accum"),
    "eval_batch_size": to("eval.batch_size"), "num_epochs": to("train.epochs"), "max_steps": to("train.max_steps"),
    "learning_rate": to("train.learning_rate"), "lr_scheduler": to("train.lr_scheduler"),
    "warmup_steps": to("train.warmup_steps"), "warmup_ratio": to("train.warmup_ratio"),
    "optimizer": optimizer, "weight_decay": to("train.weight_decay"), "max_grad_norm": to("train.max_grad_norm"),
    "seed": to("train.seed"), "logging_steps": to("train.logging_steps"), "save_steps": to("train.save_steps"),
    "eval_steps": to("train.eval_steps"), "save_total_limit": to("train.keep_checkpoints"),
    "gradient_checkpointing": to("train.gradient_checkpointing", bool), "bf16": precision("bf16"),
    "fp16": precision("fp16"), "tf32": ignore("a GPU matmul mode; torch's default applies"),
    "group_by_length": ignore("batches follow the seeded shuffle"),
    "early_stopping_patience": ignore("not supported: training runs all its steps"),
    "resume_from_checkpoint": ignore("use `lorakit train ... --resume`"), "auto_resume_from_checkpoints": ignore(
        "use `lorakit train ... --resume`"),
    "local_rank": ignore("set by a launcher"), "xformers_attention": ignore(KERNELS), "flash_attention": ignore(KERNELS),
    "sdp_attention": ignore(KERNELS), "evals_per_epoch": ignore("lorakit evaluates every train.eval_steps"),
    "saves_per_epoch": ignore("lorakit saves every train.save_steps"), "eval_table_size": ignore(
        "the report shows eval.samples generations"),
    "eval_max_new_tokens": to("eval.max_new_tokens"), "debug": ignore("use `lorakit --verbose`"),
    "deepspeed": ignore(DISTRIBUTED), "fsdp": ignore(DISTRIBUTED), "fsdp_config": ignore(DISTRIBUTED),
    "special_tokens": ignore("lorakit uses the tokenizer's own special tokens (pad = eos when unset)"),
    "tokens": not_supported("adding tokens is not supported (the adapter would need new embedding rows)."),
    "chat_template": ignore("lorakit renders chats with the tokenizer's own template"),
    **{f"wandb_{k}": ignore(TRACKING) for k in ("project", "entity", "watch", "name", "log_model", "run_id", "mode")},
    "mlflow_tracking_uri": ignore(TRACKING), "mlflow_experiment_name": ignore(TRACKING),
    "hub_model_id": ignore("lorakit never uploads; push to the registry with register:"),
}
