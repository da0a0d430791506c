"""Blending adapters into a new one: `add_weighted_adapter`, with PEFT's semantics.

Blending makes one new adapter out of several (`combination_type`); stacking
(`set_adapter([...])`) instead runs several adapters side by side. Per adapted layer,
with weights wᵢ and scalings sᵢ:

- "linear": Aₙ = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ,  Bₙ = Σ √|wᵢsᵢ|·Bᵢ  (all ranks equal; rank r).
  Not Σ wᵢΔWᵢ: cross terms BᵢAⱼ appear. Cheap, and what PEFT computes.
- "cat":    Aₙ = [w₁s₁A₁; w₂s₂A₂; …], Bₙ = [B₁ B₂ …]  (rank Σrᵢ): exactly Σ wᵢΔWᵢ.
- "svd":    ΔW = Σ wᵢΔWᵢ, truncated to `svd_rank` (default max rᵢ) by SVD: the best
  rank-k approximation of the exact blend.

The new adapter's scaling is α/r with α = r (so 1, or √r under rsLoRA, as in PEFT); it
adapts exactly the modules its inputs adapt. It is created frozen (inference), like PEFT's.
We differ from PEFT on purpose in one place: when one input adapter has a trained
`modules_to_save` copy, the blend takes that trained copy (PEFT gives the blend a fresh
copy of the *untrained* original module).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from lorakit.errors import AdapterNameError, ConfigError
from lorakit.methods import layer_of
from lorakit.methods.adapter_layer import AdapterLayer
from lorakit.methods.lora.config import LoraConfig
from lorakit.targets import named_candidates

COMBINATIONS = ("linear", "cat", "svd")


def add_weighted_adapter(
    model, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
    combination_type: str = "svd", svd_rank: int | None = None,
) -> None:
    """Create `adapter_name` from `adapters` blended with `weights` (see the module docstring)."""
    adapters, weights = list(adapters), [float(w) for w in weights]
    model.adapter_set.check_known(adapters)
    model.adapter_set.check_new_name(adapter_name)
    if not adapters or len(adapters) != len(weights):
        raise ConfigError(f"Give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights.")
    if combination_type not in COMBINATIONS:
        raise ConfigError(f"combination_type must be one of {COMBINATIONS}, got {combination_type!r}.")
    combination_type = "linear" if len(adapters) == 1 else combination_type
    configs = [model.peft_config[a] for a in adapters]
    other = [a for a, c in zip(adapters, configs, strict=True) if not isinstance(c, LoraConfig)]
    if other:
        raise ConfigError(f"Adapters {other} are not LoRA adapters ({configs[adapters.index(other[0])].peft_type}); "
                          "add_weighted_adapter blends LoRA adapters, as in PEFT.")
    dora = [a for a, c in zip(adapters, configs, strict=True) if c.use_dora]
    if dora:
        raise ConfigError(f"Adapters {dora} use DoRA, whose magnitude vectors do not blend linearly; "
                          "add_weighted_adapter takes plain LoRA adapters only (merge DoRA adapters instead).")
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
    if combination_type == "linear" and len(set(ranks)) != 1:
        raise ConfigError(f"'linear' blending needs equal ranks, got {dict(zip(adapters, ranks, strict=True))}; "
                          "use 'cat' (exact) or 'svd' (truncated).")
    new_rank = {"linear": ranks[0], "cat": sum(ranks), "svd": svd_rank or max(ranks)}[combination_type]
    # The blend lives exactly where its inputs live: their module paths, as full names.
    targets = [path for path, m in named_candidates(model.get_base_model())
               if (layer := layer_of(m, "LORA")) is not None and any(a in layer.r for a in adapters)]
    saved = [s for s in (c.modules_to_save or [] for c in configs) if s]
    if len(saved) > 1:
        raise AdapterNameError("Cannot blend adapters that each have their own modules_to_save copies.")
    config = dataclasses.replace(configs[0], r=new_rank, lora_alpha=new_rank, target_modules=targets,
                                 rank_pattern={}, alpha_pattern={}, modules_to_save=saved[0] if saved else None,
                                 layers_to_transform=None, layers_pattern=None, exclude_modules=None)
    model.add_adapter(adapter_name, config)
    with torch.no_grad():
        for layer in model.base_model.adapter_layers():
            if layer.peft_type == "LORA" and adapter_name in layer.r:
                a, b = _blend(layer, adapters, weights, combination_type, new_rank)
                target_a, target_b = layer.factors(adapter_name)
                target_a.zero_()
                target_b.zero_()
                target_a[: a.shape[0], :] = a
                target_b[:, : b.shape[1]] = b
        for wrapper in model.base_model.saved_module_wrappers():
            source = next((n for n in adapters if n in wrapper.modules_to_save), None)
            if source is not None and adapter_name in wrapper.modules_to_save:
                wrapper.modules_to_save[adapter_name].load_state_dict(wrapper.modules_to_save[source].state_dict())
    for layer in model.base_model.adapter_layers():  # a blend is for inference, as in PEFT
        for param in layer.adapter_parameters(adapter_name):
            param.requires_grad_(False)


def _blend(layer: AdapterLayer, adapters, weights, combination_type: str, new_rank: int):
    present = [(n, w) for n, w in zip(adapters, weights, strict=True) if n in layer.r]
    if combination_type == "cat":
        parts = [(layer.factors(n)[0] * w * layer.scaling[n], layer.factors(n)[1]) for n, w in present]
        return torch.cat([a for a, _ in parts], dim=0), torch.cat([b for _, b in parts], dim=1)
    if combination_type == "linear":
        a = b = 0
        for n, w in present:
            ws = w * layer.scaling[n]
            a = a + math.copysign(math.sqrt(abs(ws)), ws) * layer.factors(n)[0]
            b = b + math.sqrt(abs(ws)) * layer.factors(n)[1]
        return a, b
    delta = sum(w * layer.delta_weight(n) for n, w in present)  # in the base weight's layout
    if layer.weight_transposed:
        delta = delta.T  # back to (out, in) = B @ A's layout
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    return vh[:new_rank, :], u[:, :new_rank] @ torch.diag(s[:new_rank])
