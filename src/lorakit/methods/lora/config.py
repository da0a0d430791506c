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

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lorakit.errors import ConfigError, closest
from lorakit.methods.config_fields import (
    check_target_fields,
    check_task_type,
    compile_regex,
    config_dict,
    is_int,
    is_number,
    peft_dict_fields,
    reject_unknown_fields,
)

# PEFT's defaults when target_modules is None (the architectures our users bring most).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"], "opt": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"], "bloom": ["query_key_value"], "bert": ["query", "value"],
    "roberta": ["query", "value"], "t5": ["q", "v"],
}

PEFT_TYPE = "LORA"
BIAS_MODES = ("none", "all", "lora_only")
INIT_METHODS = (True, False, "gaussian", "pissa", "olora")  # and "pissa_niter_K"


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
# What people type when they come from papers or other tools.
_SYNONYMS = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "target_modules",
             "target": "target_modules", "rslora": "use_rslora", "dora": "use_dora", "init": "init_lora_weights"}


@reject_unknown_fields(_SYNONYMS)
@dataclass
class LoraConfig:
    """What to adapt and how. See the module docstring for the maths."""

    peft_type: ClassVar[str] = PEFT_TYPE  # which method reads this config (methods/registry.py)
    default_targets: ClassVar[dict[str, list[str]]] = DEFAULT_TARGETS  # when target_modules is None
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
        check_target_fields(self)
        self._check_layers()
        self._check_patterns()

    # -- validation -------------------------------------------------------------------
    def _check_numbers(self) -> None:
        if not is_int(self.r) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer (the LoRA rank), got {self.r!r}.")
        if not is_number(self.lora_alpha) or self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}.")
        if not is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
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
        self.task_type = check_task_type(self.task_type)
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
        indices = [layers] if is_int(layers) else layers
        if not isinstance(indices, (list, tuple)) or not all(is_int(i) and i >= 0 for i in indices):
            raise ConfigError(f"layers_to_transform must be a non-negative int or a list of them, got {layers!r}.")
        self.layers_to_transform = layers if is_int(layers) else list(indices)
        if isinstance(self.target_modules, str):
            raise ConfigError(
                "layers_to_transform cannot be combined with a regex or 'all-linear' target_modules: "
                "give target_modules as a list of names, or put the layer numbers into the regex."
            )

    def _check_patterns(self) -> None:
        for name, pattern, check in (
            ("rank_pattern", self.rank_pattern, lambda v: is_int(v) and v > 0),
            ("alpha_pattern", self.alpha_pattern, lambda v: is_number(v) and v > 0),
        ):
            if not isinstance(pattern, dict):
                raise ConfigError(f"{name} must be a dict of module-name pattern -> value, got {pattern!r}.")
            for key, value in pattern.items():
                if not check(value):
                    raise ConfigError(f"{name}[{key!r}] must be a positive number, got {value!r}.")
                compile_regex(name, key)

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
        return config_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = False) -> LoraConfig:
        """Build from a PEFT adapter_config.json dict (config_fields.peft_dict_fields: keys from other
        PEFT versions are ignored when off, refused when on)."""
        return cls(**peft_dict_fields(cls, data, strict, _PEFT_KEYS_WHEN_OFF, _ALTERNATIVES, _SYNONYMS))


_ALTERNATIVES = {"trainable_token_indices": " To train token embeddings with lorakit, train the whole embedding "
                 "as a copy instead: modules_to_save=['embed_tokens'] (or the model's embedding module name)."}


# -- helpers ---------------------------------------------------------------------------
def _pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """PEFT's rule: key K applies to a module whose full name matches `(.*\\.)?(K)$`."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None
