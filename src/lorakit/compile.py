"""Opt-in `torch.compile` of a model's repeated blocks (the decoder layers), not the whole model.

Compiling each block (`nn.Module.compile`) keeps graphs small and shared by all layers (they
run the same code), leaves the adapter bookkeeping and the loss in eager mode, and works
with the fused LoRA op (dynamo traces custom autograd Functions). The first step pays the
compilation (≈25 s for SmolLM2 on 2 CPU cores, then 0.91x the eager step time: see
docs/benchmarks.md); the job reports that first step separately.
"""

from __future__ import annotations

from torch import nn


def repeated_blocks(model: nn.Module) -> nn.ModuleList:
    """The longest nn.ModuleList in the model: the transformer's layers."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of repeated blocks to compile.")
    return max(lists, key=len)


def compile_blocks(model: nn.Module, **options) -> int:
    """Compile every repeated block in place; returns how many."""
    blocks = repeated_blocks(model)
    for block in blocks:
        block.compile(**options)
    return len(blocks)
