"""One adapter's tensors under PEFT's file names, and the check of a file against a model.

File names are the model's parameter names with the adapter name removed (PEFT's rule):

    base_model.model.<module>.lora_A.weight / .lora_B.weight          Linear, Conv1D
    base_model.model.<module>.lora_magnitude_vector                   DoRA's magnitude
    base_model.model.<module>.lora_embedding_A / .lora_embedding_B    Embedding
    base_model.model.<module>.<param>                                 a modules_to_save copy
    base_model.model.<…>.bias                                         bias="all" / "lora_only"

`plan_load` accounts for every tensor of a file against the model and the config —
which module it belongs to, what shape it must have — and raises before anything is
changed, so a failed load leaves the model as it was.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import AdapterConfigError, AdapterWeightsError, ConfigError
from lorakit.fingerprint import base_modules
from lorakit.layers import inner_module
from lorakit.layers.base import AdapterLayer
from lorakit.layers.lora import LoraEmbedding, linear_features
from lorakit.layers.modules_to_save import ModulesToSaveWrapper
from lorakit.targets import find_modules_to_save, find_target_modules, named_candidates

PREFIX = "base_model.model."


def adapter_tensors(base: nn.Module, adapter_name: str, config: LoraConfig) -> dict[str, torch.Tensor]:
    """The tensors that make up `adapter_name` in a wrapped base model, under PEFT's names."""
    out: dict[str, torch.Tensor] = {}
    for path, module in named_candidates(base):
        if isinstance(module, LoraEmbedding) and adapter_name in module.r:
            out[f"{PREFIX}{path}.lora_embedding_A"] = module.lora_embedding_A[adapter_name]
            out[f"{PREFIX}{path}.lora_embedding_B"] = module.lora_embedding_B[adapter_name]
        elif isinstance(module, AdapterLayer) and adapter_name in module.r:
            out[f"{PREFIX}{path}.lora_A.weight"] = module.lora_A[adapter_name].weight
            out[f"{PREFIX}{path}.lora_B.weight"] = module.lora_B[adapter_name].weight
        if isinstance(module, AdapterLayer) and adapter_name in getattr(module, "lora_magnitude_vector", {}):
            # DoRA; PEFT's file name has no ".weight"
            out[f"{PREFIX}{path}.lora_magnitude_vector"] = module.lora_magnitude_vector[adapter_name].weight
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for key, value in module.modules_to_save[adapter_name].state_dict().items():
                out[f"{PREFIX}{path}.{key}"] = value
    if config.bias != "none":  # biases are shared by all adapters (as in PEFT); named as in the model
        for name, param in base.named_parameters():
            if not name.endswith("bias") or any(s in name for s in (".lora_", ".modules_to_save.", ".original_module.")):
                continue
            if config.bias == "all" or name.endswith(".base_layer.bias"):
                out[f"{PREFIX}{name}"] = param
    return out


@dataclass
class LoadPlan:
    """Where each tensor of a checked adapter file goes."""

    lora: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # module → (A, B[, DoRA magnitude])
    saved_modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module → state dict
    biases: dict[str, torch.Tensor] = field(default_factory=dict)  # base parameter name → value


