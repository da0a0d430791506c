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

A variant is an object the layer asks per adapter (`layer.variants[name]`, PEFT's `LoraVariant`):
how the adapter starts (its magnitude), runs and merges — no mixin, no method-resolution order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.quant import float_weight


def row_norm(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """‖row‖ per output feature of a weight stored (out, in), or (in, out) when `transposed` (Conv1D)."""
    return torch.linalg.norm(weight, dim=0 if transposed else 1)


def per_output(factor: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A per-output-feature vector shaped to scale a weight in its stored layout."""
    return factor.view(1, -1) if transposed else factor.view(-1, 1)


class DoraVariant:
    """What DoRA changes for one adapter of a LoRA layer (linear: `DORA_LINEAR`; embedding: `DORA_EMBEDDING`).
    The layer provides `lora_magnitude_vector`, `dora_norms`, `factors`, `scaling`, `delta_weight` and
    `weight_transposed` (its weight stored (in, out): GPT-2's Conv1D, and an embedding's columns)."""

    banked = False  # the mixed-batch bank path runs plain LoRA rows only; a DoRA row takes the plain path

    def init(self, layer, name: str, magnitude: torch.Tensor | None) -> None:
        """m: the file's, or ‖W + s·BA‖ (so the adapter starts as the base)."""
        magnitude = self.norm(layer, name) if magnitude is None else magnitude
        layer.lora_magnitude_vector.set(name, nn.Parameter(magnitude.detach().to(layer._base_device())))

    def norm(self, layer, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """‖W + s·BA‖ per output feature, without gradient (`weight`: W as (out, in), if at hand)."""
        with torch.no_grad():
            weight = layer.base_weight_out_in() if weight is None else weight
            lora_a, lora_b = layer.factors(name)
            return row_norm(weight + layer.scaling[name] * (lora_b @ lora_a), transposed=False)

    def forward(self, layer, name: str, x: torch.Tensor, result: torch.Tensor | None) -> torch.Tensor:
        """(m/n − 1) ⊙ x Wᵀ + (m/n) ⊙ s·B(A(x_d)), n detached (PEFT's DoRA forward)."""
        scaling, lora_a, lora_b = layer.scaling[name], *layer.factors(name)
        weight = layer.base_weight_out_in()  # dequantized once per forward, for the norm and the base term
        scale = layer.lora_magnitude_vector.param(name) / self.norm(layer, name, weight).to(x.dtype)
        if result is None or (layer.training and layer.lora_dropout[name] > 0):
            x = layer._dropout(name, x)
            base = F.linear(x, weight.to(x.dtype))
        else:
            bias = layer.base_layer.bias
            base = result if bias is None else result - bias
        lora = F.linear(F.linear(x, lora_a), lora_b)
        return (scale - 1) * base + scale * lora * scaling

    def merged_weight(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        """W ← (m/n)·(W + ΔW), n = ‖W + ΔW‖ kept for unmerge."""
        combined = weight + layer.delta_weight(name).to(weight.dtype)
        norm = row_norm(combined.float(), layer.weight_transposed)
        layer.dora_norms[name] = norm
        factor = layer.lora_magnitude_vector.param(name).detach() / norm
        return (combined * per_output(factor, layer.weight_transposed)).to(weight.dtype)

    def unmerged_weight(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        factor = layer.lora_magnitude_vector.param(name).detach() / layer.dora_norms.pop(name)
        return (weight / per_output(factor, layer.weight_transposed) - layer.delta_weight(name)).to(weight.dtype)


class DoraEmbeddingVariant(DoraVariant):
    """An embedding's output features are its columns: n = ‖column of E + ΔW‖, y = (m/n) ⊙ (base + Δ)."""

    def norm(self, layer, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return row_norm(float_weight(layer.base_layer) + layer.delta_weight(name).float(), transposed=True)

    def forward(self, layer, name: str, x: torch.Tensor, result: torch.Tensor | None) -> torch.Tensor:
        scale = layer.lora_magnitude_vector.param(name) / self.norm(layer, name)
        return (scale - 1) * result + scale * layer.embedding_delta(x, name)


DORA_LINEAR = DoraVariant()
DORA_EMBEDDING = DoraEmbeddingVariant()
