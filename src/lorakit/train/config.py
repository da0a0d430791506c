"""The training job's YAML: one pydantic model per section; the models are the schema.

    model: smollm2-135m-instruct   # built-in alias or a local transformers directory
    quantize: null                 # nf4 | fp4 | int8 (QLoRA)
    method: lora                   # lora | ia3 | prompt_tuning | p_tuning | prefix_tuning | adalora | bottleneck
    lora: {r: 16, lora_alpha: 32, lora_dropout: 0.05, target_modules: all-linear}   # the method's section
    data: {train: data/train.jsonl, eval: null, format: auto, max_seq_len: 512, packing: false}
    train: {max_steps: 200, batch_size: 8, learning_rate: 2.0e-4, ...}
    eval: {max_examples: 64, max_new_tokens: 48, samples: 3}
    register: {name: support, alias: staging}   # optional: push the adapter to the registry
    output_dir: runs/example

Why pydantic (v2, `extra="forbid"`): types, ranges, choices and defaults are written once,
here, and the same models give `lorakit schema` (JSON Schema for editors), `--print-config`,
the key list of `lorakit train --help` and the defaults of `lorakit eval`. Its errors are
structured (location, kind, bounds), so they are rewritten into ours (`config_errors.py`: key,
value, allowed range, "did you mean"); it is already a dependency (FastAPI's), and our CLI is
typer's, which jsonargparse (LitGPT's choice, a CLI framework of its own) would duplicate.

`lora:` takes every `LoraConfig` field; the keys given override the job's defaults one by
one (`lora: {r: 8}` keeps α=32, dropout 0.05 and all-linear targets). Another `method:` reads
its own section the same way (`adalora: {...}`, … : train/methods.py). `--set
train.max_steps=10` overrides one value (parsed as YAML).

Paths (`model` when it is a directory, `data.train`, `data.eval`, `output_dir`): one rule.
A relative path written in the YAML file is relative to the file's folder, wherever the
command runs (so a config can ship its data beside it); a relative path given with `--set`
is relative to the working directory, as any command-line path. The resolved absolute
paths are what config.yaml and report.md record.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from lorakit.base_models import DEFAULT_MODEL, is_builtin_model
from lorakit.errors import ConfigError, DataError
from lorakit.methods.lora.config import LoraConfig
from lorakit.methods.table import METHODS
from lorakit.optim import OPTIMIZERS
from lorakit.train.config_errors import reject_bools_for_numbers, type_name, validated
from lorakit.train.methods import DEFAULT_LORA, METHOD_NAMES, adapter_config, section_values

DATA_FORMATS = ("auto", "messages", "prompt_completion", "text", "alpaca", "sharegpt")
QUANTIZE = (None, "nf4", "fp4", "int8")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")


class Section(BaseModel):
    """Unknown keys are errors; YAML's spellings ("2e-4", "5") are read as numbers, a bool is not one."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    _bools = field_validator("*", mode="before")(reject_bools_for_numbers)


class DataConfig(Section):
    train: str | list[str] | None = Field(None, description="Training data: JSONL, JSON (a list of objects) or CSV; "
                                                            "a list of files is read as one data set (required).")
    eval: str | list[str] | None = Field(None, description="Eval data; unset: data.eval_fraction of train is held out.")
    format: Literal[DATA_FORMATS] = Field(
        "auto", description="messages (chat, OpenAI fine-tuning JSONL) | prompt_completion | text | alpaca | sharegpt "
                            "| auto (decided from the columns).")
    max_seq_len: int = Field(512, gt=0, description="Longer examples are cut (and counted); loss-free leftovers dropped.")
    packing: bool = Field(False, description="Several examples per row, attention kept within each example.")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of train held out when data.eval is unset; 0: "
                                 "none (the before/after table then runs on training examples, and says so).")
    eval_count: int | None = Field(None, gt=0, description="A number of train examples to hold out, instead of "
                                                           "eval_fraction.")
    train_split: str | None = Field(None, description="An HF split slice of each training file, e.g. train[:20%].")
    eval_split: str | None = Field(None, description="An HF split slice of each eval file.")
    train_on_prompt: bool = Field(False, description="True: the loss also covers prompt / user tokens.")
    chat_template: bool = Field(True, description="Render prompt/completion pairs with the tokenizer's chat template.")
    prompt_style: Literal["template", "alpaca", "alpaca_chat"] = Field(
        "template", description="Alpaca records: the tokenizer's chat template, or Axolotl's Alpaca prompt "
                                "(alpaca: '### Instruction:', alpaca_chat: 'USER:'), as Axolotl's type: alpaca trains.")
    too_long: Literal["truncate", "drop"] = Field(
        "truncate", description="An example over max_seq_len: cut it (lorakit, LLaMA-Factory) or drop it (Axolotl).")


