"""(IA)³ as an `AdapterMethod` (methods/protocol.py). PEFT's file name for one target module:
`base_model.model.<module path>.ia3_l`, shape (1, in) for feedforward layers, else (out, 1)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.methods import inner_module, layer_of, no_weight_conversion
from lorakit.methods.adapter_layer import AdapterLayer
from lorakit.methods.ia3.config import DEFAULT_FEEDFORWARD, IA3Config
from lorakit.methods.ia3.layer import IA3Linear
from lorakit.targets import is_linear, matches


class IA3Method:
    acts_on = "layers"
    peft_type = "IA3"
    config_class = IA3Config
    param_marker = "ia3_"
    job_name = "ia3"
    job_defaults: dict = {}  # PEFT's per-model targets (Llama: k_proj, v_proj, down_proj)

    def prepare_config(self, model: nn.Module, config: IA3Config) -> None:
        """PEFT's rule: without feedforward_modules, the model type's defaults (down_proj for Llama)."""
        if config.feedforward_modules is None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            config.feedforward_modules = DEFAULT_FEEDFORWARD.get(model_type, [])

    def check_targets(self, modules: dict[str, nn.Module], targets: list[str], config: IA3Config) -> None:
        other = [n for n in targets if not is_linear(inner_module(modules[n]))]
        if other:
            raise ConfigError(f"(IA)³ adapts linear layers only (as here implemented); {other[0]} is a "
                              f"{type(inner_module(modules[other[0]])).__name__}.")

    def new_layer(self, module: nn.Module, config: IA3Config) -> AdapterLayer:
        layer = IA3Linear(module)
        if layer.weight_transposed and not config.fan_in_fan_out:
            warnings.warn(f"fan_in_fan_out=False does not fit {type(module).__name__}; using fan_in_fan_out=True "
                          "for it (as PEFT does).", stacklevel=4)
            config.fan_in_fan_out = True
        return layer

    def _feedforward(self, module: nn.Module, config: IA3Config, module_name: str) -> bool:
        layer = layer_of(module, self.peft_type)  # the IA3 layer on this module, wherever it sits in the chain
        if layer is not None and layer.adapters:
            return layer.is_feedforward  # fixed by the layer's first adapter
        return bool(config.feedforward_modules) and matches(config.feedforward_modules, module_name)

    def add_adapter(self, layer: AdapterLayer, name: str, config: IA3Config, module_name: str,
                    tensors: dict[str, torch.Tensor] | None) -> None:
        layer.is_feedforward = self._feedforward(layer, config, module_name)
        layer.update_layer(name, config.init_ia3_weights, tensors["ia3_l"] if tensors is not None else None)

    def expected_tensors(self, module: nn.Module, config: IA3Config, module_name: str) -> dict[str, tuple[int, ...]]:
        from lorakit.layer_shapes import linear_features

        in_features, out_features, _ = linear_features(inner_module(module))
        feedforward = self._feedforward(module, config, module_name)
        return {"ia3_l": (1, in_features) if feedforward else (out_features, 1)}

    def tensors_of(self, layer: AdapterLayer, name: str) -> dict[str, torch.Tensor]:
        return {"ia3_l": layer.ia3_l[name]}

    def mismatch_hint(self, found, expected, config, module_name) -> str | None:
        tensor = found.get("ia3_l")
        if tensor is not None and tuple(tensor.shape) == expected["ia3_l"][::-1]:
            return (f"{module_name}: ia3_l has shape {tuple(tensor.shape)}: the file treats it as "
                    f"{'a feedforward' if tensor.shape[0] == 1 else 'a non-feedforward'} layer and the config does "
                    "not (feedforward_modules differ).")
        return None

    def convert_weight_init(self, tensors, config, initial, source):
        raise no_weight_conversion("(IA)³")

    def add_weighted_adapter(self, model, adapters, weights, adapter_name, combination_type, svd_rank) -> None:
        raise ConfigError(f"Adapters {adapters} are not LoRA adapters (IA3); add_weighted_adapter blends LoRA adapters, "
                          "as in PEFT. Stack IA3 adapters instead: set_adapter([...]) multiplies their vectors.")

    def summarize(self, tensors: dict[str, torch.Tensor]) -> dict:
        return {"target_modules": sorted(key.rsplit(".ia3_l", 1)[0] for key in tensors if key.endswith(".ia3_l")),
                "ranks": {}}

    def module_deltas(self, tensors: dict[str, torch.Tensor], config: IA3Config) -> dict[str, torch.Tensor]:
        """The learned scaling minus one: what each module's output (or input) is multiplied by, above identity."""
        return {key.rsplit(".ia3_l", 1)[0]: t.float() - 1 for key, t in tensors.items() if key.endswith(".ia3_l")}


IA3 = IA3Method()
