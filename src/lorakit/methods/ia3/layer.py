"""(IA)³ on linear layers (nn.Linear, GPT-2's Conv1D, bitsandbytes 4/8-bit Linear), as in PEFT.

Each adapter learns one vector l (`ia3_l`, PEFT's name):

    feedforward layer:  y = W(l ⊙ x) + b         l: (1, in)
    other layers:       y = l ⊙ (W x + b)        l: (out, 1)

Several active adapters multiply their vectors (PEFT's stacking). Merging folds l into the
weight (columns for feedforward, rows otherwise; also the bias for non-feedforward) and
unmerging divides by l + 1e-8, as PEFT does. For a per-row routed batch each row group adds
the difference its adapter makes: (l − 1) ⊙ result, or W(l ⊙ x) − Wx (one more base GEMM
on those rows).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from lorakit.layer_shapes import linear_features
from lorakit.methods.adapter_layer import AdapterLayer
from lorakit.methods.bank import AdapterWeights


class IA3Linear(AdapterLayer):
    peft_type = "IA3"

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.in_features, self.out_features, self.weight_transposed = linear_features(base_layer)
        self.is_feedforward = False  # fixed by the first adapter's config (as PEFT fixes it at wrap time)
        self.ia3_l = AdapterWeights(suffix="")  # adding an adapter adds no module (bank.py)

    @property
    def adapters(self) -> list[str]:
        return list(self.ia3_l)

    def holds(self, name: str) -> bool:
        return name in self.ia3_l

    def adapter_containers(self) -> Iterable[AdapterWeights]:
        return (self.ia3_l,)

    def update_layer(self, name: str, init_ia3_weights: bool = True, weight: torch.Tensor | None = None) -> None:
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        device = self.base_layer.weight.device
        if weight is None:
            weight = torch.ones(shape, device=device) if init_ia3_weights else torch.randn(shape, device=device)
        self.ia3_l.set(name, nn.Parameter(weight.to(device)))

    def scaling(self, names: Sequence[str]) -> torch.Tensor | float:
        """The product of these adapters' vectors, flattened (in or out features)."""
        product: torch.Tensor | float = 1.0
        for name in names:
            product = product * self.ia3_l[name].flatten()
        return product

    def active_output(self, x: torch.Tensor, names: Sequence[str], *args, **kwargs) -> torch.Tensor:
        if not names:
            return self.base_layer(x, *args, **kwargs)
        scaling = self.scaling(names)
        if self.is_feedforward:  # PEFT: the input in l's dtype, back to the input's dtype
            return self.base_layer((x.to(scaling.dtype) * scaling).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scaling).to(result.dtype)

    def adapter_output(self, x: torch.Tensor, name: str, result: torch.Tensor | None = None) -> torch.Tensor:
        """What adapter `name` changes in `result` = base(x): used for per-row routed batches."""
        if result is None:
            result = self.base_layer(x)
        return self.active_output(x, [name]) - result

    def _l_in_weight_layout(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        vector = self.ia3_l[name].data  # (1, in) or (out, 1): broadcasts over an (out, in) weight
        return (vector.T if self.weight_transposed else vector).to(weight.dtype)

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight * self._l_in_weight_layout(name, weight)

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight / (self._l_in_weight_layout(name, weight) + 1e-8)

    def merged_bias(self, name: str, bias: torch.Tensor) -> torch.Tensor:
        return bias if self.is_feedforward else bias * self.ia3_l[name].data.reshape(bias.shape).to(bias.dtype)

    def unmerged_bias(self, name: str, bias: torch.Tensor) -> torch.Tensor:
        if self.is_feedforward:
            return bias
        return bias / (self.ia3_l[name].data.reshape(bias.shape).to(bias.dtype) + 1e-8)
