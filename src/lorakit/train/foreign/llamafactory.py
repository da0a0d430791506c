"""LLaMA-Factory's training YAML (`llamafactory-cli train x.yaml`, stage: sft) as lorakit's: the keys that
map to ours (here), the rest of its schema and of HF's TrainingArguments ignored with the reason or accepted
only at the default (llamafactory_keys.py), and its defaults for what a file leaves out (LoRA rank 8, alpha
2 x rank, dropout 0, every linear layer, cutoff_len 2048, no held-out set, and HF's training defaults),
written out as "default" rows so the run trains what LLaMA-Factory would.

Its datasets are names in `dataset_dir/dataset_info.json` (`file_name`, `formatting`: alpaca or sharegpt,
`columns`, `tags`); local files are read from there, Hub entries are refused (nothing is downloaded), and
so are data sets for another kind of training (preference pairs, KTO labels, pretraining text). Its v1
configs (`model:`, `peft_config:`, `train_dataset:`) are another schema, refused as such.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError
from lorakit.train.foreign.llamafactory_keys import handlers as schema_handlers
from lorakit.train.foreign.llamafactory_keys import hf_trainer_handlers
from lorakit.train.foreign.mapping import Mapper, eval_split, ignore, optimizer, refuse_unless, scheduler, to

HALLMARKS = ("model_name_or_path", "finetuning_type", "stage")
V1_HALLMARKS = ("peft_config", "train_dataset", "dist_config", "kernel_config", "model_class")
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
        mapper.refuse(key, value, "lorakit quantizes to 4 bits (nf4, fp4) or 8 (int8).")
    else:
        mapper.set("quantize", kinds[value], key, given=value)


def quantization_type(mapper: Mapper, value: Any, key: str) -> None:
    if mapper.get("quantize") in ("nf4", "fp4") and value in ("nf4", "fp4"):
        mapper.set("quantize", value, key)
    else:
        mapper.ignore(key, value, "applies to 4-bit quantization only")


def max_samples(mapper: Mapper, value: Any, key: str) -> None:
    mapper.set("data.train_split", f"train[:{int(value)}]", key, given=value,
               note="the first max_samples examples of each data set, as LLaMA-Factory selects them")


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
        folder_name = str(mapper.config.pop("_dataset_dir", "data"))
        if folder_name.startswith("REMOTE:"):
            mapper.refuse("dataset_dir", folder_name, "a dataset folder on the Hub; lorakit never downloads data: "
                                                      "download it once and give the local folder.")
            return
        folder = _dataset_folder(mapper, folder_name)
        info_path = folder / "dataset_info.json"
        if not info_path.is_file():
            mapper.refuse(key, value, f"{info_path} not found; LLaMA-Factory names datasets in dataset_dir/"
                                      "dataset_info.json (set dataset_dir: to the folder that holds it).")
            return
        info = json.loads(info_path.read_text(encoding="utf-8"))
        files, formats = [], set()
        for name in names:
            if name not in info:
                mapper.refuse(key, name, f"not in {info_path} (it has {', '.join(sorted(info)[:12])}, …).")
                continue
            entry = info[name]
            if "file_name" not in entry:
                mapper.refuse(key, name, "a Hub or script dataset; lorakit never downloads data: download it once "
                                         "and add it to dataset_info.json with file_name.")
                continue
            why = _other_training(entry)
            if why:
                mapper.refuse(key, name, why)
                continue
            fmt = _format(name, entry)
            if fmt is None:
                mapper.refuse(key, name, f"its columns / tags ({entry.get('columns', '')} {entry.get('tags', '')}) "
                                         "rename the file's fields, which lorakit does not; rename them in the file "
                                         "to Alpaca's (instruction, input, output, system), ShareGPT's "
                                         "(conversations: from / value) or OpenAI's (messages: role / content).")
                continue
            files.append(mapper.local_file(f"{key}: {name}", str(Path(folder) / entry["file_name"])))
            formats.add(fmt)
        if not files or len(files) != len(names):
            return
        mapper.set(target, files[0] if len(files) == 1 else files, key, given=value)
        if target == "data.train":
            mapper.set("data.format", formats.pop() if len(formats) == 1 else "auto", f"{key} (formatting)",
                       given=sorted(formats) or None)
    return handle


def _dataset_folder(mapper: Mapper, name: str) -> Path:
    """dataset_dir beside the config, else in the working directory (where llamafactory-cli resolves it)."""
    beside = mapper.folder / name
    return beside if (beside / "dataset_info.json").is_file() else (Path.cwd() / name).resolve()


def _other_training(entry: dict) -> str | None:
    """Why a dataset_info.json entry holds data for another kind of training than SFT, or None."""
    columns = entry.get("columns", {})
    if entry.get("ranking") or {"chosen", "rejected"} <= set(columns):
        return ("a preference data set (ranking: chosen / rejected) for DPO / ORPO / reward modelling, which lorakit "
                "does not run yet; as SFT it would train one side only.")
    if "kto_tag" in columns:
        return "a KTO data set (desirable / undesirable labels); lorakit trains SFT, which would learn both."
    if set(columns) == {"prompt"} and entry.get("formatting", "alpaca") == "alpaca":
        return ("a pretraining-style data set (plain text in one column, for stage: pt); LLaMA-Factory packs it into "
                "cutoff_len blocks, which lorakit does not reproduce (a lorakit config with data.format: text trains "
                "plain text).")
    media = {"images", "videos", "audios"} & set(columns)
    if media:
        return f"a multimodal data set ({', '.join(sorted(media))}); lorakit trains text."
    return None


def _format(name: str, entry: dict) -> str | None:
    """Our data.format for a dataset_info.json entry whose columns and tags we read as they are (None: not)."""
    formatting = entry.get("formatting", "alpaca")
    columns, tags = entry.get("columns", {}), entry.get("tags", {})
    if formatting == "alpaca" and all(ALPACA_COLUMNS.get(k) == v for k, v in columns.items()):
        return "alpaca"
    if formatting == "sharegpt" and set(columns) <= {"messages", "system", "tools"}:
        spelled, kind = SHAREGPT_LAYOUTS.get(columns.get("messages", "conversations"), ({}, None))
        # unset tags are LLaMA-Factory's ShareGPT ones: a "messages" column must name OpenAI's in its tags
        if kind and all(spelled.get(k) == v for k, v in tags.items()) and (kind == "sharegpt" or tags):
            return kind
    return None


def dataset_dir(mapper: Mapper, value: Any, key: str) -> None:
    if "data" in mapper.config and mapper.config["data"].get("train"):
        raise ConfigError(f"llamafactory {key}: put dataset_dir before dataset.")
    mapper.config["_dataset_dir"] = value
    mapper.ignore(key, value, "where dataset_info.json is read")


MAPPED = {
    "model_name_or_path": to("model"),
    "stage": refuse_unless(lambda v: v == "sft", "lorakit trains supervised fine-tuning only (stage: sft)."),
    "finetuning_type": refuse_unless(lambda v: v == "lora", "lorakit trains LoRA adapters (finetuning_type: lora)."),
    "lora_rank": to("lora.r"), "lora_alpha": to("lora.lora_alpha"), "lora_dropout": to("lora.lora_dropout"),
    "lora_target": lora_target, "additional_target": to("lora.modules_to_save", lambda v: v.split(",")),
    "use_dora": to("lora.use_dora"), "use_rslora": to("lora.use_rslora"), "pissa_iter": pissa_iter,
    "pissa_init": pissa, "loraplus_lr_ratio": to("train.loraplus_lr_ratio"),
    "loraplus_lr_embedding": to("train.loraplus_lr_embedding"),
    "quantization_bit": quantization_bit, "quantization_type": quantization_type,
    "quantization_method": refuse_unless(lambda v: v in ("bnb", "bitsandbytes"), "lorakit quantizes with bitsandbytes."),
    "double_quantization": to("double_quant"),
    "dataset_dir": dataset_dir, "dataset": dataset_files("data.train"), "eval_dataset": dataset_files("data.eval"),
    "template": ignore("lorakit renders chats with the tokenizer's own chat template (the same when the model's "
                       "template is this one)"),
    "cutoff_len": to("data.max_seq_len"), "packing": to("data.packing"),
    "neat_packing": to("data.packing", note="lorakit's packing keeps attention within each example"),
    "train_on_prompt": to("data.train_on_prompt"), "val_size": eval_split, "max_samples": max_samples,
    "output_dir": to("output_dir"), "logging_steps": to("train.logging_steps"), "save_steps": to("train.save_steps"),
    "eval_steps": to("train.eval_steps"), "save_total_limit": to("train.keep_checkpoints"),
    "per_device_train_batch_size": to("train.batch_size"), "per_device_eval_batch_size": to("eval.batch_size"),
    "gradient_accumulation_steps": to("train.grad_accum"), "learning_rate": to("train.learning_rate"),
    "num_train_epochs": to("train.epochs"), "max_steps": to("train.max_steps"), "lr_scheduler_type": scheduler,
    "warmup_ratio": to("train.warmup_ratio"), "warmup_steps": to("train.warmup_steps"),
    "weight_decay": to("train.weight_decay"), "adam_beta1": to("train.adam_beta1"), "adam_beta2": to("train.adam_beta2"),
    "adam_epsilon": to("train.adam_epsilon"), "max_grad_norm": to("train.max_grad_norm"), "optim": optimizer,
    "seed": to("train.seed"), "bf16": to("train.bf16"), "fp16": to("train.fp16"),
    "gradient_checkpointing": to("train.gradient_checkpointing"),
    "activation_checkpointing": to("train.gradient_checkpointing"),
    "disable_gradient_checkpointing": to("train.gradient_checkpointing", lambda v: not v),
}
# LLaMA-Factory's defaults where ours differ (its Finetuning / Data / Model arguments)
DEFAULTS = {"lora.r": 8, "lora.lora_dropout": 0.0, "lora.target_modules": "all-linear", "data.max_seq_len": 2048,
            "data.eval_fraction": 0.0}
# HF TrainingArguments' defaults, which LLaMA-Factory keeps, where ours differ
TRAINER_DEFAULTS = {"train.learning_rate": 5e-5, "train.lr_scheduler": "linear", "train.warmup_ratio": 0.0,
                    "train.batch_size": 8}


@cache
def handlers() -> dict:
    return {**hf_trainer_handlers(), **schema_handlers(), **MAPPED}


def finish(mapper: Mapper) -> None:
    """max_steps over num_train_epochs (as HF Trainer), then LLaMA-Factory's defaults for what was left out."""
    if mapper.get("data.train") is None and "dataset" not in {row.key for row in mapper.rows}:
        raise ConfigError("This LLaMA-Factory config names no dataset: it is an inference, chat or export config "
                          "(llamafactory-cli chat / export), not a training one.")
    if mapper.get("train.max_steps") is not None and mapper.get("train.epochs") is not None:
        mapper.drop("train.epochs", "num_train_epochs", "max_steps is set: it decides the run's length (as in HF "
                                                        "Trainer)")
    for target, value in DEFAULTS.items():
        mapper.default(target, value, "LLaMA-Factory's default (ours differs)")
    mapper.default("lora.lora_alpha", 2 * mapper.get("lora.r"), "LLaMA-Factory's default: 2 x lora_rank")
    for target, value in TRAINER_DEFAULTS.items():
        mapper.default(target, value, "HF TrainingArguments' default, which LLaMA-Factory keeps")
    if mapper.get("train.max_steps") is None:
        mapper.default("train.epochs", 3.0, "HF TrainingArguments' default, which LLaMA-Factory keeps")
