"""A bottleneck adapter on a linear layer's output (nn.Linear, Conv1D, 4/8-bit Linear): see config.py.

Stacked adapters apply in sequence (each to the output so far), as AdapterHub's `Stack`;
per-row routed batches give each row group its adapter's difference. Non-linear, so there
is nothing to merge into the weight: merging is refused (method.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import MergeError
from lorakit.layer_shapes import linear_features
from lorakit.methods.adapter_layer import AdapterLayer
from lorakit.methods.bank import AdapterWeights

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "silu": F.silu, "tanh": torch.tanh}


class BottleneckLinear(AdapterLayer):
    peft_type = "BOTTLENECK"

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        _, self.out_features, _ = linear_features(base_layer)
        self.adapter_down, self.adapter_up = AdapterWeights(".weight"), AdapterWeights(".weight")
        self.adapter_down_bias, self.adapter_up_bias = AdapterWeights(""), AdapterWeights("")
        self.non_linearity: dict[str, str] = {}
        self.residual: dict[str, bool] = {}

    @property
    def adapters(self) -> list[str]:
        return list(self.adapter_down)

    def holds(self, name: str) -> bool:
        return name in self.adapter_down

    def adapter_containers(self) -> Iterable[AdapterWeights]:
        return (self.adapter_down, self.adapter_down_bias, self.adapter_up, self.adapter_up_bias)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.non_linearity.pop(name, None)
        self.residual.pop(name, None)

    def update_layer(self, name: str, width: int, non_linearity: str, residual: bool, init_weights: bool,
                     tensors: dict[str, torch.Tensor] | None = None) -> None:
        device, d = self._base_device(), self.out_features
        if tensors is None:
            down = torch.empty(width, d, device=device)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # as nn.Linear (and LoRA's A)
            up = torch.zeros(d, width, device=device) if init_weights else torch.randn(d, width, device=device) * 0.02
            tensors = {"adapter_down.weight": down, "adapter_down.bias": torch.zeros(width, device=device),
                       "adapter_up.weight": up, "adapter_up.bias": torch.zeros(d, device=device)}
        for key, container in zip(("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias"),
                                  self.adapter_containers(), strict=True):
            container.set(name, nn.Parameter(tensors[key].to(device)))
        self.non_linearity[name], self.residual[name] = non_linearity, residual

    def check_merge(self, names, check_finite: bool = False, allow_quantized: bool = False) -> None:
        held = [name for name in names if self.holds(name)]
        if held:
            raise MergeError(f"Bottleneck adapters {held} put a non-linear MLP after the layer; no weight equals "
                             "that, so they cannot be merged. Keep them as adapters.")

    def adapter_output(self, x: torch.Tensor, name: str, result: torch.Tensor | None = None) -> torch.Tensor:
        """Δ on the output h = result: W_up f(W_down h + b_down) + b_up (minus h without the residual)."""
        if result is None:
            result = self.base_layer(x)
        down = self.adapter_down.param(name)
        h = result.to(down.dtype)
        hidden = ACTIVATIONS[self.non_linearity[name]](F.linear(h, down, self.adapter_down_bias.param(name)))
        delta = F.linear(hidden, self.adapter_up.param(name), self.adapter_up_bias.param(name))
        return delta if self.residual[name] else delta - h
