"""`IA3Config`: (IA)³'s knobs, named and defaulted as in HF PEFT.

Each targeted linear layer learns one vector l: a "feedforward" layer rescales its input,
y = W(l ⊙ x) + b, any other its output, y = l ⊙ (Wx + b). l starts at 1 (the base model).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from lorakit.errors import ConfigError
from lorakit.methods.config_fields import (
    check_target_fields,
    is_int,
    names_or_regex,
    peft_dict_fields,
    reject_unknown_fields,
)

# PEFT's defaults when target_modules / feedforward_modules are not set (peft.utils.constants).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
    "qwen2": ["k_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"], "opt": ["q_proj", "k_proj", "fc2"],
    "bert": ["key", "value", "output.dense"], "roberta": ["key", "value", "output.dense"], "t5": ["k", "v", "wo"],
}
DEFAULT_FEEDFORWARD: dict[str, list[str]] = {
    "llama": ["down_proj"], "mistral": ["down_proj"], "qwen2": ["down_proj"], "gpt2": ["mlp.c_proj"], "opt": ["fc2"],
    "bert": ["output.dense"], "roberta": ["output.dense"], "t5": ["wo"],
}
_SYNONYMS = {"targets": "target_modules", "feedforward": "feedforward_modules", "init": "init_ia3_weights"}


@reject_unknown_fields(_SYNONYMS)
@dataclass
class IA3Config:
    peft_type: ClassVar[str] = "IA3"
    digest_fields: ClassVar[tuple[str, ...]] = (
        "target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out", "modules_to_save",
        "layers_to_transform", "layers_pattern",
    )
    default_targets: ClassVar[dict[str, list[str]]] = DEFAULT_TARGETS

    target_modules: list[str] | str | None = None  # names, a regex, or "all-linear" (as LoraConfig)
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None  # targets whose *input* is rescaled; must be targets
    fan_in_fan_out: bool = False  # weight stored as (in, out), as in GPT-2's Conv1D (set automatically)
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True  # l = 1 (the base model); False: random l
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    bias: ClassVar[str] = "none"  # (IA)³ trains no biases

    def __post_init__(self) -> None:
        check_target_fields(self)
        self.feedforward_modules = names_or_regex("feedforward_modules", self.feedforward_modules)
        for flag in ("fan_in_fan_out", "init_ia3_weights", "inference_mode"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be True or False, got {getattr(self, flag)!r}.")
        layers = self.layers_to_transform
        if layers is not None and not (is_int(layers) or (isinstance(layers, list) and all(map(is_int, layers)))):
            raise ConfigError(f"layers_to_transform must be an int or a list of ints, got {layers!r}.")
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list) \
                and not set(self.feedforward_modules) <= set(self.target_modules):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            raise ConfigError(f"feedforward_modules must be a subset of target_modules (as in PEFT); {extra} are not targets.")

    def to_dict(self) -> dict[str, Any]:
        """The dict PEFT writes as adapter_config.json."""
        out: dict[str, Any] = {"peft_type": self.peft_type}
        for field in dataclasses.fields(self):  # not `__dataclass_fields__`: it also lists the ClassVars
            name, value = field.name, getattr(self, field.name)
            if name in ("layers_to_transform", "layers_pattern") and value is None:
                continue  # ours, not in PEFT's IA3Config: written only when set
            out[name] = sorted(value) if name in ("target_modules", "feedforward_modules") and isinstance(value, list) \
                else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = False) -> IA3Config:
        """From a PEFT adapter_config.json dict (keys from other PEFT versions: config_fields.peft_dict_fields)."""
        return cls(**peft_dict_fields(cls, data, strict, {}, {}, _SYNONYMS))
