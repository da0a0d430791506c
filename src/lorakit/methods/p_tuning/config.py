"""`PromptEncoderConfig`: PEFT's names and defaults for P-tuning. The virtual tokens are an
embedding table passed through an MLP (two hidden layers) or a bidirectional LSTM + MLP
(`encoder_num_layers` LSTM layers) — a reparameterisation that trains better than the table alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from lorakit.errors import ConfigError
from lorakit.methods.config_fields import is_int, is_number, reject_unknown_fields
from lorakit.methods.virtual_tokens.config import VirtualTokenConfig

ENCODERS = ("MLP", "LSTM")


@reject_unknown_fields()
@dataclass
class PromptEncoderConfig(VirtualTokenConfig):
    peft_type: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None  # default: token_dim
    encoder_num_layers: int = 2  # LSTM layers (the MLP always has PEFT's fixed three linears)
    encoder_dropout: float = 0.0  # between LSTM layers

    def __post_init__(self) -> None:
        super().__post_init__()
        kind = str(getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type))
        if kind not in ENCODERS:
            raise ConfigError(f"encoder_reparameterization_type must be one of {list(ENCODERS)}, got {kind!r}.")
        self.encoder_reparameterization_type = kind
        if self.encoder_hidden_size is not None and (not is_int(self.encoder_hidden_size) or self.encoder_hidden_size < 1):
            raise ConfigError(f"encoder_hidden_size must be a positive int, got {self.encoder_hidden_size!r}.")
        if not is_int(self.encoder_num_layers) or self.encoder_num_layers < 1:
            raise ConfigError(f"encoder_num_layers must be a positive int, got {self.encoder_num_layers!r}.")
        if not is_number(self.encoder_dropout) or not 0 <= self.encoder_dropout < 1:
            raise ConfigError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}.")

    def prepare(self, model: nn.Module) -> None:
        super().prepare(model)
        self.encoder_hidden_size = self.encoder_hidden_size or self.token_dim
