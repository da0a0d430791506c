"""`LoraConfig`: every LoRA knob, named and defaulted as in HF PEFT.

The LoRA update of a frozen weight W (out × in) is

    W' = W + s · B A,     A: r × in,  B: out × r,   s = α / r   (or α / √r with rsLoRA)

(Hu et al. 2021, §4.1; rsLoRA: Kalajdzievski 2023, which shows α/r shrinks the update
as r grows and α/√r keeps it rank-stable). With `init_lora_weights=True`, A is
Kaiming-uniform and B is zero, so the wrapped model starts exactly at the base model.

The dataclass is the signature: fields are PEFT's names, so `LoraConfig(**peft_kwargs)`
and PEFT's `adapter_config.json` both work. Bad values raise `ConfigError` naming the
field and what is allowed; an unknown field names the closest valid one.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lorakit.errors import ConfigError, closest

PEFT_TYPE = "LORA"
BIAS_MODES = ("none", "all", "lora_only")
INIT_METHODS = (True, False, "gaussian", "pissa", "olora")  # and "pissa_niter_K"


class TaskType(enum.StrEnum):
    """PEFT's task types. Only SEQ_CLS changes behaviour: its head becomes trainable."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


# Keys PEFT writes into adapter_config.json for features lorakit does not implement. A file
# is accepted when they hold PEFT's "off" value; otherwise we refuse rather than load an
# adapter whose numbers we would silently compute differently.
_PEFT_KEYS_WHEN_OFF: dict[str, Any] = {
    "megatron_config": None, "megatron_core": "megatron.core", "loftq_config": {},
    "eva_config": None, "corda_config": None, "lora_ga_config": None, "velora_config": None,
    "alora_invocation_tokens": None, "use_qalora": False, "qalora_group_size": 16,
    "monteclora_config": None, "layer_replication": None, "target_parameters": None,
    "use_bdlora": None, "arrow_config": None, "kasa_config": None, "ensure_weight_tying": False,
    "trainable_token_indices": None,
}
_PEFT_BOOKKEEPING_KEYS = ("peft_type", "auto_mapping", "peft_version", "runtime_config")
# What people type when they come from papers or other tools.
_SYNONYMS = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "target_modules",
             "target": "target_modules", "rslora": "use_rslora", "dora": "use_dora", "init": "init_lora_weights"}


