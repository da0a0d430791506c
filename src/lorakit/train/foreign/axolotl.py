"""Axolotl's config (https://docs.axolotl.ai/docs/config-reference.html) as lorakit's: the keys that map
to ours (here), the rest of its schema ignored with the reason or accepted only at Axolotl's default
(axolotl_keys.py), and Axolotl's own defaults for what a file leaves out (`DEFAULTS`, shown as
"default" rows) — so a file trains what Axolotl would train with it.

Axolotl writes every key of its examples, unset ones as `key:` (empty): those are skipped.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from lorakit.train.foreign.axolotl_keys import handlers as schema_handlers
from lorakit.train.foreign.mapping import Mapper, at_default, eval_split, ignore, named, scheduler, to

HALLMARKS = ("base_model", "datasets", "micro_batch_size", "lora_r", "sequence_len")
# Axolotl's dataset `type` as (our data.format, our data.prompt_style)
DATASET_TYPES = {"alpaca": ("alpaca", "alpaca"), "alpaca:chat": ("alpaca", "alpaca_chat"),
                 "chat_template": ("messages", "template"), "chat_template.default": ("messages", "template"),
                 "completion": ("text", "template"), "sharegpt": ("sharegpt", "template")}
# a dataset entry's keys that say how its file is read, and the values that read it as lorakit does
SPELLINGS = {"field_messages": ("messages", "conversations"),
             "message_property_mappings": ({"role": "role", "content": "content"}, {"role": "from", "content": "value"}),
             "message_field_role": ("role", "from"), "message_field_content": ("content", "value")}
OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw_bnb_8bit": "adamw_8bit",
              "adamw_8bit": "adamw_8bit", "adamw_torch_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit",
              "paged_adamw_32bit": "paged_adamw_32bit"}
# Axolotl's defaults (its schema, and HF TrainingArguments' where Axolotl passes None) where ours differ
DEFAULTS = {"train.batch_size": 1, "lora.lora_dropout": 0.0, "train.warmup_ratio": 0.0, "data.eval_fraction": 0.0,
            "data.too_long": "drop", "train.bf16": "auto"}


def adapter(mapper: Mapper, value: Any, key: str) -> None:
    if value not in ("lora", "qlora"):
        mapper.refuse(key, value, "lorakit trains LoRA adapters here (adapter: lora or qlora).")
    elif value == "qlora" and not mapper.get("quantize"):
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
    if value:  # Axolotl adds every linear layer to lora_target_modules: the union (finish() combines them)
        mapper.config["_target_linear"] = True
        mapper.ignore(key, value, "every linear layer, with lora_target_modules added (Axolotl's union)")
    else:
        mapper.ignore(key, value, "false: lora_target_modules decides")


def bnb_config_kwargs(mapper: Mapper, value: Any, key: str) -> None:
    if not isinstance(value, dict):
        mapper.refuse(key, value, "expected a mapping of BitsAndBytesConfig fields.")
        return
    for name, setting in value.items():
        if name == "bnb_4bit_use_double_quant":
            mapper.set("double_quant", bool(setting), f"{key}.{name}")
        elif name == "bnb_4bit_quant_type" and setting in ("nf4", "fp4"):
            mapper.set("quantize", setting, f"{key}.{name}")
        elif name in ("bnb_4bit_compute_dtype", "llm_int8_has_fp16_weight"):
            mapper.ignore(f"{key}.{name}", setting, "lorakit computes in the training precision (train.bf16)")
        else:
            mapper.refuse(f"{key}.{name}", setting, "a bitsandbytes setting lorakit does not pass on.")


def precision(name: str):
    def handle(mapper: Mapper, value: Any, key: str) -> None:
        if value == "auto":  # decided when the run starts, on the machine that trains (train.bf16: auto)
            mapper.set(f"train.{name}", "auto", key, note="auto: bf16 where the GPU has it, decided when the run starts")
        else:
            mapper.set(f"train.{name}", bool(value), key, given=value)
    return handle


def excess_length(mapper: Mapper, value: Any, key: str) -> None:
    if value in ("drop", "truncate"):
        mapper.set("data.too_long", value, key)
    else:
        mapper.refuse(key, value, "lorakit drops or truncates an over-long example (drop, truncate), never stops.")


def chat_template(mapper: Mapper, value: Any, key: str) -> None:
    if str(value).startswith("tokenizer_default"):
        mapper.ignore(key, value, "the tokenizer's own template: what lorakit renders with")
    else:
        mapper.ignore(key, value, f"lorakit renders chats with the tokenizer's own template, not Axolotl's "
                                  f"{value!r} (the same when the model's template is {value!r})")


def special_tokens(mapper: Mapper, value: Any, key: str) -> None:
    mapper.ignore(key, value, "lorakit uses the tokenizer's own special tokens (pad = eos when it has none); a token "
                              "named here that the tokenizer lacks, Axolotl would add")


def datasets(target: str):
    """`datasets: [{path, type, split, …}]` (or test_datasets) as data.train / data.eval, data.format,
    data.prompt_style and data.train_split / eval_split."""
    split_key = "data.train_split" if target == "data.train" else "data.eval_split"

    def handle(mapper: Mapper, value: Any, key: str) -> None:
        if not isinstance(value, list) or not value or not all(isinstance(d, dict) and "path" in d for d in value):
            mapper.refuse(key, value, "expected a list of {path, type}.")
            return
        kinds, splits, files = set(), set(), []
        for number, entry in enumerate(value):
            kind = entry.get("type", "alpaca")
            where = f"{key}[{number}]"
            if isinstance(kind, dict) or kind not in DATASET_TYPES:
                mapper.refuse(f"{where}.type", kind, f"lorakit reads {', '.join(DATASET_TYPES)}: this type builds its "
                                                     "prompts in Axolotl code lorakit does not reproduce (convert the "
                                                     "file to one of those).")
                continue
            if "field_chosen" in entry or "field_rejected" in entry:
                mapper.refuse(where, kind, "preference pairs (field_chosen / field_rejected) for DPO / ORPO, which "
                                           "lorakit does not run yet; as SFT it would train one side only.")
                continue
            odd = {k: v for k, v in entry.items() if k in SPELLINGS and v not in SPELLINGS[k]}
            extra = sorted(set(entry) - {"path", "type", "ds_type", "data_files", "split", *SPELLINGS})
            if odd or extra:
                mapper.refuse(where, {k: entry[k] for k in (*odd, *extra)},
                              "these dataset keys change how records are read (other column or role names, system "
                              "messages dropped, reasoning in its own field, a Hub dataset's named part), which "
                              "lorakit does not reproduce; give a file in OpenAI's (role / content) or ShareGPT's "
                              "(from / value) spelling with the messages to train.")
                continue
            sharegpt_spelling = entry.get("field_messages") == "conversations" or \
                entry.get("message_property_mappings", {}).get("content") == "value"
            kinds.add(("sharegpt", "template") if kind.startswith("chat_template") and sharegpt_spelling
                      else DATASET_TYPES[kind])
            splits.add(entry.get("split"))
            data_files = entry.get("data_files")
            if isinstance(data_files, list) and len(data_files) == 1:
                data_files = data_files[0]
            if isinstance(data_files, list):
                mapper.refuse(f"{where}.data_files", data_files, "several files in one entry: give one entry per file.")
                continue
            path = f"{entry['path']}/{data_files}" if data_files else entry["path"]  # data_files: inside `path`
            files.append(mapper.local_file(f"{where}.path", path))
        if len(kinds) > 1:
            mapper.refuse(key, value, "entries of different types in one run; lorakit reads one format per run.")
        if len(splits) > 1:
            mapper.refuse(key, value, "entries with different splits; give each file's examples as their own file.")
        if not files or len(kinds) != 1 or len(splits) != 1:
            return
        fmt, style = kinds.pop()
        mapper.set(target, files[0] if len(files) == 1 else files, key, given=value)
        if target == "data.train":
            mapper.set("data.format", fmt, f"{key}[].type", given=sorted({str(d.get("type", "alpaca")) for d in value}))
            if style != "template":
                mapper.set("data.prompt_style", style, f"{key}[].type (prompt)",
                           given=sorted({str(d.get("type", "alpaca")) for d in value}),
                           note="Axolotl's Alpaca prompt, not the chat template (alpaca_prompts.py)")
        split = splits.pop()
        if split:
            mapper.set(split_key, split, f"{key}[].split")
    return handle


def save_steps(mapper: Mapper, value: Any, key: str) -> None:
    if isinstance(value, float) and value < 1:
        mapper.ignore(key, value, "a fraction of the run: lorakit saves every train.save_steps")
    else:
        mapper.set("train.save_steps", int(value), key, given=value)


def total_batch(mapper: Mapper, value: Any, key: str) -> None:
    mapper.config["_total_batch"] = int(value)
    mapper.ignore(key, value, "the global batch: train.grad_accum = batch_size / micro_batch_size")


def finish(mapper: Mapper) -> None:
    """What needs several keys: Axolotl's target union, a total batch size, max_steps over num_epochs, its
    defaults for what the file left out."""
    if mapper.config.pop("_target_linear", False):
        named_modules = mapper.get("lora.target_modules") or []
        named_modules = [named_modules] if isinstance(named_modules, str) else list(named_modules)
        union = ["all-linear", *[m for m in named_modules if m != "all-linear"]]
        mapper.set("lora.target_modules", union if len(union) > 1 else "all-linear", "lora_target_linear",
                   note="every linear layer plus lora_target_modules (Axolotl's union)")
    elif mapper.get("lora.target_modules") is None:
        mapper.default("lora.target_modules", None, "Axolotl's default: PEFT's per-model targets (q_proj, v_proj "
                                                    "for Llama)")
    total = mapper.config.pop("_total_batch", None)
    if total and mapper.get("train.grad_accum") is None:
        micro = mapper.get("train.batch_size") or 1
        mapper.set("train.grad_accum", max(1, total // micro), "batch_size", given=total)
    if mapper.get("train.max_steps") is not None and mapper.get("train.epochs") is not None:
        mapper.drop("train.epochs", "num_epochs", "max_steps is set: it decides the run's length (as in Axolotl)")
    if mapper.get("train.max_steps") is None:
        mapper.default("train.epochs", 1.0, "Axolotl's default")
    for target, value in DEFAULTS.items():
        mapper.default(target, value, "Axolotl's default (ours differs)")


MAPPED = {
    "base_model": to("model"), "adapter": adapter, "load_in_4bit": load_in("nf4"), "load_in_8bit": load_in("int8"),
    "lora_model_dir": at_default(None, "continuing from an existing adapter is not supported by `lorakit train`."),
    "lora_r": to("lora.r"), "lora_alpha": to("lora.lora_alpha"), "lora_dropout": to("lora.lora_dropout"),
    "lora_target_modules": to("lora.target_modules"), "lora_target_linear": target_linear,
    "lora_modules_to_save": to("lora.modules_to_save"), "lora_fan_in_fan_out": to("lora.fan_in_fan_out"),
    "lora_rank_pattern": to("lora.rank_pattern"), "lora_alpha_pattern": to("lora.alpha_pattern"),
    "peft_layers_to_transform": to("lora.layers_to_transform"), "peft_layers_pattern": to("lora.layers_pattern"),
    "peft_use_dora": to("lora.use_dora"), "peft_use_rslora": to("lora.use_rslora"),
    "peft_init_lora_weights": to("lora.init_lora_weights"), "loraplus_lr_ratio": to("train.loraplus_lr_ratio"),
    "loraplus_lr_embedding": to("train.loraplus_lr_embedding"), "bnb_config_kwargs": bnb_config_kwargs,
    "datasets": datasets("data.train"), "test_datasets": datasets("data.eval"), "val_set_size": eval_split,
    "output_dir": to("output_dir"), "sequence_len": to("data.max_seq_len"), "excess_length_strategy": excess_length,
    "sample_packing": to("data.packing"), "train_on_inputs": to("data.train_on_prompt"),
    "micro_batch_size": to("train.batch_size"), "gradient_accumulation_steps": to("train.grad_accum"),
    "batch_size": total_batch, "eval_batch_size": to("eval.batch_size"), "num_epochs": to("train.epochs"),
    "max_steps": to("train.max_steps"), "learning_rate": to("train.learning_rate"), "lr_scheduler": scheduler,
    "warmup_steps": to("train.warmup_steps"), "warmup_ratio": to("train.warmup_ratio"),
    "optimizer": named(OPTIMIZERS, "train.optimizer", "optimizer"), "weight_decay": to("train.weight_decay"),
    "max_grad_norm": to("train.max_grad_norm"), "adam_beta1": to("train.adam_beta1"),
    "adam_beta2": to("train.adam_beta2"), "adam_epsilon": to("train.adam_epsilon"), "adam_eps": to("train.adam_epsilon"),
    "seed": to("train.seed"), "logging_steps": to("train.logging_steps"), "eval_steps": to("train.eval_steps"),
    "save_steps": save_steps, "save_total_limit": to("train.keep_checkpoints"),
    "gradient_checkpointing": to("train.gradient_checkpointing", bool), "bf16": precision("bf16"),
    "fp16": precision("fp16"), "eval_max_new_tokens": to("eval.max_new_tokens"), "chat_template": chat_template,
    "special_tokens": special_tokens, "debug": ignore("use `lorakit --verbose`"),
    "bfloat16": at_default(None, "the base is loaded in fp32 and trained with bf16 autocast (train.bf16), not "
                                 "loaded in half precision"),
    "float16": at_default(None, "the base is loaded in fp32; fp16 training is train.fp16 (GPUs)"),
}


@cache
def handlers() -> dict:
    return {**schema_handlers(), **MAPPED}