def plan_load(base: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], source: Path,
              autocast_adapter_dtype: bool = True) -> LoadPlan:
    """Check every tensor of an adapter file against `base` (bare or wrapped); change nothing.

    `autocast_adapter_dtype` (PEFT's name): fp16/bf16 adapter weights become fp32, where training
    and small updates keep their precision; False keeps the file's dtype.
    """
    try:
        targets = find_target_modules(base, config)
        to_save = find_modules_to_save(base, config.modules_to_save or [])
    except ConfigError as exc:
        raise AdapterConfigError(f"{source}: the adapter's config does not fit this model: {exc}") from None
    modules = dict(named_candidates(base))
    remaining = dict(tensors)
    plan = LoadPlan()

    def take(key: str, shape: tuple[int, ...], what: str) -> torch.Tensor:
        tensor = remaining.pop(key, None)
        if tensor is None:
            raise AdapterWeightsError(f"{source}: tensor {key} is missing; the config says {what}.")
        if tuple(tensor.shape) != shape:
            raise AdapterWeightsError(
                f"{source}: tensor {key} has shape {tuple(tensor.shape)}, but {what} needs {shape}."
            )
        upcast = autocast_adapter_dtype and tensor.dtype in (torch.float16, torch.bfloat16)
        return tensor.float() if upcast else tensor

    for path in targets:
        layer = inner_module(modules[path])
        r = config.rank_for(path)
        if isinstance(layer, nn.Embedding):
            names = (f"{PREFIX}{path}.lora_embedding_A", f"{PREFIX}{path}.lora_embedding_B")
            shapes = ((r, layer.num_embeddings), (layer.embedding_dim, r))
        else:
            in_features, out_features, _ = linear_features(layer)
            names = (f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight")
            shapes = ((r, in_features), (out_features, r))
        _check_rank(source, names, shapes, remaining, r, path)
        what = f"{path} ({type(layer).__name__}) is adapted with r={r}"
        plan.lora[path] = (take(names[0], shapes[0], what), take(names[1], shapes[1], what))
        if config.use_dora:  # the magnitude vector, one value per output feature
            plan.lora[path] += (take(f"{PREFIX}{path}.lora_magnitude_vector", (shapes[1][0],), what + " with DoRA"),)

    for path in to_save:
        plan.saved_modules[path] = {
            key: take(f"{PREFIX}{path}.{key}", tuple(ref.shape), f"{path} is saved whole (modules_to_save)")
            for key, ref in inner_module(modules[path]).state_dict().items()
        }

    base_params = base_parameters(base)
    for key, tensor in remaining.items():
        plain = key.removeprefix(PREFIX).replace(".base_layer.", ".")
        if ".original_module." in plain or ".modules_to_save." in plain:
            continue  # PEFT's bias="all" also writes these duplicates of tensors handled above
        param = base_params.get(plain) if key.startswith(PREFIX) else None
        if param is None:
            raise AdapterWeightsError(
                f"{source}: tensor {key} belongs to no module this config adapts in {type(base).__name__} "
                "(an adapter for another model, or an edited file)."
            )
        if tuple(tensor.shape) != tuple(param.shape):
            raise AdapterWeightsError(f"{source}: tensor {key} has shape {tuple(tensor.shape)}; the base's {plain} is {tuple(param.shape)}.")
        if plain.endswith("bias") and config.bias != "none":
            plan.biases[plain] = tensor
        elif not torch.allclose(tensor.to(param.dtype), param.detach(), atol=1e-6):
            raise AdapterWeightsError(
                f"{source}: the file carries its own copy of the base weight {plain} (PEFT saves embeddings this way), "
                "and it differs from this base model's (resized vocabulary? another base?). lorakit does not overwrite "
                "base weights when loading an adapter; load it onto the base it was trained with."
            )
    return plan


def _check_rank(source: Path, names, shapes, tensors: dict[str, torch.Tensor], r: int, path: str) -> None:
    """A clearer message than "wrong shape" when only the rank disagrees with the config."""
    a, b = tensors.get(names[0]), tensors.get(names[1])
    if a is not None and b is not None and a.dim() == 2 and b.dim() == 2 and a.shape[0] == b.shape[1] != r:
        if a.shape[1] == shapes[0][1] and b.shape[0] == shapes[1][0]:
            raise AdapterWeightsError(
                f"{source}: the config gives {path} rank r={r}, but its tensors have rank {a.shape[0]} "
                "(adapter_config.json and adapter_model.safetensors do not belong together)."
            )


def base_parameters(base: nn.Module) -> dict[str, nn.Parameter]:
    """The base model's own parameters, named as before wrapping (adapters looked through)."""
    return {
        f"{name}.{pname}" if name else pname: param
        for name, module in base_modules(base) for pname, param in module.named_parameters(recurse=False)
    }


def apply_biases(base: nn.Module, biases: dict[str, torch.Tensor]) -> None:
    """Overwrite base biases (bias="all"/"lora_only" adapters trained them; shared by all adapters)."""
    params = base_parameters(base)
    with torch.no_grad():
        for name, value in biases.items():
            params[name].copy_(value)


def convert_weight_init(tensors: dict[str, torch.Tensor], config: LoraConfig, initial: dict[str, torch.Tensor],
                        source: Path) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """A PiSSA/OLoRA adapter as a plain LoRA adapter for the *original* base (PEFT's conversion).

    The trained model is W_res + s·BA and W = W_res + s·B0A0, so the update to W is
    s·(BA − B0A0) = s·[B | −B0][A ; A0]: rank 2r, with alpha doubled (×√2 under rsLoRA) to keep s.
    `initial` holds A0, B0: the adapter as saved right after initialisation.
    """
    if config.use_dora:
        raise ConfigError("A DoRA adapter cannot be converted this way: its magnitude was learned against W_res.")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ConfigError("Conversion with use_rslora=True and rank_pattern/alpha_pattern is not supported (as in PEFT).")
    out = dict(tensors)
    for key, tensor in tensors.items():
        if key.endswith((".lora_A.weight", ".lora_B.weight")):
            start = initial.get(key)
            if start is None or start.shape != tensor.shape:
                raise AdapterWeightsError(f"{source}: the initial adapter has no {key} of shape {tuple(tensor.shape)}; "
                                          "give the adapter saved right after initialisation, before training.")
            out[key] = torch.cat([tensor, start.to(tensor)], 0) if ".lora_A." in key else torch.cat([tensor, -start.to(tensor)], 1)
    converted = copy.deepcopy(config)
    converted.init_lora_weights = True
    converted.r *= 2
    converted.lora_alpha *= 2**0.5 if config.use_rslora else 2
    converted.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    converted.alpha_pattern = {k: 2 * v for k, v in config.alpha_pattern.items()}
    return out, converted