class TrainConfig(Section):
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps (default 200 when train.epochs is unset).")
    epochs: float | None = Field(None, gt=0, description="Passes over the training data, instead of max_steps.")
    batch_size: int = Field(8, gt=0, description="Examples per device per micro-step.")
    grad_accum: int = Field(1, gt=0, description="Micro-steps per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal[SCHEDULERS] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of the steps spent warming up.")
    warmup_steps: int | None = Field(None, ge=0, description="Warm-up steps; when set, warmup_ratio is not used.")
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0)
    optimizer: Literal[OPTIMIZERS] = "adamw"
    loraplus_lr_ratio: float | None = Field(None, gt=0, description="LoRA+: B's learning rate = ratio x A's (16).")
    loraplus_lr_embedding: float = Field(1e-6, gt=0, description="LoRA+: learning rate of embedding adapters.")
    seed: int = 42
    logging_steps: int = Field(5, gt=0)
    save_steps: int = Field(50, gt=0)
    eval_steps: int = Field(50, gt=0)
    keep_checkpoints: int = Field(2, gt=0, description="The newest K complete checkpoints are kept.")
    gradient_checkpointing: bool = False
    torch_compile: bool = Field(False, description="Compile the decoder layers; the first step includes compiling.")
    bf16: bool | Literal["auto"] = Field(False, description="bf16 autocast (weights and adapters stay fp32), as GPU "
                                                          "users train; auto: where the GPU has bf16 (decided when the "
                                                          "run starts).")
    fp16: bool = Field(False, description="fp16 autocast with loss scaling; needs a CUDA GPU.")
    fsdp: bool = Field(False, description="Shard the frozen base with FSDP (HF Trainer's fsdp; CUDA GPUs, under "
                                          "torchrun / --nproc).")
    fsdp_config: dict[str, Any] | None = Field(None, description="HF Trainer's fsdp_config (use_orig_params is set).")
    deepspeed: str | None = Field(None, description="A DeepSpeed JSON config for HF Trainer (needs deepspeed, CUDA).")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainConfig:
        if self.max_steps is not None and self.epochs is not None:
            raise ConfigError(f"train.max_steps ({self.max_steps}) and train.epochs ({self.epochs}) are both set; "
                              "give one (the other is derived from the data size).")
        if self.epochs is None and self.max_steps is None:
            object.__setattr__(self, "max_steps", 200)  # the default, without re-running validation
        return self

    @property
    def bf16_on(self) -> bool:
        """train.bf16 as this machine runs it: "auto" is bf16 where the GPU has it (Axolotl's rule), decided now
        — when the run starts, not when the config was written."""
        if self.bf16 == "auto":
            import torch

            return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return bool(self.bf16)

    def length(self) -> str:
        """How long the run is, as the user wrote it (for messages)."""
        return f"{self.max_steps} steps" if self.epochs is None else f"{self.epochs:g} epochs"


class EvalConfig(Section):
    max_examples: int = Field(64, gt=0, description="Eval examples used for the before/after comparison.")
    max_new_tokens: int = Field(48, gt=0, description="Greedy generation length for exact / contains match.")
    samples: int = Field(3, ge=0, description="Side-by-side generations shown in the report.")
    batch_size: int = Field(8, gt=0)


class RegisterConfig(Section):
    """Push the finished adapter to the registry (with this config, the data digest and the eval)."""

    name: str | None = Field(None, description="The adapter's registry name; unset: nothing is pushed.")
    alias: str | None = Field(None, description="An alias to point at the new version, e.g. staging.")
    registry: str | None = Field(None, description="A folder or database URL (default: $LORAKIT_REGISTRY).")
    blobs: str | None = Field(None, description="The blob folder or fsspec URL, with a database URL.")


