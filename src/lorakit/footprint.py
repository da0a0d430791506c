"""`footprint(model)`: measured bytes of a model's parts — quantized values, their constants and tables,
float weights, adapters — read from the real buffers (the QLoRA paper's 4.127 bits per NF4 parameter
with double quantization is what it shows for SmolLM2)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.methods.table import is_adapter_parameter
from lorakit.quant import quant_kind


@dataclass
class Footprint:
    """Measured bytes of a model's parts, from the real buffers."""

    quantized_values: int = 0  # packed 4-bit codes / int8 values
    quant_constants: int = 0  # per-block absmax (and nested absmax) / per-row scales
    quant_tables: int = 0  # per-layer code tables (16 + 256 entries for NF4 with double quant)
    float_weights: int = 0  # everything else of the base (norms, embeddings, head)
    adapters: int = 0
    quantized_params: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def bits_per_quantized_param(self) -> float:
        """Values plus block constants per parameter: ≈4.127 for NF4 with double quantization."""
        return 8 * (self.quantized_values + self.quant_constants) / max(self.quantized_params, 1)

    @property
    def total(self) -> int:
        return self.quantized_values + self.quant_constants + self.quant_tables + self.float_weights + self.adapters


def footprint(model: nn.Module) -> Footprint:
    """Bytes per part of a (possibly wrapped, possibly quantized) model, read from its buffers."""
    result = Footprint()
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        kind = quant_kind(param)
        if is_adapter_parameter(name) or ".modules_to_save." in name:
            result.adapters += _nbytes(param)
        elif kind == "4bit":
            state = param.quant_state
            result.quantized_values += _nbytes(param)
            result.quantized_params += state.shape.numel()
            result.quant_constants += _nbytes(state.absmax)
            result.quant_tables += _nbytes(state.code)
            if state.nested:
                result.quant_constants += _nbytes(state.state2.absmax) + _nbytes(state.offset)
                result.quant_tables += _nbytes(state.state2.code)
            result.by_kind[state.quant_type] = result.by_kind.get(state.quant_type, 0) + state.shape.numel()
        elif kind == "8bit":
            result.quantized_values += _nbytes(param)
            result.quantized_params += param.numel()
            result.quant_constants += _nbytes(param.SCB) if getattr(param, "SCB", None) is not None else 0
            result.by_kind["int8"] = result.by_kind.get("int8", 0) + param.numel()
        else:
            result.float_weights += _nbytes(param)
    return result


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
