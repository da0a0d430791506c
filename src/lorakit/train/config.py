"""The training job's YAML: one dataclass per section, the dataclass is the schema.

    model: smollm2-135m-instruct   # built-in alias or a local transformers directory
    quantize: null                 # nf4 | fp4 | int8 (QLoRA)
    lora: {r: 16, lora_alpha: 32, lora_dropout: 0.05, target_modules: all-linear}
    data: {train: data/train.jsonl, eval: null, format: auto, max_seq_len: 512, packing: false}
    train: {max_steps: 200, batch_size: 8, learning_rate: 2.0e-4, ...}
    eval: {max_examples: 64, max_new_tokens: 48, samples: 3}
    register: {name: support, alias: staging}   # optional: push the adapter to the registry
    output_dir: runs/example

`lora:` takes every `LoraConfig` field; the keys given override the job's defaults one by
one (`lora: {r: 8}` keeps α=32, dropout 0.05 and all-linear targets). `--set
train.max_steps=10` overrides one value (parsed as YAML). Unknown keys name the closest valid
one; values of the wrong type say which key and what type.

Paths (`model` when it is a directory, `data.train`, `data.eval`, `output_dir`): one rule.
A relative path written in the YAML file is relative to the file's folder, wherever the
command runs (so a config can ship its data beside it); a relative path given with `--set`
is relative to the working directory, as any command-line path. The resolved absolute
paths are what config.yaml and report.md record.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorakit.base_models import DEFAULT_MODEL, is_builtin_model
from lorakit.errors import ConfigError, DataError, closest
from lorakit.methods.lora.config import LoraConfig
from lorakit.optim import OPTIMIZERS

DATA_FORMATS = ("auto", "messages", "prompt_completion", "text")
QUANTIZE = (None, "nf4", "fp4", "int8")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
# What people type when they come from Axolotl, LLaMA-Factory or HF TrainingArguments.
SYNONYMS = {"lr": "learning_rate", "steps": "max_steps", "micro_batch_size": "batch_size",
            "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
            "sequence_len": "max_seq_len", "cutoff_len": "max_seq_len", "lr_scheduler_type": "lr_scheduler",
            "sample_packing": "packing", "dataset": "train", "val_set_size": "eval_fraction",
            "save_total_limit": "keep_checkpoints", "base_model": "model", "load_in_4bit": "quantize"}


@dataclass
class DataConfig:
    train: str | None = None  # JSONL, JSON (a list of objects) or CSV
    eval: str | None = None  # optional; otherwise `eval_fraction` of train is held out
    format: str = "auto"  # messages | prompt_completion | text | auto (decided from the columns)
    max_seq_len: int = 512  # longer examples are cut (and counted); loss-free leftovers are dropped
    packing: bool = False  # several examples per row, attention kept within each example
    eval_fraction: float = 0.1
    train_on_prompt: bool = False  # True: the loss also covers prompt / user tokens
    chat_template: bool = True  # render prompt_completion with the tokenizer's chat template, if it has one


@dataclass
class TrainConfig:
    max_steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"
    loraplus_lr_ratio: float | None = None  # LoRA+: B's learning rate = ratio x A's (the paper suggests 16)
    loraplus_lr_embedding: float = 1e-6  # LoRA+: learning rate of embedding adapters
    seed: int = 42
    logging_steps: int = 5
    save_steps: int = 50
    eval_steps: int = 50
    keep_checkpoints: int = 2  # the newest K complete checkpoints are kept
    gradient_checkpointing: bool = False
    torch_compile: bool = False  # compile the decoder layers; the first step includes the compilation
    bf16: bool = False  # bf16 autocast (weights and adapters stay fp32), as GPU users train
    fp16: bool = False  # fp16 autocast with loss scaling; needs a CUDA GPU


@dataclass
class EvalConfig:
    max_examples: int = 64  # eval examples used for the before/after comparison
    max_new_tokens: int = 48  # greedy generation length for exact/contains match
    samples: int = 3  # side-by-side generations shown in the report
    batch_size: int = 8


@dataclass
class RegisterConfig:
    """Push the finished adapter to the registry (with this config, the data digest and the eval)."""

    name: str | None = None  # the adapter's registry name; unset: nothing is pushed
    alias: str | None = None  # e.g. staging
    registry: str | None = None  # a folder or database URL (default: $LORAKIT_REGISTRY, ~/.cache/lorakit/registry)
    blobs: str | None = None  # the blob folder, with a database URL


def _default_lora() -> dict[str, Any]:
    return {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}


@dataclass
class JobConfig:
    model: str = DEFAULT_MODEL
    quantize: str | None = None
    lora: dict[str, Any] = field(default_factory=_default_lora)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    output_dir: str = "runs/example"
    base_dir: Path = field(default=Path("."), repr=False, compare=False)  # the config file's folder; not a key

    def lora_config(self) -> LoraConfig:
        """The adapter's LoraConfig; its own errors are prefixed with the section name."""
        try:
            return LoraConfig(task_type="CAUSAL_LM", **{k: v for k, v in self.lora.items() if k != "task_type"})
        except ConfigError as exc:
            raise ConfigError(f"lora: {exc}") from None

    def data_path(self, which: str) -> Path | None:
        """`data.train` / `data.eval` (already absolute, see `resolve_paths`) as an existing file."""
        value = getattr(self.data, which)
        if value is None:
            return None
        path = Path(value)
        if not path.is_file():
            raise DataError(f"data.{which}: file {str(path)!r} not found (relative paths in a config file are "
                            f"relative to its folder, {self.base_dir}; with --set, to the working directory).")
        return path

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("base_dir")
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """{"train.max_steps": 4, ...}: every leaf of a nested config under its dotted key (the names
    `--set` takes), for diffs of saved configs."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_job_config(path: str | Path | None, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML file (or start from the defaults), apply `key.path=value` overrides, check it."""
    raw: dict[str, Any] = {}
    base_dir = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {str(path)!r} not found.")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys (model, lora, data, train, ...).")
        base_dir = path.resolve().parent
    given = {_apply_override(raw, item) for item in overrides or []}
    config = _build(JobConfig, raw, "")
    config.base_dir = base_dir
    resolve_paths(config, given)
    _check(config)
    return config


