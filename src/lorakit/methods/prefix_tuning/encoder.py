"""`PrefixEncoder`: every layer's learned keys and values, as one (num_virtual_tokens, layers × 2 × dim)
table, or an embedding through PEFT's two-layer tanh MLP (`prefix_projection`). PEFT's names."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.methods.prefix_tuning.config import PrefixTuningConfig


class PrefixEncoder(nn.Module):
    places = "cache"  # in front of every layer's keys and values (virtual_tokens/inputs.py)

    def __init__(self, config: PrefixTuningConfig, device: torch.device | None = None):
        super().__init__()
        width = config.num_layers * 2 * config.token_dim
        self.prefix_projection = config.prefix_projection and not config.inference_mode
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(nn.Linear(config.token_dim, config.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, width))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)
        self.to(device)

    def virtual_tokens(self) -> torch.Tensor:
        """(num_virtual_tokens, layers × 2 × dim): for layer l, keys at [2l], values at [2l + 1] (PEFT's order)."""
        if self.prefix_projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight
