"""Quantized base layers (bitsandbytes): reading their weights back as floats.

bitsandbytes stores a 4-bit weight as `Params4bit` (packed uint8 plus a quant_state with
the block scales and the logical shape) and an 8-bit one as `Int8Params` (int8 plus a
per-row scale `SCB`, value = int8 · SCB / 127). Code that needs float values (the base
fingerprint now; merging and footprint reports later) goes through `float_weight`.
"""

from __future__ import annotations

import torch
from torch import nn


def quant_kind(weight: torch.Tensor) -> str | None:
    """'4bit', '8bit' or None (a plain float weight)."""
    kind = type(weight).__name__
    return {"Params4bit": "4bit", "Int8Params": "8bit"}.get(kind)


def float_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as a float32 tensor in its logical shape (dequantized if needed)."""
    weight = module.weight
    kind = quant_kind(weight)
    if kind == "4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    if kind == "8bit" and weight.dtype == torch.int8:
        return weight.data.float() * weight.SCB.float()[:, None] / 127.0
    return weight.detach().float()