# `register` shadows ABCMeta.register (a class method nobody calls on a config): pydantic warns when
# the class is made; the field reads and writes as any other.
warnings.filterwarnings("ignore", message='Field name "register" in "JobConfig"', category=UserWarning)


class JobConfig(Section):
    model: str = Field(DEFAULT_MODEL, description="Built-in alias or a local transformers directory.")
    quantize: Literal[QUANTIZE] = Field(None, description="Load the base in 4 or 8 bits (QLoRA): nf4 | fp4 | int8.")
    double_quant: bool = Field(True, description="4-bit bases: also quantize the quantization constants (QLoRA's "
                                                 "double quantization).")
    method: Literal[METHOD_NAMES] = Field("lora", description="The adapter method; its section (lora:, ia3:, "
                                          "adalora:, …) holds its config fields.")
    lora: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_LORA),
                                 description="LoraConfig fields; the keys given override the job's defaults.")
    # Every other method's section (ia3:, adalora:, …), one per entry of the method table (methods/table.py):
    for _spec in METHODS.values():
        if _spec.job_name != "lora":
            __annotations__[_spec.job_name] = "dict[str, Any] | None"
            vars()[_spec.job_name] = Field(None, description=f"{_spec.config_class.__name__} fields (method: "
                                                             f"{_spec.job_name}); the keys given override the job's "
                                                             "defaults for it.")
    del _spec
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    register: RegisterConfig = Field(default_factory=RegisterConfig)
    output_dir: str = "runs/example"
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)  # the config file's folder; not a key

    @field_validator("lora", mode="before")
    @classmethod
    def _over_defaults(cls, value: Any) -> Any:
        return {**DEFAULT_LORA, **value} if isinstance(value, dict) else {**DEFAULT_LORA} if value is None else value

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    def method_section(self) -> dict[str, Any]:
        """The chosen method's section, the job's defaults for it under the keys given."""
        return self.lora if self.method == "lora" else section_values(self.method, getattr(self, self.method))

    def adapter_config(self, total_steps: int | None = None) -> Any:
        """The adapter's config object (LoraConfig, AdaLoraConfig, …); errors prefixed with the section name.
        `total_steps`: the run's optimizer steps (AdaLoRA's schedule ends there)."""
        return adapter_config(self.method, self.method_section(), self.model, total_steps)

    def lora_config(self) -> LoraConfig | None:
        """The LoraConfig when method is lora (the LoRA-only rules ask), else None."""
        return self.adapter_config() if self.method == "lora" else None

    def data_paths(self, which: str) -> list[Path]:
        """`data.train` / `data.eval` (already absolute, see `resolve_paths`) as existing files."""
        value = getattr(self.data, which)
        paths = [] if value is None else [Path(v) for v in ([value] if isinstance(value, str) else value)]
        for path in paths:
            if not path.is_file():
                raise DataError(f"data.{which}: file {str(path)!r} not found (relative paths in a config file are "
                                f"relative to its folder, {self.base_dir}; with --set, to the working directory).")
        return paths

    def to_dict(self) -> dict[str, Any]:
        """The resolved job; the `lora:` defaults are left out when another method trains (read back, they
        would be a section the job refuses: a run's config.yaml must load for --resume and retrain)."""
        data = self.model_dump(mode="json")
        if self.method != "lora":
            data.pop("lora")
        return data

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


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's top-level mapping, or a ConfigError saying what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} not found.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (model, lora, data, train, ...).")
    return raw


