"""LLaMA-Factory's training YAML (`llamafactory-cli train x.yaml`, stage: sft) as lorakit's.

Its datasets are names in `dataset_dir/dataset_info.json` (`file_name`, `formatting`: alpaca
or sharegpt, `columns`, `tags`); local files are read from there, Hub entries are refused
(nothing is downloaded). Its LoRA defaults differ from ours (rank 8, alpha = 2 x rank,
dropout 0, every linear layer), so they are written out, to train what LLaMA-Factory would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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

HALLMARKS = ("model_name_or_path", "finetuning_type", "stage")
# dataset_info.json's defaults (LLaMA-Factory's data/README.md)
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "system_tag": "system"}
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "system_tag": "system"}
# a sharegpt-formatted dataset's messages column → (the tags it must keep, our data.format)
SHAREGPT_LAYOUTS = {"conversations": (SHAREGPT_TAGS, "sharegpt"), "messages": (OPENAI_TAGS, "messages")}


def lora_target(mapper: Mapper, value: Any, key: str) -> None:
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    mapper.set("lora.target_modules", "all-linear" if names == ["all"] else names, key, given=value)


def quantization_bit(mapper: Mapper, value: Any, key: str) -> None:
    kinds = {4: "nf4", 8: "int8"}
    if value not in kinds:
        raise ConfigError(f"llamafactory {key}: {value!r}: lorakit quantizes to 4 bits (nf4, fp4) or 8 (int8).")
    mapper.set("quantize", kinds[value], key, given=value)


def quantization_type(mapper: Mapper, value: Any, key: str) -> None:
    if mapper.get("quantize") in ("nf4", "fp4") and value in ("nf4", "fp4"):
        mapper.set("quantize", value, key)
    else:
        mapper.ignore(key, value, "applies to 4-bit quantization only")


def pissa(mapper: Mapper, value: Any, key: str) -> None:
    if not value:
        mapper.ignore(key, value, "false: the standard LoRA init")
        return
    steps = mapper.config.pop("_pissa_iter", 16)  # LLaMA-Factory's default: 16 fast-SVD iterations
    mapper.set("lora.init_lora_weights", "pissa" if steps == -1 else f"pissa_niter_{steps}", key, given=value)


def pissa_iter(mapper: Mapper, value: Any, key: str) -> None:
    if mapper.get("lora.init_lora_weights"):
        raise ConfigError(f"llamafactory {key}: put pissa_iter before pissa_init.")
    mapper.config["_pissa_iter"] = value
    mapper.ignore(key, value, "read with pissa_init (-1: exact SVD)")


def dataset_files(target: str):
    """`dataset: a,b` (+ dataset_dir) as data.train / data.eval and data.format."""
    def handle(mapper: Mapper, value: Any, key: str) -> None:
        names = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
        folder = mapper.folder / str(mapper.config.pop("_dataset_dir", "data"))
        info_path = folder / "dataset_info.json"
        if not info_path.is_file():
            raise ConfigError(f"llamafactory {key}: {info_path} not found; LLaMA-Factory names datasets in "
                              "dataset_dir/dataset_info.json (set dataset_dir: to the folder that holds it).")
        info = json.loads(info_path.read_text(encoding="utf-8"))
        files, formats = [], set()
        for name in names:
            if name not in info:
                raise ConfigError(f"llamafactory {key}: dataset {name!r} is not in {info_path} "
                                  f"(it has {', '.join(sorted(info))}).")
            entry = info[name]
            if "file_name" not in entry:
                raise ConfigError(f"llamafactory {key}: dataset {name!r} is a Hub or script dataset; lorakit never "
                                  "downloads data: download it once and add it to dataset_info.json with file_name.")
            files.append(mapper.local_file(f"{key}: {name}", str(Path(folder) / entry["file_name"])))
            formats.add(_format(name, entry))
        mapper.set(target, files[0] if len(files) == 1 else files, key, given=value)
        if target == "data.train":
            mapper.set("data.format", formats.pop() if len(formats) == 1 else "auto", f"{key} (formatting)",
                       given=sorted(formats) or None)
    return handle


def _format(name: str, entry: dict) -> str:
    """Our data.format for a dataset_info.json entry whose columns and tags we read as they are."""
    formatting = entry.get("formatting", "alpaca")
    columns, tags = entry.get("columns", {}), entry.get("tags", {})
    if formatting == "alpaca" and all(ALPACA_COLUMNS.get(k) == v for k, v in columns.items()):
        return "alpaca"
    if formatting == "sharegpt" and set(columns) <= {"messages", "system"}:
        spelled, kind = SHAREGPT_LAYOUTS.get(columns.get("messages", "conversations"), ({}, None))
        # unset tags are LLaMA-Factory's ShareGPT ones: a "messages" column must name OpenAI's in its tags
        if kind and all(spelled.get(k) == v for k, v in tags.items()) and (kind == "sharegpt" or tags):
            return kind
    raise ConfigError(f"dataset_info.json: {name!r} maps columns or tags ({columns or ''} {tags or ''}) lorakit does "
                      "not re-map; rename the file's columns to Alpaca's (instruction, input, output, system) or "
                      "ShareGPT's (conversations: from / value).")


def dataset_dir(mapper: Mapper, value: Any, key: str) -> None:
    if "data" in mapper.config and mapper.config["data"].get("train"):
        raise ConfigError(f"llamafactory {key}: put dataset_dir before dataset.")
    mapper.config["_dataset_dir"] = value
    mapper.ignore(key, value, "where dataset_info.json is read")


HANDLERS = {
    "model_name_or_path": to("model"), "trust_remote_code": ignore("lorakit runs no model code from the model folder"),
    "stage": refuse_unless(lambda v: v == "sft", "lorakit trains supervised fine-tuning only (stage: sft)."),
    "do_train": ignore("lorakit train trains"), "do_eval": ignore("lorakit always compares base and adapter"),
    "finetuning_type": refuse_unless(lambda v: v == "lora", "lorakit trains LoRA adapters (finetuning_type: lora)."),
    "lora_rank": to("lora.r"), "lora_alpha": to("lora.lora_alpha"), "lora_dropout": to("lora.lora_dropout"),
    "lora_target": lora_target, "additional_target": to("lora.modules_to_save", lambda v: v.split(",")),
    "use_dora": to("lora.use_dora"), "use_rslora": to("lora.use_rslora"), "pissa_iter": pissa_iter,
    "pissa_init": pissa, "pissa_convert": ignore("lorakit always saves PiSSA adapters converted to plain LoRA"),
    "loraplus_lr_ratio": to("train.loraplus_lr_ratio"), "loraplus_lr_embedding": to("train.loraplus_lr_embedding"),
    "quantization_bit": quantization_bit, "quantization_type": quantization_type,
    "quantization_method": refuse_unless(lambda v: v in ("bnb", "bitsandbytes"), "lorakit quantizes with bitsandbytes."),
    "double_quantization": ignore("lorakit's 4-bit base is double-quantized"),
    "dataset_dir": dataset_dir, "dataset": dataset_files("data.train"), "eval_dataset": dataset_files("data.eval"),
    "template": ignore("lorakit renders chats with the tokenizer's own chat template"),
    "cutoff_len": to("data.max_seq_len"), "packing": to("data.packing"),
    "neat_packing": to("data.packing", note="lorakit's packing keeps attention within each example"),
    "train_on_prompt": to("data.train_on_prompt"), "val_size": eval_fraction,
    "max_samples": ignore("every example is used"), "overwrite_cache": ignore("nothing is cached"),
    "preprocessing_num_workers": ignore("lorakit tokenizes in one process"),
    "dataloader_num_workers": ignore("lorakit loads batches in the training process"),
    "output_dir": to("output_dir"), "logging_steps": to("train.logging_steps"), "save_steps": to("train.save_steps"),
    "eval_steps": to("train.eval_steps"), "eval_strategy": ignore("lorakit evaluates every train.eval_steps"),
    "save_total_limit": to("train.keep_checkpoints"), "plot_loss": ignore("loss.png is always written"),
    "overwrite_output_dir": ignore("pass --overwrite to `lorakit train`"),
    "save_only_model": ignore("checkpoints hold the adapter and the optimizer, for --resume"),
    "report_to": ignore("metrics.jsonl, loss.png and report.md hold the run"),
    "per_device_train_batch_size": to("train.batch_size"), "per_device_eval_batch_size": to("eval.batch_size"),
    "gradient_accumulation_steps": to("train.grad_accum"), "learning_rate": to("train.learning_rate"),
    "num_train_epochs": to("train.epochs"), "max_steps": to("train.max_steps"),
    "lr_scheduler_type": to("train.lr_scheduler"), "warmup_ratio": to("train.warmup_ratio"),
    "warmup_steps": to("train.warmup_steps"), "weight_decay": to("train.weight_decay"),
    "max_grad_norm": to("train.max_grad_norm"), "optim": optimizer, "seed": to("train.seed"),
    "bf16": to("train.bf16"), "fp16": to("train.fp16"),
    "disable_gradient_checkpointing": to("train.gradient_checkpointing", lambda v: not v),
    "resume_from_checkpoint": ignore("use `lorakit train ... --resume`"),
    "ddp_timeout": ignore(DISTRIBUTED), "deepspeed": ignore(DISTRIBUTED),
    "flash_attn": ignore("attention kernels: transformers picks SDPA itself"),
    "enable_liger_kernel": ignore("lorakit's fused loss path applies where it is exact"),
    "use_unsloth": ignore("lorakit's own fast path applies where it is exact"),
}
# LLaMA-Factory's defaults where ours differ (its FinetuningArguments)
DEFAULTS = {"lora.r": 8, "lora.lora_dropout": 0.0, "lora.target_modules": "all-linear"}