def _reject_unknown_fields(cls):
    """Wrap the dataclass __init__ so a misspelt field names the closest valid one."""
    init = cls.__init__
    valid = [f.name for f in dataclasses.fields(cls)]

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        for key in kwargs:
            if key not in valid:
                raise ConfigError(
                    f"LoraConfig has no field {key!r}.{closest(key, valid, _SYNONYMS)} Valid fields: {', '.join(valid)}."
                )
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@_reject_unknown_fields
@dataclass
class LoraConfig:
    """What to adapt and how. See the module docstring for the maths."""

    peft_type: ClassVar[str] = PEFT_TYPE  # which method reads this config (methods/registry.py)
    # The fields that change the adapter's numbers: their digest is saved with the weights (io.py).
    digest_fields: ClassVar[tuple[str, ...]] = (
        "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "exclude_modules", "layers_to_transform",
        "layers_pattern", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "bias", "modules_to_save", "use_dora",
        "lora_bias",
    )

    r: int = 8  # rank of A and B
    lora_alpha: float = 8  # scaling numerator: s = lora_alpha / r (or / sqrt(r) with use_rslora)
    lora_dropout: float = 0.0  # dropout on the LoRA path's input only; the base path never drops
    # Names (a module matches if its name equals one or ends with ".name"), a regex matched
    # against the full module name, or "all-linear" (every Linear/Conv1D but the output head).
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None  # same matching rules, applied first
    layers_to_transform: list[int] | int | None = None  # only these layer indices (list targets only)
    layers_pattern: list[str] | str | None = None  # the name of the layer list, e.g. "layers" or "h"
    bias: str = "none"  # which biases train: none | all | lora_only (those of adapted layers)
    modules_to_save: list[str] | None = None  # whole modules trained as copies (e.g. a classifier)
    use_rslora: bool = False  # s = α/√r: rank-stabilized scaling
    # True: A Kaiming, B 0 | "gaussian": A ~ N(0, 1/r), B 0 | False: random B | "pissa", "pissa_niter_K",
    # "olora": A, B from the base weight, which keeps the residual (layers/init.py)
    init_lora_weights: bool | str = True
    fan_in_fan_out: bool = False  # weight stored as (in, out), as in GPT-2's Conv1D (set automatically)
    rank_pattern: dict[str, int] = field(default_factory=dict)  # per-module r, by name regex
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # per-module alpha, by name regex
    task_type: str | None = None  # PEFT's TaskType; SEQ_CLS makes "classifier"/"score" trainable
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False  # True: adapter weights are frozen
    use_dora: bool = False  # DoRA: a learned magnitude per output feature (layers/dora.py)
    lora_bias: bool = False  # reserved: a bias on lora_B is not implemented yet

    def __post_init__(self) -> None:
        self._check_numbers()
        self._check_choices()
        self.target_modules = _names_or_regex("target_modules", self.target_modules)
        self.exclude_modules = _names_or_regex("exclude_modules", self.exclude_modules)
        self.layers_pattern = _names_or_regex("layers_pattern", self.layers_pattern)
        if self.modules_to_save is not None:
            self.modules_to_save = _name_list("modules_to_save", self.modules_to_save)
        self._check_layers()
        self._check_patterns()

    # -- validation -------------------------------------------------------------------
    def _check_numbers(self) -> None:
        if not _is_int(self.r) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer (the LoRA rank), got {self.r!r}.")
        if not _is_number(self.lora_alpha) or self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}.")
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}.")

    def _check_choices(self) -> None:
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}.{closest(str(self.bias), BIAS_MODES)}")
        if isinstance(self.init_lora_weights, str):
            self.init_lora_weights = self.init_lora_weights.lower()
        init = self.init_lora_weights
        if (init not in INIT_METHODS and not (isinstance(init, str) and re.fullmatch(r"pissa_niter_[1-9]\d*", init))) or (
            isinstance(init, int) and not isinstance(init, bool)
        ):
            raise ConfigError(
                f"init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_K' (K ≥ 1) or 'olora'; "
                f"got {init!r}.{closest(str(init), [str(m) for m in INIT_METHODS])}"
            )
        if self.task_type is not None:
            allowed = [t.value for t in TaskType]
            value = self.task_type.value if isinstance(self.task_type, TaskType) else self.task_type
            if value not in allowed:
                raise ConfigError(f"task_type must be one of {allowed} or None, got {self.task_type!r}.{closest(str(value), allowed)}")
            self.task_type = value
        for flag in ("use_rslora", "fan_in_fan_out", "inference_mode"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be True or False, got {getattr(self, flag)!r}.")
        if self.lora_bias:
            raise ConfigError("lora_bias=True is not supported by this version of lorakit; set it to False.")

    def _check_layers(self) -> None:
        layers = self.layers_to_transform
        if layers is None:
            if self.layers_pattern:
                raise ConfigError("layers_pattern only has a meaning together with layers_to_transform.")
            return
        indices = [layers] if _is_int(layers) else layers
        if not isinstance(indices, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in indices):
            raise ConfigError(f"layers_to_transform must be a non-negative int or a list of them, got {layers!r}.")
        self.layers_to_transform = layers if _is_int(layers) else list(indices)
        if isinstance(self.target_modules, str):
            raise ConfigError(
                "layers_to_transform cannot be combined with a regex or 'all-linear' target_modules: "
                "give target_modules as a list of names, or put the layer numbers into the regex."
            )

    def _check_patterns(self) -> None:
        for name, pattern, check in (
            ("rank_pattern", self.rank_pattern, lambda v: _is_int(v) and v > 0),
            ("alpha_pattern", self.alpha_pattern, lambda v: _is_number(v) and v > 0),
        ):
            if not isinstance(pattern, dict):
                raise ConfigError(f"{name} must be a dict of module-name pattern -> value, got {pattern!r}.")
            for key, value in pattern.items():
                if not check(value):
                    raise ConfigError(f"{name}[{key!r}] must be a positive number, got {value!r}.")
                _compile(name, key)

    # -- per-module values -------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        """r for one module: the first `rank_pattern` key matching the name's tail, else `r`."""
        key = _pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = _pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling_for(self, module_name: str) -> float:
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # -- PEFT's adapter_config.json -----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The dict PEFT writes as adapter_config.json (PEFT reads it back unchanged)."""
        out: dict[str, Any] = {"peft_type": PEFT_TYPE}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = sorted(value) if f.name == "target_modules" and isinstance(value, list) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = False) -> LoraConfig:
        """Build from a PEFT adapter_config.json dict, as PEFT reads files from other versions.

        A key we do not know is ignored (with one warning) when it is switched off — null, false,
        empty, or PEFT's "off" value for the features listed in `_PEFT_KEYS_WHEN_OFF` — as with
        alpaca-lora's `enable_lora: null, merge_weights: false`. A key that is switched on may
        change the adapter's numbers, so it is refused: loading it would silently compute
        something else. `strict` (a file lorakit wrote, which never holds unknown keys) refuses
        every unknown key: there it is an edit or corruption. (`LoraConfig(**kwargs)` stays
        strict too: there an unknown key is a typo.)
        """
        data = dict(data)
        peft_type = data.get("peft_type", PEFT_TYPE)
        if peft_type != PEFT_TYPE:
            raise ConfigError(f"peft_type is {peft_type!r}; lorakit reads only LoRA adapters (peft_type 'LORA').")
        for key in _PEFT_BOOKKEEPING_KEYS:
            data.pop(key, None)
        known = {f.name for f in dataclasses.fields(cls)}
        ignored = []
        for key in [k for k in data if k not in known]:
            value = data.pop(key)
            if strict:
                raise ConfigError(f"Unknown key {key!r} in a config lorakit wrote (edited or corrupted?)."
                                  f"{closest(key, known, _SYNONYMS)}")
            if key in _PEFT_KEYS_WHEN_OFF and value in (_PEFT_KEYS_WHEN_OFF[key], None, False, {}, []):
                continue  # a PEFT feature we know, switched off: nothing to say
            if value in (None, False, "", {}, []):
                ignored.append(f"{key}={value!r}")
            elif key in _PEFT_KEYS_WHEN_OFF:
                raise ConfigError(f"The adapter uses PEFT's {key}={value!r}, which lorakit does not support."
                                  + _ALTERNATIVES.get(key, ""))
            else:
                raise ConfigError(
                    f"The adapter config sets {key}={value!r}, a key this version of lorakit does not know (the file was "
                    f"probably written by a newer PEFT, or edited).{closest(key, known, _SYNONYMS)} It is switched on and "
                    "may change the adapter's numbers, so it is refused rather than ignored; if you know it does not, "
                    "delete the key from adapter_config.json."
                )
        if ignored:
            warnings.warn(f"adapter_config.json: ignored keys lorakit does not know, all switched off: {', '.join(ignored)} "
                          "(written by an older or newer PEFT).", stacklevel=3)
        return cls(**data)


_ALTERNATIVES = {"trainable_token_indices": " To train token embeddings with lorakit, train the whole embedding "
                 "as a copy instead: modules_to_save=['embed_tokens'] (or the model's embedding module name)."}


# -- helpers ---------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _name_list(field_name: str, value: Any) -> list[str]:
    if isinstance(value, (list, tuple, set, frozenset)) and value and all(isinstance(v, str) and v for v in value):
        return list(dict.fromkeys(sorted(value) if isinstance(value, (set, frozenset)) else value))
    raise ConfigError(f"{field_name} must be a non-empty list of module names, got {value!r}.")


def _names_or_regex(field_name: str, value: Any) -> list[str] | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value.lower() == "all-linear":
            return "all-linear"
        _compile(field_name, value)
        return value
    return _name_list(field_name, value)


def _compile(field_name: str, pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{field_name}: {pattern!r} is not a valid regular expression ({exc}).") from None


def _pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """PEFT's rule: key K applies to a module whose full name matches `(.*\\.)?(K)$`."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None
