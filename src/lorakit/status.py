"""What a wrapped model holds, in PEFT's shapes: parameter counts and the per-layer / per-model
status that `PeftModel.get_layer_status()` / `get_model_status()` return.

Field names and meanings are PEFT's (`peft.peft_model.TunerLayerStatus` / `TunerModelStatus`),
so code that inspects them keeps working; "irregular" means layers disagree (a model in an
inconsistent state).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from lorakit.quant import quant_kind

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular


def count_parameters(named_parameters: Iterable[tuple[str, nn.Parameter]]) -> tuple[int, int]:
    """(trainable, all), counted as PEFT counts them: 4-bit storage unpacked to its logical size."""
    trainable = total = 0
    for _, param in named_parameters:
        count = param.numel()
        if quant_kind(param) == "4bit":  # two 4-bit values per stored byte
            itemsize = getattr(getattr(param, "quant_storage", None), "itemsize", 1)
            count = count * 2 * itemsize
        total += count
        trainable += count if param.requires_grad else 0
    return trainable, total


def _agree(values: list[bool]) -> bool | Irregular:
    return True if all(values) else False if not any(values) else "irregular"


def _one_or_irregular(values: set):
    return values.pop() if len(values) == 1 else "irregular"


def _listed(value):
    return value if value == "irregular" else list(value)


def layer_status(tuner_modules: Iterable[tuple[str, nn.Module]]) -> list[TunerLayerStatus]:
    """One entry per adapted layer or saved-module wrapper (`tuner_modules`: (name, module) pairs)."""
    out = []
    for name, module in tuner_modules:
        grads: dict[str, list[bool]] = {}
        devices: dict[str, set[str]] = {}
        for adapter in module.adapters:
            for param in module.adapter_parameters(adapter):
                grads.setdefault(adapter, []).append(param.requires_grad)
                devices.setdefault(adapter, set()).add(param.device.type)
        weight = getattr(getattr(module, "base_layer", None), "weight", None)
        kind = quant_kind(weight) if weight is not None else None
        out.append(TunerLayerStatus(
            name=name, module_type=f"lorakit.{type(module).__name__}", enabled=not module.disable_adapters,
            active_adapters=list(module.active_adapters), merged_adapters=list(getattr(module, "merged_adapters", [])),
            requires_grad={a: _agree(v) for a, v in grads.items()}, available_adapters=sorted(module.adapters),
            devices={a: sorted(d) for a, d in devices.items()}, quantization_backend=f"bnb {kind}" if kind else None,
        ))
    return out


def model_status(base_model: nn.Module, peft_types: dict[str, str], counts: tuple[int, int],
                 layers: list[TunerLayerStatus]) -> TunerModelStatus:
    """PEFT's aggregation of the layer statuses into one model status."""
    merged_somewhere = set().union(*(s.merged_adapters for s in layers)) if layers else set()
    merged_everywhere = all(not (set(s.available_adapters) - set(s.merged_adapters)) & merged_somewhere for s in layers)
    requires_grad: dict[str, list] = {}
    devices: dict[str, set[str]] = {}
    for status in layers:
        for adapter, value in status.requires_grad.items():
            requires_grad.setdefault(adapter, []).append(value)
        for adapter, kinds in status.devices.items():
            devices.setdefault(adapter, set()).update(kinds)
    return TunerModelStatus(
        base_model_type=type(base_model).__name__, adapter_model_type="LoraModel", peft_types=peft_types,
        trainable_params=counts[0], total_params=counts[1], num_adapter_layers=len(layers),
        enabled=_one_or_irregular({s.enabled for s in layers}),
        active_adapters=_listed(_one_or_irregular({tuple(s.active_adapters) for s in layers})) if layers else [],
        merged_adapters=sorted(merged_somewhere) if merged_everywhere else "irregular",
        requires_grad={a: v[0] if len(set(v)) == 1 else "irregular" for a, v in requires_grad.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))) if layers else [],
        devices={a: sorted(d) for a, d in devices.items()},
        quantization_backend=_one_or_irregular({s.quantization_backend for s in layers}) if layers else None,
    )
