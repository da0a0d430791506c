"""LoRA for linear maps (nn.Linear, GPT-2's Conv1D, bitsandbytes Linear4bit/8bitLt) and embeddings.

Linear (Hu et al. 2021, eq. 3), for each active adapter:

    y = base(x) + s · B(A(dropout(x)))        A: (r, in), B: (out, r), s = α/r or α/√r

Dropout touches only the LoRA path's input; the base path is exact. With
`init_lora_weights=True`, A ~ Kaiming-uniform(a=√5) (nn.Linear's default) and B = 0,
so Δ = 0 at step zero. B@A is never formed in the forward: the cost is two thin GEMMs,
(in→r) and (r→out), instead of one (in→out).

Embedding, as in PEFT (and loralib): A is (r, num_embeddings), B is (dim, r); the
lookup goes through A, so Δ(ids) = s · Aᵀ[ids] Bᵀ. Here the roles flip at init
(A = 0, B ~ N(0, 1)), and there is no dropout on an index lookup.

Parameter names (lora_A.<name>.weight, lora_embedding_A.<name>, base_layer.…) are
PEFT's, so state dicts and adapter files map one to one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.base_layers import conv1d_type, linear_features
from lorakit.errors import ConfigError
from lorakit.methods.base_layer import AdapterLayer, is_quantized_weight
from lorakit.methods.lora.dora import DoraMagnitude, DoraMerging, row_norm
from lorakit.methods.lora.fused import LoraLinearFunction, log_fallback_once
from lorakit.methods.lora.init import is_weight_init, weight_init_factors
from lorakit.quant import float_weight, keep_training_layout, requantize_like
from lorakit.routing import Routing


def adapter_parameter(tensor: torch.Tensor, device: torch.device) -> nn.Parameter:
    """A given adapter tensor as a parameter on the base layer's device, in its own dtype (loading
    upcasts half-precision files to fp32 first, as PEFT does: `autocast_adapter_dtype`)."""
    return nn.Parameter(tensor.to(device=device))


def linear_around(weight: nn.Parameter) -> nn.Linear:
    """A bias-free nn.Linear that uses `weight` as is, skipping nn.Linear.__init__'s random init
    (for 200+ layers that init is most of the cost of loading an adapter)."""
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.out_features, layer.in_features = weight.shape
    layer.weight = weight
    layer.register_parameter("bias", None)
    return layer


class LoraLayer(DoraMerging, AdapterLayer):
    """What LoRA's layers share: per adapter a rank r, α and the scaling s = α/r (α/√r with rsLoRA)."""

    peft_type = "LORA"

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}

    @property
    def adapters(self) -> list[str]:
        return list(self.r)

    def holds(self, name: str) -> bool:
        return name in self.r

    def _set_scaling(self, name: str, r: int, lora_alpha: float, use_rslora: bool) -> None:
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        for table in (self.r, self.lora_alpha, self.scaling):
            table.pop(name, None)


