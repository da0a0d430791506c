"""`BottleneckConfig`: bottleneck adapters — lorakit's own config and file format (PEFT has none).

Each adapted sublayer output h becomes

    h + W_up · f(W_down · h + b_down) + b_up        (residual=True; without: W_up · f(…) + b_up)

with W_down: (d / reduction_factor, d), f the non-linearity. Placement (`architecture`):
"houlsby" — after the attention block's output projection and after the MLP's (two adapters
per transformer layer, Houlsby et al. 2019, Fig. 2); "pfeiffer" — after the MLP only (Pfeiffer
et al. 2020, AdapterFusion). `target_modules` overrides the placement. W_up and both biases
start at zero, so a new adapter is exactly the identity (Houlsby's near-identity init, taken to
its limit; `init_weights=False` draws W_up at random instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lorakit.errors import ConfigError
from lorakit.methods.config_fields import (
    check_target_fields,
    config_dict,
    is_int,
    peft_dict_fields,
    reject_unknown_fields,
)

ARCHITECTURES = ("houlsby", "pfeiffer")
NON_LINEARITIES = ("relu", "gelu", "swish", "silu", "tanh")
# where each architecture puts its adapters, by model type: the attention output projection, the MLP's output
PLACEMENT: dict[str, dict[str, list[str]]] = {
    "houlsby": {"llama": ["o_proj", "down_proj"], "mistral": ["o_proj", "down_proj"], "qwen2": ["o_proj", "down_proj"],
                "qwen3": ["o_proj", "down_proj"], "gpt2": ["attn.c_proj", "mlp.c_proj"]},
    "pfeiffer": {"llama": ["down_proj"], "mistral": ["down_proj"], "qwen2": ["down_proj"], "qwen3": ["down_proj"],
                 "gpt2": ["mlp.c_proj"]},
}
_SYNONYMS = {"reduction": "reduction_factor", "activation": "non_linearity", "config": "architecture",
             "targets": "target_modules"}


@reject_unknown_fields(_SYNONYMS)
@dataclass
class BottleneckConfig:
    peft_type: ClassVar[str] = "BOTTLENECK"  # lorakit's own: PEFT has no bottleneck adapters
    bias: ClassVar[str] = "none"
    digest_fields: ClassVar[tuple[str, ...]] = (
        "architecture", "reduction_factor", "non_linearity", "residual", "target_modules", "exclude_modules",
        "layers_to_transform", "layers_pattern",
    )

    architecture: str = "houlsby"
    reduction_factor: int = 16  # bottleneck width = hidden size / reduction_factor
    non_linearity: str = "relu"
    residual: bool = True  # the adapter adds to its input (the identity at init)
    init_weights: bool = True  # True: W_up = 0 and zero biases (identity); False: W_up random too
    target_modules: list[str] | str | None = None  # default: the architecture's placement
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"architecture must be one of {list(ARCHITECTURES)}, got {self.architecture!r}.")
        if self.non_linearity not in NON_LINEARITIES:
            raise ConfigError(f"non_linearity must be one of {list(NON_LINEARITIES)}, got {self.non_linearity!r}.")
        if not is_int(self.reduction_factor) or self.reduction_factor < 1:
            raise ConfigError(f"reduction_factor must be a positive int, got {self.reduction_factor!r}.")
        for flag in ("residual", "init_weights", "inference_mode"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be True or False, got {getattr(self, flag)!r}.")
        check_target_fields(self)

    @property
    def default_targets(self) -> dict[str, list[str]]:
        return PLACEMENT[self.architecture]

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = False) -> BottleneckConfig:
        return cls(**peft_dict_fields(cls, data, strict, {}, {}, _SYNONYMS))
