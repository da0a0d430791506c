"""The fields every virtual-token config shares (PEFT's `PromptLearningConfig`), and what a model fills in.

PEFT's rule (`_prepare_prompt_learning_config`): `num_layers`, `token_dim` and
`num_attention_heads` come from the model's config when not set; for prefix tuning on a
grouped-query model, the prefix holds keys and values for the *key-value* heads, so
`token_dim` becomes head_dim × num_key_value_heads and `num_attention_heads` the KV heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from lorakit.errors import ConfigError
from lorakit.methods.config_fields import check_task_type, config_dict, is_int, peft_dict_fields


@dataclass
class VirtualTokenConfig:
    peft_type: ClassVar[str]
    bias: ClassVar[str] = "none"  # nothing of the base trains
    digest_fields: ClassVar[tuple[str, ...]] = ("num_virtual_tokens", "token_dim", "num_layers",
                                                "num_attention_heads", "num_transformer_submodules")

    num_virtual_tokens: int | None = None  # how many learned tokens (required)
    token_dim: int | None = None  # the model's hidden size (filled in from the model)
    num_transformer_submodules: int | None = None  # 1 for decoder-only models (filled in)
    num_attention_heads: int | None = None  # (filled in; prefix tuning: the key-value heads)
    num_layers: int | None = None  # (filled in)
    modules_to_save: list[str] | None = None  # PEFT's field; lorakit trains no module copies with these methods
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if not is_int(self.num_virtual_tokens) or self.num_virtual_tokens < 1:
            raise ConfigError(f"{type(self).__name__}: num_virtual_tokens must be a positive int (how many learned "
                              f"tokens), got {self.num_virtual_tokens!r}.")
        for name in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise ConfigError(f"{type(self).__name__}: {name} must be a positive int or None, got {value!r}.")
        if self.modules_to_save:
            raise ConfigError(f"{type(self).__name__}: modules_to_save is not supported with virtual tokens in "
                              "lorakit; train the module with a LoRA adapter alongside instead.")
        self.task_type = check_task_type(self.task_type)
        if self.task_type not in (None, "CAUSAL_LM"):
            raise ConfigError(f"{type(self).__name__}: lorakit runs virtual tokens on decoder-only causal LMs "
                              f"(task_type CAUSAL_LM); got {self.task_type!r}.")
        if not isinstance(self.inference_mode, bool):
            raise ConfigError(f"inference_mode must be True or False, got {self.inference_mode!r}.")

    def prepare(self, model: nn.Module) -> None:
        """Fill in the model's sizes (PEFT's `_prepare_prompt_learning_config`)."""
        config = getattr(model, "config", None)
        if config is None:
            raise ConfigError(f"{type(self).__name__} needs a transformers model (one with a config); "
                              f"{type(model).__name__} has none.")
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(config, "is_encoder_decoder", False):
            raise ConfigError(f"{type(self).__name__}: lorakit runs virtual tokens on decoder-only models; "
                              f"{type(model).__name__} is an encoder-decoder.")

        def read(*names: str) -> int:
            for name in names:
                if getattr(config, name, None) is not None:
                    return getattr(config, name)
            raise ConfigError(f"{type(self).__name__}: the model's config has none of {names}; set the field.")

        self.num_layers = self.num_layers or read("num_hidden_layers", "num_layers", "n_layer")
        self.token_dim = self.token_dim or read("hidden_size", "n_embd", "d_model")
        self.num_attention_heads = self.num_attention_heads or read("num_attention_heads", "n_head", "num_heads")
        self.num_transformer_submodules = self.num_transformer_submodules or 1

    def to_dict(self) -> dict[str, Any]:
        """The dict PEFT writes as adapter_config.json."""
        return config_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = False):
        """From a PEFT adapter_config.json dict (keys from other PEFT versions: config_fields.peft_dict_fields)."""
        return cls(**peft_dict_fields(cls, data, strict, {}, {}, {}))