class LoraLinear(LoraLayer):
    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        # weight_transposed: GPT-2's Conv1D stores (in, out) — PEFT's fan_in_fan_out, DoRA's column norms
        self.in_features, self.out_features, self.weight_transposed = linear_features(base_layer)
        self.fusable_base = type(base_layer) in (nn.Linear, conv1d_type())  # float layers fused.py handles
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only (dora.py)
        self.dora_norms: dict[str, torch.Tensor] = {}  # ‖W + ΔW‖ of each merged DoRA adapter, for unmerge
        self.initial_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # PiSSA/OLoRA (A0, B0), init.py

    def adapter_containers(self) -> Iterable[nn.ModuleDict]:
        return (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector)

    def update_layer(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        weights: tuple[torch.Tensor, ...] | None = None,
        use_dora: bool = False,
    ) -> None:
        """Add adapter `name` (fp32, on the base layer's device); `weights` = (A, B[, m]) skips the init."""
        self._set_scaling(name, r, lora_alpha, use_rslora)
        self.lora_dropout[name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        device = self._base_device()
        if weights is not None:  # a loaded adapter: no allocation or init that would be overwritten
            lora_a, lora_b = (linear_around(adapter_parameter(w, device)) for w in weights[:2])
        else:
            lora_a = nn.Linear(self.in_features, r, bias=False, device=device)
            lora_b = nn.Linear(r, self.out_features, bias=False, device=device)
        if is_weight_init(init_lora_weights):  # also for a loaded adapter: the base must hold the residual
            initial = self.take_out_of_base(name, init_lora_weights)
            if weights is None:
                with torch.no_grad():
                    lora_a.weight.copy_(initial[0]), lora_b.weight.copy_(initial[1])
        elif weights is None and init_lora_weights is not False:  # False keeps nn.Linear's random init: B ≠ 0
            if init_lora_weights == "gaussian":
                nn.init.normal_(lora_a.weight, std=1 / r)
            else:
                nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_b.weight)
        self.lora_A[name], self.lora_B[name] = lora_a, lora_b
        if use_dora and self.base_is_4bit:
            keep_training_layout(self.base_layer)  # DoRA dequantizes W every forward (quant.py)
        if use_dora:
            magnitude = weights[2] if weights is not None and len(weights) > 2 else self.dora_norm(name)
            self.lora_magnitude_vector[name] = DoraMagnitude(adapter_parameter(magnitude.detach(), device))

    def adapter_output(self, x: torch.Tensor, name: str, result: torch.Tensor | None = None) -> torch.Tensor:
        lora_a = self.lora_A[name]
        x = x.to(lora_a.weight.dtype)  # a bf16/int8 base may hand us other dtypes
        if name in self.lora_magnitude_vector:
            return self.dora_output(x, name, result)
        return self.lora_B[name](lora_a(self.lora_dropout[name](x))) * self.scaling[name]

    # -- PiSSA / OLoRA (init.py) ------------------------------------------------------------------
    def take_out_of_base(self, name: str, init: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute (A0, B0) from the base weight and leave W − s·B0A0 in the base."""
        if is_quantized_weight(self.base_layer.weight) and init != "olora":
            raise ConfigError("PiSSA needs a full-precision base weight (its SVD of a quantized weight would be of the "
                              "quantization error too): initialise on the float base, then quantize the residual.")
        weight = self.base_weight_out_in()
        initial = weight_init_factors(weight, init, self.r[name], self.scaling[name])
        self.initial_factors[name] = initial
        self.set_base_weight(weight - self.scaling[name] * initial[1] @ initial[0])
        return initial

    def withheld_adapters(self) -> list[str]:
        return list(self.initial_factors)

    def withheld_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """s·B0(A0 x): the principal part PiSSA/OLoRA moved from the base weight into the adapter."""
        a0, b0 = self.initial_factors[name]
        return F.linear(F.linear(x.to(a0.dtype), a0), b0) * self.scaling[name]

    def set_base_weight(self, weight_out_in: torch.Tensor) -> None:
        """Write a float (out, in) weight into the base layer, in its layout, dtype or quantization."""
        old = self.base_layer.weight
        target = weight_out_in.t() if self.weight_transposed else weight_out_in
        if is_quantized_weight(old):
            self.base_layer.weight = requantize_like(old, target)
        else:
            with torch.no_grad():
                old.copy_(target.to(old.dtype))

    def restore_base(self, names: Iterable[str] | None = None) -> None:
        """Give back what PiSSA/OLoRA took out of the base weight (W_res + s·B0A0 = W)."""
        for name in list(self.initial_factors if names is None else names):
            if name in self.initial_factors:
                a0, b0 = self.initial_factors.pop(name)
                self.set_base_weight(self.base_weight_out_in() + self.scaling[name] * b0 @ a0)

    def delete_adapter(self, name: str) -> None:
        if name not in self.merged_adapters:  # a merged adapter is refused below, with nothing changed
            self.restore_base([name])
        super().delete_adapter(name)

    # -- DoRA (dora.py) ------------------------------------------------------------------------
    def base_weight_out_in(self) -> torch.Tensor:
        """The base weight as float (out, in), dequantized if needed."""
        weight = float_weight(self.base_layer)
        return weight.t() if self.weight_transposed else weight

    def dora_norm(self, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """‖W + s·BA‖ per output feature, without gradient (`weight`: W as (out, in), if at hand)."""
        with torch.no_grad():
            weight = self.base_weight_out_in() if weight is None else weight
            lora = self.lora_B[name].weight @ self.lora_A[name].weight
            return row_norm(weight + self.scaling[name] * lora, transposed=False)

    def dora_output(self, x: torch.Tensor, name: str, result: torch.Tensor | None) -> torch.Tensor:
        """(m/n − 1) ⊙ x Wᵀ + (m/n) ⊙ s·B(A(x_d)), n detached (PEFT's DoRA forward)."""
        dropout, scaling = self.lora_dropout[name], self.scaling[name]
        weight = self.base_weight_out_in()  # dequantized once per forward, for the norm and the base term
        scale = self.lora_magnitude_vector[name].weight / self.dora_norm(name, weight).to(x.dtype)
        if result is None or (self.training and not isinstance(dropout, nn.Identity)):
            x = dropout(x)
            base = F.linear(x, weight.to(x.dtype))
        else:
            bias = self.base_layer.bias
            base = result if bias is None else result - bias
        lora = self.lora_B[name](self.lora_A[name](x))
        return (scale - 1) * base + scale * lora * scaling

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """One `LoraLinearFunction` (lora_fn.py) for the common case: a single unmerged active
        adapter on a frozen float nn.Linear / Conv1D whose dtype matches the input and adapter."""
        names = [n for n in self.active_adapters if n in self.r]
        if len(names) != 1 or self.merged_adapters or not self.fusable_base:
            return None
        name = names[0]
        if name in self.lora_magnitude_vector:
            return None
        weight, bias = self.base_layer.weight, self.base_layer.bias
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
        if weight.requires_grad:  # a base being trained too (rare): the plain path computes its gradient
            return None
        if lora_a.dtype != lora_b.dtype or (x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type)):
            log_fallback_once(f"input {x.dtype}, base weight {weight.dtype}, adapter A {lora_a.dtype} / B {lora_b.dtype}")
            return None
        if self.weight_transposed:  # Conv1D keeps (in, out)
            weight = weight.t()
        return LoraLinearFunction.apply(x, self.lora_dropout[name](x), weight, bias, lora_a, lora_b, self.scaling[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = self.lora_B[name].weight @ self.lora_A[name].weight  # (out, r) @ (r, in)
        return (delta.T if self.weight_transposed else delta) * self.scaling[name]

    # -- mixed batches: one batched GEMM per rank bucket ------------------------------------------
    # With many adapters and few tokens per adapter (decode: one token per row), a GEMM pair per
    # adapter is all dispatch overhead. Instead, rows are bucketed by their adapter's rank (never
    # padded to another rank), each bucket's A and s·B are stacked per row once per batch routing,
    # and two bmm calls per bucket do the work:  h = bmm(x, Aᵀ) (n, T, r);  Δ = bmm(h, (s·B)ᵀ).
    # The stacks are cached on the routing, so only a routing reused across forwards (generate's
    # decode steps) uses this: for a one-off forward, stacking costs more than it saves
    # (bench/mixed_batch.py: 32 rows x 1 token, 32 adapters — one-off 0.60 s vs 0.47 s grouped;
    # reused 0.24 s). Inference only (no grad, no dropout): a cached stack carries no gradients.
    GATHER_MAX_TOKENS = 4  # decode-like shapes; prefill (64 tokens per row) is faster grouped

    def use_gathered(self, x: torch.Tensor, routing: Routing) -> bool:
        tokens = x.shape[1] if x.dim() == 3 else 1
        return (routing.reusable and not torch.is_grad_enabled() and tokens <= self.GATHER_MAX_TOKENS
                and not self.training_dropout() and not self.lora_magnitude_vector)  # DoRA rows go grouped

    def training_dropout(self) -> bool:
        return self.training and any(isinstance(d, nn.Dropout) and d.p > 0 for d in self.lora_dropout.values())

    def gathered_weights(self, routing: Routing, device: torch.device):
        """[(rows, (A (n, r, in), s·B (n, out, r)))] per rank bucket, cached on the routing."""
        def build():
            buckets: dict[int, list[tuple[int, str]]] = {}
            for row, name in enumerate(routing.names):
                if name in self.r:
                    buckets.setdefault(self.r[name], []).append((row, name))
            out = []
            for members in buckets.values():
                rows = torch.tensor([row for row, _ in members], dtype=torch.long, device=device)
                a = torch.stack([self.lora_A[name].weight for _, name in members])
                b = torch.stack([self.lora_B[name].weight * self.scaling[name] for _, name in members])
                out.append((rows, (a, b)))
            return out
        return routing.cached_for(self, device, build)

    @staticmethod
    def gathered_output(x: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        a, b = weights
        x3 = (x if x.dim() == 3 else x.unsqueeze(1)).to(a.dtype)  # (n, T, in)
        delta = torch.bmm(torch.bmm(x3, a.transpose(1, 2)), b.transpose(1, 2))  # (n, T, r) -> (n, T, out)
        return delta if x.dim() == 3 else delta.squeeze(1)


class LoraEmbedding(LoraLayer):
    weight_transposed = True  # E is (num_embeddings, dim): the output features are its columns

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.in_features = base_layer.num_embeddings
        self.out_features = base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only (dora.py)
        self.dora_norms: dict[str, torch.Tensor] = {}

    def adapter_containers(self) -> Iterable[nn.ParameterDict | nn.ModuleDict]:
        return (self.lora_embedding_A, self.lora_embedding_B, self.lora_magnitude_vector)

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
        self._set_scaling(name, r, lora_alpha, use_rslora)
        device = self._base_device()
        if weights is not None:
            self.lora_embedding_A[name], self.lora_embedding_B[name] = (adapter_parameter(w, device) for w in weights[:2])
        else:
            weight_a = torch.randn(r, self.in_features, device=device)
            weight_b = torch.randn(self.out_features, r, device=device)
            if init_lora_weights is not False:
                weight_a.zero_()
            self.lora_embedding_A[name] = nn.Parameter(weight_a)
            self.lora_embedding_B[name] = nn.Parameter(weight_b)
        if use_dora:
            magnitude = weights[2] if weights is not None and len(weights) > 2 else self.dora_norm(name)
            self.lora_magnitude_vector[name] = DoraMagnitude(adapter_parameter(magnitude.detach(), device))

    def dora_norm(self, name: str) -> torch.Tensor:
        """‖column of E + ΔW‖ per embedding dimension, without gradient."""
        with torch.no_grad():
            return row_norm(float_weight(self.base_layer) + self.delta_weight(name).float(), transposed=True)

    def adapter_output(self, x: torch.Tensor, name: str, result: torch.Tensor | None = None) -> torch.Tensor:
        if name in self.lora_magnitude_vector:  # y = (m/n) ⊙ (result + Δ(x)), n detached (PEFT)
            scale = self.lora_magnitude_vector[name].weight / self.dora_norm(name)
            return (scale - 1) * result + scale * self.embedding_delta(x, name)
        return self.embedding_delta(x, name)

    def embedding_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_layer
        after_a = F.embedding(  # (..., r): the same lookup options as the base embedding
            x, self.lora_embedding_A[name].T, padding_idx=base.padding_idx, max_norm=base.max_norm,
            norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse,
        )
        out = (after_a @ self.lora_embedding_B[name].T) * self.scaling[name]
        embed_scale = getattr(base, "embed_scale", None)  # Gemma-style scaled embeddings
        if isinstance(embed_scale, torch.Tensor):
            embed_scale = embed_scale.to(out.dtype)
        return out if embed_scale is None else out * embed_scale

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = self.lora_embedding_B[name] @ self.lora_embedding_A[name]  # (dim, num_embeddings)
        return delta.T * self.scaling[name]
