"""LoRA (and its variants DoRA, rsLoRA, PiSSA/OLoRA) as an `AdapterMethod` (methods/protocol.py).

PEFT's file names for one target module (after `base_model.model.<module path>.`):

    lora_A.weight (r, in) · lora_B.weight (out, r)            Linear, Conv1D, 4/8-bit Linear
    lora_embedding_A (r, num_embeddings) · lora_embedding_B (dim, r)    Embedding
    lora_magnitude_vector (out,)                               DoRA (no ".weight", as PEFT)
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.layer_shapes import linear_features
from lorakit.methods import inner_module
from lorakit.methods.adapter_layer import AdapterLayer
from lorakit.methods.lora.blend import add_weighted_adapter
from lorakit.methods.lora.config import LoraConfig
from lorakit.methods.lora.embedding import LoraEmbedding
from lorakit.methods.lora.init import convert_weight_init, is_weight_init
from lorakit.methods.lora.layer import LoraLinear

A_NAMES = ("lora_A.weight", "lora_embedding_A")


class LoraMethod:
    acts_on = "layers"
    peft_type = "LORA"
    config_class = LoraConfig
    param_marker = "lora_"
    job_name = "lora"  # the training job's `method:` and section
    job_defaults = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}

    def prepare_config(self, model: nn.Module, config: LoraConfig) -> None:
        """Nothing to fill in: LoRA's model-type defaults are `LoraConfig.default_targets`."""

    def check_targets(self, modules: dict[str, nn.Module], targets: list[str], config: LoraConfig) -> None:
        embeddings = [n for n in targets if isinstance(inner_module(modules[n]), nn.Embedding)]
        if embeddings and is_weight_init(config.init_lora_weights):  # PEFT has no embedding version either
            raise ConfigError(f"init_lora_weights={config.init_lora_weights!r} takes A and B from a linear weight; "
                              f"leave embedding layers ({embeddings[0]}) out of target_modules.")

    def new_layer(self, module: nn.Module, config: LoraConfig) -> AdapterLayer:
        if isinstance(module, nn.Embedding):
            return LoraEmbedding(module)
        layer = LoraLinear(module)
        if layer.weight_transposed != config.fan_in_fan_out:
            warnings.warn(
                f"fan_in_fan_out={config.fan_in_fan_out} does not fit {type(module).__name__}; using "
                f"fan_in_fan_out={layer.weight_transposed} for it (as PEFT does).",
                stacklevel=4,
            )
            if layer.weight_transposed:  # PEFT records this in the config, so saved GPT-2 adapters say True
                config.fan_in_fan_out = True
        return layer

    def add_adapter(self, layer: AdapterLayer, name: str, config: LoraConfig, module_name: str,
                    tensors: dict[str, torch.Tensor] | None) -> None:
        layer.update_layer(
            name, r=config.rank_for(module_name), lora_alpha=config.alpha_for(module_name),
            lora_dropout=config.lora_dropout, init_lora_weights=config.init_lora_weights, use_rslora=config.use_rslora,
            weights=tuple(tensors.values()) if tensors is not None else None, use_dora=config.use_dora,
        )

    def expected_tensors(self, module: nn.Module, config: LoraConfig, module_name: str) -> dict[str, tuple[int, ...]]:
        """In the order `update_layer` takes them: A, B[, DoRA magnitude]."""
        r = config.rank_for(module_name)
        module = inner_module(module)
        if isinstance(module, nn.Embedding):
            out = module.embedding_dim
            shapes = {"lora_embedding_A": (r, module.num_embeddings), "lora_embedding_B": (out, r)}
        else:
            in_features, out, _ = linear_features(module)
            shapes = {"lora_A.weight": (r, in_features), "lora_B.weight": (out, r)}
        if config.use_dora:  # the magnitude vector, one value per output feature
            shapes["lora_magnitude_vector"] = (out,)
        return shapes

    def tensors_of(self, layer: AdapterLayer, name: str) -> dict[str, torch.Tensor]:
        suffix = "" if isinstance(layer, LoraEmbedding) else ".weight"
        out = {f"{attr}{suffix}": factor for attr, factor in zip(layer.factor_names, layer.factors(name), strict=True)}
        if name in layer.lora_magnitude_vector:
            out["lora_magnitude_vector"] = layer.lora_magnitude_vector.param(name)
        return out

    def add_weighted_adapter(self, model, adapters, weights, adapter_name, combination_type, svd_rank) -> None:
        add_weighted_adapter(model, adapters, weights, adapter_name, combination_type, svd_rank)

    def mismatch_hint(self, found: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                      config: LoraConfig, module_name: str) -> str | None:
        """When only the rank disagrees: the config and the weights do not belong together."""
        (a_name, a_shape), (b_name, b_shape) = list(expected.items())[:2]
        a, b = found.get(a_name), found.get(b_name)
        r = a_shape[0]
        if a is not None and b is not None and a.dim() == 2 and b.dim() == 2 and a.shape[0] == b.shape[1] != r \
                and a.shape[1] == a_shape[1] and b.shape[0] == b_shape[0]:
            return (f"the config gives {module_name} rank r={r}, but its tensors have rank {a.shape[0]} "
                    "(adapter_config.json and adapter_model.safetensors do not belong together).")
        return None

    def convert_weight_init(self, tensors, config, initial, source):
        return convert_weight_init(tensors, config, initial, source)

    def summarize(self, tensors: dict[str, torch.Tensor]) -> dict:
        modules = sorted({key.split(f".{self.param_marker}")[0] for key in tensors if f".{self.param_marker}" in key})
        ranks = Counter(tensors[k].shape[0] for k in tensors if k.endswith(A_NAMES))
        return {"target_modules": modules, "ranks": {str(r): n for r, n in sorted(ranks.items())}}

    def module_deltas(self, tensors: dict[str, torch.Tensor], config: LoraConfig) -> dict[str, torch.Tensor]:
        """ΔW = s·B·A per module (A, B alone are not comparable: BA = (BM)(M⁻¹A) for any M)."""
        deltas = {}
        for key, a in tensors.items():
            for a_name, b_name in (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B")):
                if key.endswith(f".{a_name}"):
                    module = key[: -len(a_name) - 1]
                    b = tensors[f"{module}.{b_name}"].float()
                    deltas[module] = config.scaling_for(module) * (b @ a.float())
        return deltas


LORA = LoraMethod()
