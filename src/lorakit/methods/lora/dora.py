"""DoRA (Liu et al. 2024): a learned magnitude per output feature times a LoRA-updated direction.

    W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_row          m initialised to ‖W + s·BA‖_row (so W' = W)

computed without forming W' in the forward (PEFT's formulation, which we match number for
number):

    y = base(x) + (m/n − 1) ⊙ (x Wᵀ) + (m/n) ⊙ s·B(A(x_d)),    n = ‖W + s·BA‖_row, detached

`n` is detached in the backward pass, as the paper recommends (§4.3) and PEFT does, so the
gradient reaches m and the LoRA factors only. With dropout on (training), x Wᵀ is recomputed
from the dropped input, as in PEFT; otherwise the base output is reused (minus its bias). A
quantized base is dequantized to take the norm (`float_weight`).

Merging: W ← (m/n)·(W + ΔW) with n = ‖W + ΔW‖_row; the norm is kept so unmerge can undo
it exactly (W = W'/(m/n) − ΔW).

Embedding (PEFT's DoraEmbeddingLayer): the output features are the embedding dimensions, so
n is the norm of each column of E + s·(BA)ᵀ, and y = (m/n) ⊙ (base(x) + s·Δ(x)).
"""

from __future__ import annotations

import torch
from torch import nn


class DoraMagnitude(nn.Module):
    """Holds m as `.weight`, so state-dict keys are PEFT's (`lora_magnitude_vector.<name>.weight`)."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


def row_norm(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """‖row‖ per output feature of a weight stored (out, in), or (in, out) when `transposed` (Conv1D)."""
    return torch.linalg.norm(weight, dim=0 if transposed else 1)


def per_output(factor: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A per-output-feature vector shaped to scale a weight in its stored layout."""
    return factor.view(1, -1) if transposed else factor.view(-1, 1)


class DoraMerging:
    """`merged_weight` / `unmerged_weight` for a layer that may hold DoRA adapters (a mixin,
    listed before AdapterLayer). The layer provides `lora_magnitude_vector`, `dora_norms`,
    `delta_weight(name)` and `weight_transposed` (True when its weight is stored (in, out):
    GPT-2's Conv1D, and an embedding, whose output features are its columns)."""

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if name not in self.lora_magnitude_vector:
            return super().merged_weight(name, weight)
        combined = weight + self.delta_weight(name).to(weight.dtype)
        norm = row_norm(combined.float(), self.weight_transposed)
        self.dora_norms[name] = norm
        factor = self.lora_magnitude_vector[name].weight.detach() / norm
        return (combined * per_output(factor, self.weight_transposed)).to(weight.dtype)

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if name not in self.lora_magnitude_vector:
            return super().unmerged_weight(name, weight)
        factor = self.lora_magnitude_vector[name].weight.detach() / self.dora_norms.pop(name)
        return (weight / per_output(factor, self.weight_transposed) - self.delta_weight(name)).to(weight.dtype)
