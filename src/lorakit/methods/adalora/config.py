"""`AdaLoraConfig`: AdaLoRA's knobs, named and defaulted as in HF PEFT.

Three phases over `total_step` steps: `tinit` warm-up steps at the full `init_r`; then the
total rank budget falls on a cubic schedule from init_r × modules to `target_r` × modules,
re-allocated every `deltaT` steps to the singular triplets scored most important
(sensitivity |w·∂L/∂w| smoothed by `beta1`, its uncertainty by `beta2`); the last `tfinal`
steps fine-tune at the final ranks. `orth_reg_weight` keeps P and Q near-orthogonal (a
loss term). The ranks it ends with are `rank_pattern`: module → which of the init_r
triplets were kept, saved in adapter_config.json (PEFT's format) and used to size the
tensors on load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lorakit.errors import ConfigError
from lorakit.methods.config_fields import (
    check_target_fields,
    config_dict,
    is_int,
    is_number,
    peft_dict_fields,
    reject_unknown_fields,
)
from lorakit.methods.lora.config import _PEFT_KEYS_WHEN_OFF, DEFAULT_TARGETS

# LoraConfig fields PEFT's AdaLoraConfig inherits and writes, which AdaLoRA does not use (off values)
_WHEN_OFF = _PEFT_KEYS_WHEN_OFF | {"use_rslora": False, "use_dora": False, "lora_bias": False, "alpha_pattern": {}}
_SYNONYMS = {"rank": "init_r", "targets": "target_modules", "alpha": "lora_alpha", "dropout": "lora_dropout"}


@reject_unknown_fields(_SYNONYMS)
@dataclass
class AdaLoraConfig:
    peft_type: ClassVar[str] = "ADALORA"
    default_targets: ClassVar[dict[str, list[str]]] = DEFAULT_TARGETS
    digest_fields: ClassVar[tuple[str, ...]] = (
        "init_r", "lora_alpha", "target_modules", "exclude_modules", "fan_in_fan_out", "layers_to_transform",
        "layers_pattern", "rank_pattern",
    )

    init_r: int = 12  # the starting rank of every module
    target_r: int = 8  # the average rank the budget ends at
    tinit: int = 0  # warm-up steps at the full rank
    tfinal: int = 0  # final steps at the allocated ranks
    deltaT: int = 1  # steps between two allocations  # noqa: N815 (PEFT's name)
    beta1: float = 0.85  # EMA of the sensitivity
    beta2: float = 0.85  # EMA of its uncertainty
    orth_reg_weight: float = 0.5
    total_step: int | None = None  # required (the training job fills in its step count)
    rank_pattern: dict[str, list[bool]] | None = None  # set by the allocator: module.lora_E → kept triplets
    lora_alpha: float = 8  # scaling: alpha / init_r, fixed (PEFT's ranknum)
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_lora_weights: bool = True  # True: E = 0, A and B ~ N(0, 0.02); False: all N(0, 1)
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        for name in ("init_r", "target_r", "deltaT"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive int, got {getattr(self, name)!r}.")
        for name in ("tinit", "tfinal"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be a non-negative int, got {getattr(self, name)!r}.")
        for name in ("beta1", "beta2"):
            if not is_number(getattr(self, name)) or not 0 < getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in (0, 1), got {getattr(self, name)!r}.")
        if not is_number(self.orth_reg_weight) or self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight must be a number ≥ 0, got {self.orth_reg_weight!r}.")
        if not is_number(self.lora_alpha) or self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}.")
        if not is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.total_step is not None:
            self.check_schedule(self.total_step)
        if self.target_r > self.init_r:
            raise ConfigError(f"target_r ({self.target_r}) cannot exceed init_r ({self.init_r}): AdaLoRA only prunes.")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be none, all or lora_only, got {self.bias!r}.")
        check_target_fields(self)
        if self.rank_pattern is not None and not (isinstance(self.rank_pattern, dict) and all(
                isinstance(v, list) and len(v) == self.init_r and all(isinstance(b, bool) for b in v)
                for v in self.rank_pattern.values())):
            raise ConfigError(f"rank_pattern must map module names to {self.init_r} booleans (the kept triplets), "
                              "as the allocator writes it; an edited config?")

    def check_schedule(self, total_step: int) -> None:
        """PEFT's rule: the budget must have steps to fall in (tinit < total_step − tfinal)."""
        if not is_int(total_step) or total_step <= 0:
            raise ConfigError(f"total_step must be a positive int (the run's optimizer steps), got {total_step!r}.")
        if self.tinit >= total_step - self.tfinal:
            raise ConfigError(f"AdaLoRA needs tinit < total_step - tfinal to prune ranks; got tinit={self.tinit}, "
                              f"tfinal={self.tfinal}, total_step={total_step}.")

    def rank_for(self, module_name: str) -> int:
        """The module's rank: kept triplets in rank_pattern, else init_r."""
        kept = (self.rank_pattern or {}).get(f"{module_name}.lora_E")
        return sum(kept) if kept is not None else self.init_r

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = False) -> AdaLoraConfig:
        data = {k: v for k, v in data.items() if k != "r"}  # PEFT writes LoraConfig's r; AdaLoRA ignores it
        return cls(**peft_dict_fields(cls, data, strict, _WHEN_OFF, {}, _SYNONYMS))
