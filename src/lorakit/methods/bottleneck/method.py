"""Bottleneck adapters as an `AdapterMethod` (methods/protocol.py). lorakit's own file format, in PEFT's
layout (adapter_config.json with `"peft_type": "BOTTLENECK"`, adapter_model.safetensors), one module's
tensors after `base_model.model.<module path>.`:

    adapter_down.weight (d/rf, d) · adapter_down.bias (d/rf,) · adapter_up.weight (d, d/rf) · adapter_up.bias (d,)

d the adapted layer's output features, rf the reduction factor (docs/methods.md).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.layer_shapes import linear_features
from lorakit.methods import inner_module, no_weight_conversion
from lorakit.methods.adapter_layer import AdapterLayer
from lorakit.methods.bottleneck.config import BottleneckConfig
from lorakit.methods.bottleneck.layer import BottleneckLinear
from lorakit.targets import is_linear

SUFFIXES = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")


class BottleneckMethod:
    acts_on = "layers"
    peft_type = "BOTTLENECK"
    config_class = BottleneckConfig
    param_marker = "adapter_"
    job_name = "bottleneck"
    job_defaults = {"architecture": "houlsby", "reduction_factor": 16}

    def prepare_config(self, model: nn.Module, config: BottleneckConfig) -> None:
        """Nothing: the placement is `config.default_targets` (by architecture and model type)."""

    def check_targets(self, modules: dict[str, nn.Module], targets: list[str], config: BottleneckConfig) -> None:
        other = [n for n in targets if not is_linear(inner_module(modules[n]))]
        if other:
            raise ConfigError(f"Bottleneck adapters go on a linear layer's output; {other[0]} is a "
                              f"{type(inner_module(modules[other[0]])).__name__}.")
        narrow = [n for n in targets if linear_features(inner_module(modules[n]))[1] < config.reduction_factor]
        if narrow:
            raise ConfigError(f"{narrow[0]} has fewer output features than reduction_factor={config.reduction_factor}; "
                              "lower the reduction factor.")

    def new_layer(self, module: nn.Module, config: BottleneckConfig) -> AdapterLayer:
        return BottleneckLinear(module)

    def width(self, module: nn.Module, config: BottleneckConfig) -> int:
        return max(1, linear_features(inner_module(module))[1] // config.reduction_factor)

    def add_adapter(self, layer: BottleneckLinear, name: str, config: BottleneckConfig, module_name: str,
                    tensors: dict[str, torch.Tensor] | None) -> None:
        layer.update_layer(name, self.width(layer, config), config.non_linearity, config.residual, config.init_weights,
                           tensors)

    def expected_tensors(self, module: nn.Module, config: BottleneckConfig, module_name: str) -> dict[str, tuple[int, ...]]:
        d, width = linear_features(inner_module(module))[1], self.width(module, config)
        return {"adapter_down.weight": (width, d), "adapter_down.bias": (width,), "adapter_up.weight": (d, width),
                "adapter_up.bias": (d,)}

    def tensors_of(self, layer: BottleneckLinear, name: str) -> dict[str, torch.Tensor]:
        return {key: container.param(name) for key, container in zip(SUFFIXES, layer.adapter_containers(), strict=True)}

    def mismatch_hint(self, found, expected, config, module_name) -> str | None:
        down = found.get("adapter_down.weight")
        if down is not None and tuple(down.shape) != expected["adapter_down.weight"]:
            return (f"{module_name}: the file's bottleneck is {down.shape[0]} wide, the config's reduction_factor="
                    f"{config.reduction_factor} makes it {expected['adapter_down.weight'][0]}.")
        return None

    def convert_weight_init(self, tensors, config, initial, source):
        raise no_weight_conversion("Bottleneck")

    def add_weighted_adapter(self, model, adapters, weights, adapter_name, combination_type, svd_rank) -> None:
        raise ConfigError(f"Adapters {adapters} are bottleneck adapters; add_weighted_adapter blends LoRA adapters. "
                          "Stack them instead: set_adapter([...]) applies them in sequence.")

    def summarize(self, tensors: dict[str, torch.Tensor]) -> dict:
        widths = Counter(t.shape[0] for k, t in tensors.items() if k.endswith(".adapter_down.weight"))
        return {"target_modules": sorted(k.rsplit(".adapter_down.weight", 1)[0] for k in tensors
                                         if k.endswith(".adapter_down.weight")),
                "ranks": dict(sorted(widths.items()))}

    def module_deltas(self, tensors: dict[str, torch.Tensor], config: BottleneckConfig) -> dict[str, torch.Tensor]:
        """The up projection (what the adapter writes back), per module: zero for an untrained adapter."""
        return {k.rsplit(".adapter_up.weight", 1)[0]: t.float() for k, t in tensors.items()
                if k.endswith(".adapter_up.weight")}


BOTTLENECK = BottleneckMethod()