def load_job_config(path: str | Path | None, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML file (ours, Axolotl's or LLaMA-Factory's) or start from the defaults, apply
    `key.path=value` overrides, check it."""
    from lorakit.train.foreign import to_lorakit

    raw: dict[str, Any] = {}
    base_dir = Path.cwd()
    if path is not None:
        raw = to_lorakit(read_yaml(path), Path(path)).config
        base_dir = Path(path).resolve().parent
    given = {_apply_override(raw, item) for item in overrides or []}
    config = validated(JobConfig, raw)
    config._base_dir = base_dir
    resolve_paths(config, given)
    check_job(config)
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
        paths = [anchor / Path(v).expanduser() for v in ([value] if isinstance(value, str) else value)]
        if key == "model" and not paths[0].is_dir():
            continue  # neither alias nor directory: the loader's error names both
        resolved = [str(path.resolve()) for path in paths]  # an absolute value stays itself
        setattr(owner, leaf, resolved[0] if isinstance(value, str) else resolved)


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


def check_job(config: JobConfig) -> None:
    """What a single field's type and range cannot say: the config is whole (`check_config`) and this
    machine runs its precision and sharding. Data files are checked when the data is read."""
    check_config(config)
    check_precision(config.train.bf16_on, config.train.fp16)
    check_sharding(config.train)


def check_config(config: JobConfig) -> None:
    """The checks that hold on any machine: data is given, one method's section, its adapter config builds
    (so `lora_r: sixteen` fails where it is written, not when a run starts)."""
    if not config.data.train:
        raise DataError("data.train is required: the path of a JSONL, JSON or CSV file of training examples.")
    given = [name for name in METHOD_NAMES if name not in ("lora", config.method) and getattr(config, name) is not None]
    if given or (config.method != "lora" and "lora" in config.model_fields_set):
        section = given[0] if given else "lora"
        raise ConfigError(f"The config has a {section}: section but trains method: {config.method}; set "
                          f"method: {section} to train it, or remove the section.")
    config.adapter_config(total_steps=1 << 30)  # the method's own checks, with its section in front
    lora = config.lora_config()
    if lora is not None and lora.use_dora and str(lora.init_lora_weights).startswith("pissa_niter_"):
        raise ConfigError("lora: use_dora with init_lora_weights=pissa_niter_K cannot be saved faithfully: a DoRA adapter "
                          "cannot be converted to plain LoRA, and its residual base comes from a randomized SVD that "
                          "differs on every load. Use init_lora_weights: pissa (exact SVD) with DoRA.")


def check_sharding(train: TrainConfig) -> None:
    """FSDP and DeepSpeed where HF Trainer runs them, or a refusal that says why: on a CPU,
    accelerate turns FSDP off and trains plain DDP without a word (measured), which is not what
    was asked for."""
    import importlib.util

    import torch

    if train.fsdp and train.deepspeed:
        raise ConfigError("train.fsdp and train.deepspeed are both set; choose one sharding engine.")
    if train.fsdp and not torch.cuda.is_available():
        raise ConfigError("train.fsdp needs CUDA GPUs: HF Trainer (accelerate) enables FSDP on GPUs only, and on this "
                          "CPU would train unsharded DDP instead. Drop train.fsdp: `--nproc N` trains with DDP here.")
    if train.deepspeed:
        if importlib.util.find_spec("deepspeed") is None or not torch.cuda.is_available():
            raise ConfigError("train.deepspeed needs the deepspeed package and CUDA GPUs (pip install deepspeed on the "
                              "GPU machine); on this machine use `--nproc N` (DDP).")
        if not Path(train.deepspeed).is_file():
            raise ConfigError(f"train.deepspeed: {train.deepspeed!r} is not a file (a DeepSpeed JSON config).")


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


def json_schema() -> dict[str, Any]:
    """The job's JSON Schema (`lorakit schema`), with `lora:` spelled out from LoraConfig's fields."""
    from pydantic import TypeAdapter

    schema = JobConfig.model_json_schema()
    lora = TypeAdapter(LoraConfig).json_schema()
    lora.pop("required", None)
    for key, value in DEFAULT_LORA.items():
        lora["properties"][key]["default"] = value
    lora["properties"].pop("task_type", None)
    schema["properties"]["lora"] = {**lora, "additionalProperties": False, "title": "Lora",
                                    "description": schema["properties"]["lora"]["description"]}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def documented_keys() -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, description) of every key but lora's: `lorakit train --help`."""
    rows = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            kind = info.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                walk(kind, f"{prefix}{name}.")
                continue
            default = info.get_default(call_default_factory=True)
            rows.append((prefix + name, type_name(kind), default, info.description or ""))

    walk(JobConfig, "")
    return rows

