"""AdaLoRA's SVD-form layer on nn.Linear / Conv1D (PEFT's `SVDLinear`, its parameter names):

    y = base(x) + (dropout(x) · (A ⊙ E)ᵀ · Bᵀ) · α / (ranknum + 1e-5)

A (r, in) and B (out, r) play P and Q, E (r, 1) the singular values. `ranknum` is init_r
for the adapter's life (a pruned triplet has E = 0; a saved adapter holds only the kept
ones, and loads with ranknum init_r still): PEFT's scaling, kept so numbers match. The
allocator (allocator.py) zeroes pruned rows of E and records which rows it kept
(`kept[name]`, a bool per row), which is what `tensors_of` saves.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layer_shapes import linear_features
from lorakit.methods.adapter_layer import AdapterLayer
from lorakit.methods.bank import AdapterWeights


class SVDLinear(AdapterLayer):
    peft_type = "ADALORA"

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.in_features, self.out_features, self.weight_transposed = linear_features(base_layer)
        self.lora_A, self.lora_B, self.lora_E = AdapterWeights(""), AdapterWeights(""), AdapterWeights("")
        self.ranknum = AdapterWeights("")  # a frozen parameter, as PEFT (it counts in "all params")
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.kept: dict[str, torch.Tensor] = {}  # name → bool (r,): the triplets the allocator kept

    @property
    def adapters(self) -> list[str]:
        return list(self.lora_A)

    def holds(self, name: str) -> bool:
        return name in self.lora_A

    def adapter_containers(self) -> Iterable[AdapterWeights]:
        return (self.lora_A, self.lora_B, self.lora_E)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.ranknum.remove(name)
        for table in (self.scaling, self.lora_dropout, self.kept):
            table.pop(name, None)

    def update_layer(self, name: str, r: int, init_r: int, lora_alpha: float, dropout: float, init_weights: bool,
                     tensors: dict[str, torch.Tensor] | None = None) -> None:
        device = self._base_device()
        shapes = {"lora_A": (r, self.in_features), "lora_B": (self.out_features, r), "lora_E": (r, 1)}
        for key, shape in shapes.items():
            if tensors is not None:
                value = tensors[key].to(device)
            elif init_weights:  # PEFT's reset_lora_parameters: E = 0, A, B ~ N(0, 0.02)
                value = torch.zeros(shape, device=device) if key == "lora_E" else \
                    torch.randn(shape, device=device) * 0.02
            else:
                value = torch.randn(shape, device=device)
            getattr(self, key).set(name, nn.Parameter(value))
        self.ranknum.set(name, nn.Parameter(torch.full((1,), float(init_r), device=device), requires_grad=False))
        self.scaling[name] = float(lora_alpha) if lora_alpha > 0 else float(r)
        self.lora_dropout[name] = dropout
        self.kept[name] = torch.ones(r, dtype=torch.bool)

    def _factor(self, name: str) -> float | torch.Tensor:
        return self.scaling[name] / (self.ranknum[name] + 1e-5)

    def adapter_output(self, x: torch.Tensor, name: str, result: torch.Tensor | None = None) -> torch.Tensor:
        a = self.lora_A[name]
        x = x.to(a.dtype)
        p = self.lora_dropout[name]
        x = F.dropout(x, p, self.training) if p > 0 else x
        return (x @ (a * self.lora_E[name]).T @ self.lora_B[name].T) * self._factor(name)

    def training_dropout(self) -> bool:
        return self.training and any(p > 0 for p in self.lora_dropout.values())

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = self.lora_B[name] @ (self.lora_A[name] * self.lora_E[name]) * self._factor(name)
        return delta.T if self.weight_transposed else delta

    def kept_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors with only the kept triplets (what a file holds)."""
        kept = self.kept[name].to(self.lora_A[name].device)
        return {"lora_A": self.lora_A[name][kept], "lora_B": self.lora_B[name][:, kept],
                "lora_E": self.lora_E[name][kept]}
