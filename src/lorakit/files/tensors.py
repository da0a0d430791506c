"""One adapter's tensors under PEFT's file names, and the check of a file against a model.

File names are the model's parameter names with the adapter name removed (PEFT's rule):
`base_model.model.<module>.<suffix>`, where each method names its suffixes and shapes
(methods/protocol.py: `expected_tensors`, `tensors_of`; see methods/lora/method.py), plus

    base_model.model.<module>.<param>       a modules_to_save copy
    base_model.model.<…>.bias               bias="all" / "lora_only"

`plan_load` accounts for every tensor of a file against the model and the config —
which module it belongs to, what shape it must have — and raises before anything is
changed, so a failed load leaves the model as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import AdapterConfigError, AdapterWeightsError, ConfigError
from lorakit.files.fingerprint import base_modules
from lorakit.methods import inner_module, layer_chain
from lorakit.methods.modules_to_save import ModulesToSaveWrapper
from lorakit.methods.table import is_adapter_parameter, method_of, method_of_layer
from lorakit.targets import find_modules_to_save, find_target_modules, named_candidates

PREFIX = "base_model.model."


def adapter_tensors(base: nn.Module, adapter_name: str, config: Any) -> dict[str, torch.Tensor]:
    """The tensors that make up `adapter_name` in a wrapped base model, under PEFT's names."""
    out: dict[str, torch.Tensor] = {}
    for path, module in named_candidates(base):
        for layer in layer_chain(module):  # several methods may be stacked on one module: named by the module
            if adapter_name in layer.adapters:
                for suffix, tensor in method_of_layer(layer).tensors_of(layer, adapter_name).items():
                    out[f"{PREFIX}{path}.{suffix}"] = tensor
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for key, value in module.modules_to_save[adapter_name].state_dict().items():
                out[f"{PREFIX}{path}.{key}"] = value
    if config.bias != "none":  # biases are shared by all adapters (as in PEFT); named as in the model
        for name, param in base.named_parameters():
            if not name.endswith("bias") or is_adapter_parameter(name) or \
                    any(s in name for s in (".modules_to_save.", ".original_module.")):
                continue
            if config.bias == "all" or name.endswith(".base_layer.bias"):
                out[f"{PREFIX}{name}"] = param
    return out


@dataclass
class LoadPlan:
    """Where each tensor of a checked adapter file goes."""

    layers: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module → {suffix: tensor} (the method's)
    saved_modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module → state dict
    biases: dict[str, torch.Tensor] = field(default_factory=dict)  # base parameter name → value
    model_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # a virtual-token method's (no module path)


def plan_load(base: nn.Module, config: Any, tensors: dict[str, torch.Tensor], source: Path,
              autocast_adapter_dtype: bool = True) -> LoadPlan:
    """Check every tensor of an adapter file against `base` (bare or wrapped); change nothing.

    `autocast_adapter_dtype` (PEFT's name): fp16/bf16 adapter weights become fp32, where training
    and small updates keep their precision; False keeps the file's dtype.
    """
    method = method_of(config)
    if method.acts_on == "inputs":
        return _plan_model_tensors(method, config, tensors, source, autocast_adapter_dtype)
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
        expected = method.expected_tensors(modules[path], config, path)
        hint = method.mismatch_hint({s: remaining.get(f"{PREFIX}{path}.{s}") for s in expected}, expected, config, path)
        if hint:
            raise AdapterWeightsError(f"{source}: {hint}")
        what = f"{path} ({type(inner_module(modules[path])).__name__}) is adapted ({config.peft_type}: {list(expected)})"
        plan.layers[path] = {suffix: take(f"{PREFIX}{path}.{suffix}", shape, what) for suffix, shape in expected.items()}

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


def _plan_model_tensors(method, config: Any, tensors: dict[str, torch.Tensor], source: Path,
                        autocast_adapter_dtype: bool) -> LoadPlan:
    """A virtual-token adapter's file: exactly the method's tensors, each of its shape."""
    expected = method.expected_model_tensors(config)
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise AdapterWeightsError(f"{source}: tensor {extra[0]} is not part of a {config.peft_type} adapter (it holds "
                                  f"only {sorted(expected)}); an edited file, or one for another method.")
    plan = LoadPlan()
    for key, shape in expected.items():
        tensor = tensors.get(key)
        if tensor is None:
            raise AdapterWeightsError(f"{source}: tensor {key} is missing; a {config.peft_type} adapter holds it.")
        if tuple(tensor.shape) != shape:
            raise AdapterWeightsError(
                f"{source}: tensor {key} has shape {tuple(tensor.shape)}, but this {config.peft_type} config on this "
                f"model needs {shape} (num_virtual_tokens={config.num_virtual_tokens}, token_dim={config.token_dim}"
                + (f", num_layers={config.num_layers}" if method.places == "cache" else "") + ").")
        upcast = autocast_adapter_dtype and tensor.dtype in (torch.float16, torch.bfloat16)
        plan.model_tensors[key] = tensor.float() if upcast else tensor
    return plan


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
