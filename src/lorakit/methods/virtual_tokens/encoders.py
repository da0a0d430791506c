"""`VirtualTokenEncoders`: every virtual-token adapter of a model, by name (PEFT's `prompt_encoder`).

It sits in the tuner beside the wrapped model (not inside it), so parameter names read
`base_model.prompt_encoder.<adapter>.…` and target matching never sees it. It answers the
same calls the tuner makes of adapted layers (which adapters it holds, trainability,
deletion), so adding or removing one of these adapters is a dict entry, never module
surgery in the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn


class VirtualTokenTable(nn.Module):
    """A loaded adapter: its saved virtual tokens as a table. PEFT saves an encoder's *output*
    (P-tuning's MLP, prefix tuning's projection run once), so that is all a file holds."""

    def __init__(self, tokens: torch.Tensor, places: str, device: torch.device | None = None):
        super().__init__()
        self.places = places
        self.embedding = nn.Embedding(*tokens.shape, device=device, dtype=tokens.dtype)
        with torch.no_grad():
            self.embedding.weight.copy_(tokens)

    def virtual_tokens(self) -> torch.Tensor:
        return self.embedding.weight


class VirtualTokenEncoders(nn.ModuleDict):
    """adapter name → encoder (a module with `places` and `virtual_tokens()`)."""

    @property
    def adapters(self) -> list[str]:
        return list(self.keys())

    def delete_adapter(self, name: str) -> None:
        del self[name]

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        return self[name].parameters()

    def set_trainable(self, names: Sequence[str], trainable: bool) -> None:
        for name in self.keys():
            self.set_requires_grad(name, trainable and name in names)

    def set_requires_grad(self, name: str, requires_grad: bool) -> None:
        self[name].requires_grad_(requires_grad)
