"""Facts about the base layers adapters wrap, shared by every method and by files code.

GPT-2's `Conv1D` is a linear layer that stores its weight as (in, out), the transpose of
`nn.Linear`'s (out, in); bitsandbytes' 4/8-bit layers subclass `nn.Linear`.
"""

from __future__ import annotations

import functools

from torch import nn


@functools.cache
def conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but the layer itself does not need it
        return None
    return Conv1D


def linear_features(base: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, weight_transposed) of a linear-like base layer; weight_transposed is
    PEFT's fan_in_fan_out: the weight is stored (in, out), as GPT-2's Conv1D does."""
    while hasattr(base, "peft_type") and hasattr(base, "base_layer"):  # an adapted layer: what it stands for
        base = base.base_layer
    conv1d = conv1d_type()
    if conv1d is not None and isinstance(base, conv1d):
        return base.nx, base.nf, True  # GPT-2's Conv1D stores its weight as (in, out)
    return base.in_features, base.out_features, False
