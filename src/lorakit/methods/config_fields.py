"""What every method's config shares: PEFT's task types, field checks, strict construction, and
reading adapter_config.json dicts written by other PEFT versions (one rule for all methods)."""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import re
import warnings
from typing import Any

from lorakit.errors import ConfigError, closest

PEFT_BOOKKEEPING_KEYS = ("peft_type", "auto_mapping", "peft_version", "runtime_config")


class TaskType(enum.StrEnum):
    """PEFT's task types. Only SEQ_CLS changes behaviour: its head becomes trainable."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


def reject_unknown_fields(synonyms: dict[str, str] | None = None):
    """Class decorator (over @dataclass): a misspelt field names the closest valid one."""
    def wrap(cls):
        init = cls.__init__
        valid = [f.name for f in dataclasses.fields(cls)]

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            for key in kwargs:
                if key not in valid:
                    raise ConfigError(f"{cls.__name__} has no field {key!r}.{closest(key, valid, synonyms)} "
                                      f"Valid fields: {', '.join(valid)}.")
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        return cls
    return wrap


def peft_dict_fields(cls, data: dict[str, Any], strict: bool, when_off: dict[str, Any],
                     alternatives: dict[str, str], synonyms: dict[str, str]) -> dict[str, Any]:
    """The fields of `cls` in a PEFT adapter_config.json dict, as PEFT reads files from other versions.

    A key we do not know is ignored (with one warning) when it is switched off — null, false,
    empty, or PEFT's "off" value for the features listed in `when_off` (silently) — as with
    alpaca-lora's `enable_lora: null, merge_weights: false`. A key that is switched on may
    change the adapter's numbers, so it is refused: loading it would silently compute
    something else. `strict` (a file lorakit wrote, which never holds unknown keys) refuses
    every unknown key: there it is an edit or corruption. (Constructing a config in code stays
    strict too: there an unknown key is a typo.)
    """
    data = dict(data)
    peft_type = data.get("peft_type", cls.peft_type)
    if peft_type != cls.peft_type:
        raise ConfigError(f"peft_type is {peft_type!r}; {cls.__name__} reads {cls.peft_type!r} adapters.")
    for key in PEFT_BOOKKEEPING_KEYS:
        data.pop(key, None)
    known = {f.name for f in dataclasses.fields(cls)}
    ignored = []
    for key in [k for k in data if k not in known]:
        value = data.pop(key)
        if strict:
            raise ConfigError(f"Unknown key {key!r} in a config lorakit wrote (edited or corrupted?)."
                              f"{closest(key, known, synonyms)}")
        if key in when_off and value in (when_off[key], None, False, {}, []):
            continue  # a PEFT feature we know, switched off: nothing to say
        if value in (None, False, "", {}, []):
            ignored.append(f"{key}={value!r}")
        elif key in when_off:
            raise ConfigError(f"The adapter uses PEFT's {key}={value!r}, which lorakit does not support."
                              + alternatives.get(key, ""))
        else:
            raise ConfigError(
                f"The adapter config sets {key}={value!r}, a key this version of lorakit does not know (the file was "
                f"probably written by a newer PEFT, or edited).{closest(key, known, synonyms)} It is switched on and "
                "may change the adapter's numbers, so it is refused rather than ignored; if you know it does not, "
                "delete the key from adapter_config.json."
            )
    if ignored:
        warnings.warn(f"adapter_config.json: ignored keys lorakit does not know, all switched off: {', '.join(ignored)} "
                      "(written by an older or newer PEFT).", stacklevel=4)
    return data


def check_task_type(value) -> str | None:
    if value is None:
        return None
    allowed = [t.value for t in TaskType]
    value = value.value if isinstance(value, TaskType) else value
    if value not in allowed:
        raise ConfigError(f"task_type must be one of {allowed} or None, got {value!r}.{closest(str(value), allowed)}")
    return value


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def name_list(field_name: str, value: Any) -> list[str]:
    if isinstance(value, (list, tuple, set, frozenset)) and value and all(isinstance(v, str) and v for v in value):
        return list(dict.fromkeys(sorted(value) if isinstance(value, (set, frozenset)) else value))
    raise ConfigError(f"{field_name} must be a non-empty list of module names, got {value!r}.")


def names_or_regex(field_name: str, value: Any) -> list[str] | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value.lower() == "all-linear":
            return "all-linear"
        compile_regex(field_name, value)
        return value
    return name_list(field_name, value)


def compile_regex(field_name: str, pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{field_name}: {pattern!r} is not a valid regular expression ({exc}).") from None


def check_target_fields(config) -> None:
    """Normalise the targeting fields every layer method shares (target_modules, exclude_modules,
    layers_pattern, modules_to_save) and the task type, in place; raises ConfigError naming the field."""
    config.target_modules = names_or_regex("target_modules", config.target_modules)
    config.exclude_modules = names_or_regex("exclude_modules", config.exclude_modules)
    config.layers_pattern = names_or_regex("layers_pattern", config.layers_pattern)
    if config.modules_to_save is not None:
        config.modules_to_save = name_list("modules_to_save", config.modules_to_save)
    config.task_type = check_task_type(config.task_type)


def config_dict(config) -> dict[str, Any]:
    """The dict PEFT writes as adapter_config.json: peft_type and every field (a target list sorted, as
    PEFT writes its set). `dataclasses.fields`, not `__dataclass_fields__`: it leaves out the ClassVars."""
    out: dict[str, Any] = {"peft_type": config.peft_type}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        out[field.name] = sorted(value) if field.name == "target_modules" and isinstance(value, list) else value
    return out