PATH_KEYS = ("model", "data.train", "data.eval", "output_dir")


def resolve_paths(config: JobConfig, from_command_line: set[str]) -> None:
    """Make every path absolute by the one rule in the module docstring (a built-in model alias stays a name)."""
    for key in PATH_KEYS:
        *section, leaf = key.split(".")
        owner = getattr(config, section[0]) if section else config
        value = getattr(owner, leaf)
        if value is None or (key == "model" and is_builtin_model(value)):
            continue
        anchor = Path.cwd() if key in from_command_line else config.base_dir
        path = anchor / Path(value).expanduser()  # an absolute value stays itself
        if key == "model" and not path.is_dir():
            continue  # neither alias nor directory: the loader's error names both
        setattr(owner, leaf, str(path.resolve()))


def _apply_override(raw: dict[str, Any], item: str) -> str:
    """Set one `key.path=value` in the raw mapping; returns the key."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value (e.g. train.max_steps=10), got {item!r}.")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section.")
    node[leaf] = yaml.safe_load(value) if value.strip() else None
    return key.strip()


def _build(cls, raw: Any, where: str):
    """A dataclass from a mapping, checking every key and coercing simple types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping, got {raw!r}.")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.name != "base_dir"]
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(
                f"Unknown key {where + str(key)!r}.{closest(str(key), fields, SYNONYMS)} Valid keys: {', '.join(fields)}."
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value if value is not None else {}, f"{where}{key}.")
        elif typing.get_origin(hint) is dict:  # a free-form section (lora:): given keys override the defaults
            default = next(f for f in dataclasses.fields(cls) if f.name == key).default_factory()
            values[key] = {**default, **_coerce({} if value is None else value, hint, where + key)}
        else:
            values[key] = _coerce(value, hint, where + key)
    return cls(**values)


