"""`PrefixTuningConfig`: PEFT's names and defaults. Each layer attends to `num_virtual_tokens` learned
key/value pairs first; `prefix_projection` trains them through an MLP (`encoder_hidden_size`) instead
of as a plain table (Li & Liang's reparameterisation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from lorakit.errors import ConfigError
from lorakit.methods.config_fields import is_int, reject_unknown_fields
from lorakit.methods.virtual_tokens.config import VirtualTokenConfig


@reject_unknown_fields()
@dataclass
class PrefixTuningConfig(VirtualTokenConfig):
    peft_type: ClassVar[str] = "PREFIX_TUNING"

    encoder_hidden_size: int | None = None  # default: token_dim
    prefix_projection: bool = False
    init_weights: str | None = None  # None: nn.Embedding's init; "zero": all zeros (PEFT's choices)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.prefix_projection, bool):
            raise ConfigError(f"prefix_projection must be True or False, got {self.prefix_projection!r}.")
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"init_weights must be None or 'zero', got {self.init_weights!r}.")
        if self.encoder_hidden_size is not None and (not is_int(self.encoder_hidden_size) or self.encoder_hidden_size < 1):
            raise ConfigError(f"encoder_hidden_size must be a positive int, got {self.encoder_hidden_size!r}.")

    def prepare(self, model: nn.Module) -> None:
        """As PEFT: on a grouped-query model the prefix holds the key-value heads' keys and values."""
        super().prepare(model)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        kv_heads = getattr(config, "num_key_value_heads", None)
        if kv_heads is not None and self.token_dim == getattr(config, "hidden_size", None):
            head_dim = getattr(config, "head_dim", None) or self.token_dim // self.num_attention_heads
            self.token_dim, self.num_attention_heads = head_dim * kv_heads, kv_heads
        self.encoder_hidden_size = self.encoder_hidden_size or self.token_dim
