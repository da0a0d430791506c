"""`PromptEncoder`: P-tuning's virtual tokens, an embedding table through an MLP or an LSTM + MLP.

Module and parameter names are PEFT's (`embedding`, `mlp_head`, `lstm_head`), so state dicts
move both ways. PEFT saves the encoder's *output* (`prompt_embeddings`): the reparameterisation
only helps training, and a loaded adapter is that table (`encoder.py` of prompt_tuning's shape).
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.methods.p_tuning.config import PromptEncoderConfig


class PromptEncoder(nn.Module):
    places = "inputs"

    def __init__(self, config: PromptEncoderConfig, device: torch.device | None = None):
        super().__init__()
        dim, hidden = config.token_dim, config.encoder_hidden_size
        self.encoder_type = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(config.num_virtual_tokens * config.num_transformer_submodules, dim)
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(input_size=dim, hidden_size=hidden, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(hidden * 2, hidden * 2), nn.ReLU(), nn.Linear(hidden * 2, dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))
        self.to(device)

    def virtual_tokens(self) -> torch.Tensor:
        table = self.embedding.weight[None]  # (1, n, dim): one row, as PEFT runs it
        if self.encoder_type == "LSTM":
            table = self.lstm_head(table)[0]
        return self.mlp_head(table)[0]