def _coerce(value: Any, hint, key: str):
    """Accept YAML's spellings: "2e-4" (a string to PyYAML) is a float, 5 is a float too."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (typing.get_origin(hint) or hint,)
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, bool) and bool not in allowed:
        raise ConfigError(f"{key} must be {_type_name(allowed)}, got {value!r}.")
    for kind in allowed:
        if kind in (dict, list) and isinstance(value, kind):
            return value
        if isinstance(value, kind) and kind is not type(None):
            return value
    for kind in allowed:
        try:
            if kind is float and isinstance(value, int | str):
                return float(value)
            if kind is int and isinstance(value, str) and value.strip().lstrip("-").isdigit():
                return int(value)
        except ValueError:
            pass
    raise ConfigError(f"{key} must be {_type_name(allowed)}, got {value!r}.")


def _type_name(kinds) -> str:
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def _check(config: JobConfig) -> None:
    """Values that parse but make no sense; data files are checked when the data is read."""
    def choice(key: str, value, allowed) -> None:
        if value not in allowed:
            shown = ", ".join("null" if a is None else str(a) for a in allowed)
            raise ConfigError(f"{key} must be one of {shown}; got {value!r}.{closest(str(value), [str(a) for a in allowed])}")

    def positive(key: str, value, zero_ok: bool = False) -> None:
        if value < 0 or (value == 0 and not zero_ok):
            raise ConfigError(f"{key} must be {'>= 0' if zero_ok else '> 0'}, got {value!r}.")

    choice("quantize", config.quantize, QUANTIZE)
    choice("data.format", config.data.format, DATA_FORMATS)
    choice("train.lr_scheduler", config.train.lr_scheduler, SCHEDULERS)
    choice("train.optimizer", config.train.optimizer, OPTIMIZERS)
    if config.data.train is None:
        raise DataError("data.train is required: the path of a JSONL, JSON or CSV file of training examples.")
    if not 0 < config.data.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction must be between 0 and 1, got {config.data.eval_fraction!r}.")
    if not 0 <= config.train.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {config.train.warmup_ratio!r}.")
    for key in ("max_seq_len",):
        positive(f"data.{key}", getattr(config.data, key))
    for key in ("max_steps", "batch_size", "grad_accum", "learning_rate", "logging_steps", "save_steps",
                "eval_steps", "keep_checkpoints"):
        positive(f"train.{key}", getattr(config.train, key))
    for key in ("max_examples", "max_new_tokens", "batch_size"):
        positive(f"eval.{key}", getattr(config.eval, key))
    positive("eval.samples", config.eval.samples, zero_ok=True)
    if config.train.loraplus_lr_ratio is not None:
        positive("train.loraplus_lr_ratio", config.train.loraplus_lr_ratio)
    check_precision(config.train.bf16, config.train.fp16)
    lora = config.lora_config()  # LoraConfig's own checks, with "lora:" in front
    if lora.use_dora and str(lora.init_lora_weights).startswith("pissa_niter_"):
        raise ConfigError("lora: use_dora with init_lora_weights=pissa_niter_K cannot be saved faithfully: a DoRA adapter "
                          "cannot be converted to plain LoRA, and its residual base comes from a randomized SVD that "
                          "differs on every load. Use init_lora_weights: pissa (exact SVD) with DoRA.")


def check_precision(bf16: bool, fp16: bool) -> None:
    """Refuse a mixed precision this machine cannot run, saying why and what to use instead."""
    import torch

    if bf16 and fp16:
        raise ConfigError("train.bf16 and train.fp16 are both true; choose one (bf16 needs no loss scaling).")
    if fp16 and not torch.cuda.is_available():
        raise ConfigError("train.fp16 needs a CUDA GPU: fp16 training relies on loss scaling (GradScaler), which "
                          "accelerate and HF Trainer support on GPUs only. On this machine use train.bf16: true, or neither.")
    if bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.bf16: this GPU has no bf16 support (it needs compute capability 8.0, e.g. A100, "
                          "RTX 30xx or newer); use train.fp16: true instead.")
    if bf16 and not torch.cuda.is_available():
        try:  # torch's CPU autocast runs bf16 on any x86/ARM CPU it supports (emulated where no bf16 units exist)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                torch.ones(2, 2) @ torch.ones(2, 2)
        except RuntimeError as exc:
            raise ConfigError(f"train.bf16: this CPU cannot run bf16 autocast ({exc}); set train.bf16: false.") from None
