"""pydantic's validation errors rewritten as ours: the dotted key, the value given, what is
allowed (type, range or choices) and, for a misspelt key or choice, the closest valid one.

    Unknown key 'train.lr'. Did you mean 'learning_rate'? Valid keys: max_steps, epochs, ...
    train.max_steps must be > 0, got 0.
    quantize must be one of null, nf4, fp4, int8; got 'nf5'. Did you mean 'nf4'?
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from lorakit.errors import ConfigError, LorakitError, closest

# What people type when they come from Axolotl, LLaMA-Factory or HF TrainingArguments.
SYNONYMS = {"lr": "learning_rate", "steps": "max_steps", "micro_batch_size": "batch_size",
            "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
            "sequence_len": "max_seq_len", "cutoff_len": "max_seq_len", "lr_scheduler_type": "lr_scheduler",
            "sample_packing": "packing", "dataset": "train", "val_set_size": "eval_fraction",
            "save_total_limit": "keep_checkpoints", "base_model": "model", "load_in_4bit": "quantize",
            "num_epochs": "epochs", "num_train_epochs": "epochs"}
BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))

M = typing.TypeVar("M", bound=BaseModel)


def validated(model: type[M], raw: Any) -> M:
    """`model` built from `raw`, or a ConfigError; our own errors raised in validators keep their message."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of keys, got {raw!r:.80}.")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("; ".join(dict.fromkeys(_message(model, e) for e in exc.errors()))) from None


def reject_bools_for_numbers(cls, value: Any, info) -> Any:
    """pydantic reads `true` as 1 for an int field; in a config that is a mistake, not a number."""
    if isinstance(value, bool) and bool not in _members(cls.model_fields[info.field_name].annotation):
        raise ValueError("bool")
    return value


def type_name(kind) -> str:
    """"int", "float or null", "one of a, b": an annotation as the messages say it."""
    members = _members(kind)
    literal = [v for m in members if typing.get_origin(m) is Literal for v in typing.get_args(m)]
    if literal:
        return "one of " + ", ".join(_shown(v) for v in literal)
    names = {int: "int", float: "float", str: "str", bool: "bool", dict: "mapping", list: "list",
             type(None): "null", Any: "any"}
    return " or ".join(names.get(typing.get_origin(m) or m, getattr(m, "__name__", str(m))) for m in members)


def _message(model: type[BaseModel], error: dict) -> str:
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, LorakitError):  # a validator's own message says it all
        return str(cause)
    owner, names, info = _walk(model, error["loc"])
    key = ".".join(names)
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        valid = list(owner.model_fields)
        return f"Unknown key {key!r}.{closest(names[-1], valid, SYNONYMS)} Valid keys: {', '.join(valid)}."
    if kind == "missing":
        return f"{key} is required."
    if info is None:
        return f"{key or 'config'} must be a mapping, got {value!r:.80}."
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{key} must be {_range(info)}, got {value!r}."
    choices = [v for m in _members(info.annotation) if typing.get_origin(m) is Literal for v in typing.get_args(m)]
    if choices:
        shown = ", ".join(_shown(v) for v in choices)
        return f"{key} must be one of {shown}; got {value!r}.{closest(str(value), [str(c) for c in choices])}"
    if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
        return f"{key} must be a mapping of keys ({', '.join(info.annotation.model_fields)}), got {value!r:.80}."
    return f"{key} must be {type_name(info.annotation)}, got {value!r}."


def _walk(model: type[BaseModel], loc: tuple) -> tuple[type[BaseModel], list[str], FieldInfo | None]:
    """(the model owning the last key, the keys, that key's field) along an error's location;
    the location's tail past the last field (union members, list indices) is dropped."""
    owner, names, info = model, [], None
    for part in loc:
        if not isinstance(part, str):
            break
        if info is not None:  # one level down, if the field is a section
            if not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)):
                break
            owner = info.annotation
        names.append(part)
        info = owner.model_fields.get(part)
        if info is None:
            break  # an unknown key
    return owner, names, info


def _range(info: FieldInfo) -> str:
    parts = [f"{sign} {getattr(m, attr)}" for m in info.metadata for attr, sign in BOUNDS
             if getattr(m, attr, None) is not None]
    return " and ".join(parts)


def _members(kind) -> tuple:
    return typing.get_args(kind) if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union \
        else (kind,)


def _shown(value: Any) -> str:
    return "null" if value is None else str(value)
