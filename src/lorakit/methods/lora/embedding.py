"""LoRA for embeddings, as in PEFT (and loralib): A is (r, num_embeddings), B is (dim, r).

The lookup goes through A, so Δ(ids) = s · Aᵀ[ids] Bᵀ. The roles flip at init (A = 0,
B ~ N(0, 1)), and there is no dropout on an index lookup. Parameter names are PEFT's
(`lora_embedding_A.<name>`, no `.weight`); the factors live in the layer's slot bank like a
linear layer's (A's "in" is the vocabulary). Mixed batches run the plain per-group path: one
embedding layer per model, a lookup per group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.methods.bank import AdapterWeights
from lorakit.methods.lora.dora import DORA_EMBEDDING
from lorakit.methods.lora.layer import LoraLayer


class LoraEmbedding(LoraLayer):
    weight_transposed = True  # E is (num_embeddings, dim): the output features are its columns
    input_feature_dims = 0  # one token is one id

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer, base_layer.num_embeddings, base_layer.embedding_dim, suffix="_embedding")
        self.lora_embedding_A = AdapterWeights(suffix="")
        self.lora_embedding_B = AdapterWeights(suffix="")

    def update_layer(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,  # accepted for a uniform signature; a lookup has nothing to drop
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        weights: tuple[torch.Tensor, ...] | None = None,
        use_dora: bool = False,
    ) -> None:
        device = self._base_device()
        if weights is not None:
            a, b = (w.to(device=device) for w in weights[:2])
        else:
            a = torch.randn(r, self.in_features, device=device)
            b = torch.randn(self.out_features, r, device=device)
            if init_lora_weights is not False:
                a.zero_()
        self._store(name, r, lora_alpha, use_rslora, a, b, banked=False)
        if use_dora:
            self._add_variant(name, DORA_EMBEDDING, weights)

    def adapter_output(self, x: torch.Tensor, name: str, result: torch.Tensor | None = None) -> torch.Tensor:
        if name in self.variants:
            return self.variants[name].forward(self, name, x, result)
        return self.embedding_delta(x, name)

    def embedding_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_layer
        lora_a, lora_b = self.factors(name)
        after_a = F.embedding(  # (..., r): the same lookup options as the base embedding
            x, lora_a.T, padding_idx=base.padding_idx, max_norm=base.max_norm,
            norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse,
        )
        out = (after_a @ lora_b.T) * self.scaling[name]
        embed_scale = getattr(base, "embed_scale", None)  # Gemma-style scaled embeddings
        if isinstance(embed_scale, torch.Tensor):
            embed_scale = embed_scale.to(out.dtype)
        return out if embed_scale is None else out * embed_scale

    def delta_weight(self, name: str) -> torch.Tensor:
        lora_a, lora_b = self.factors(name)
        delta = lora_b @ lora_a  # (dim, num_embeddings)
        return delta.T * self.scaling[name]
