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

from lorakit.errors import ConfigError
from lorakit.layer_shapes import conv1d_type, linear_features
from lorakit.methods.adapter_layer import AdapterLayer, is_quantized_weight
from lorakit.methods.bank import AdapterWeights, SlotBank
from lorakit.methods.lora.dora import DORA_LINEAR
from lorakit.methods.lora.fused import LoraLinearFunction, log_fallback_once
from lorakit.methods.lora.init import is_weight_init, weight_init_factors
from lorakit.methods.lora.mixed import banked_delta
from lorakit.quant import float_weight, keep_training_layout, requantize_like
from lorakit.routing import Routing


class LoraLayer(AdapterLayer):
    """What LoRA's layers share: per adapter a rank r, α and the scaling s = α/r (α/√r with rsLoRA),
    and the factors A (r, in), B (out, r): plain Parameters on a training model, rows of this layer's
    slot bank on a serving model (methods/bank.py, which also says how the two stay apart)."""

    peft_type = "LORA"

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, suffix: str):
        super().__init__(base_layer)
        self.in_features, self.out_features = in_features, out_features
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}  # p per adapter (PEFT holds nn.Dropout modules; same RNG use)
        self.slots: dict[str, int] = {}  # each adapter's slot in `bank` (the adapter set's number for it)
        self.banked: dict[str, bool] = {}  # whether the banked path runs it (not DoRA)
        self.bank = SlotBank(in_features, out_features)
        self.variants: dict[str, object] = {}  # adapter → its LoRA variant (dora.py), for those that have one
        self.lora_magnitude_vector = AdapterWeights()  # DoRA adapters only (dora.py)
        self.dora_norms: dict[str, torch.Tensor] = {}  # ‖W + ΔW‖ of each merged DoRA adapter, for unmerge
        self.factor_names = (f"lora{suffix}_A", f"lora{suffix}_B")  # PEFT's: lora_A / lora_embedding_A, …
        # a training model's bank rows: adapter → (A, its version, B, its version, scaling) they were copied from
        self._copied: dict[str, tuple] = {}
        self._copied_at: tuple[int, int] = (-1, -1)  # the containers' `replaced` counts when they were

    @property
    def adapters(self) -> list[str]:
        return list(self.r)

    def holds(self, name: str) -> bool:
        return name in self.r

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of adapter `name`: A is (r, in) and B is (out, r) for every LoRA layer kind — its Parameters,
        or its bank row on a serving model."""
        a_container = getattr(self, self.factor_names[0])
        if name in a_container:
            return a_container.param(name), getattr(self, self.factor_names[1]).param(name)
        return self.bank.row(self.slots[name])

    def adapter_containers(self) -> tuple[AdapterWeights, ...]:
        return (*(getattr(self, attr) for attr in self.factor_names), self.lora_magnitude_vector)

    def _store(self, name: str, r: int, lora_alpha: float, use_rslora: bool, a: torch.Tensor, b: torch.Tensor,
               banked: bool) -> None:
        """Record the scalars and keep (A, B): as PEFT-named Parameters (training), or in a bank row (serving)."""
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.slots[name] = slot = self.adapter_set.slot(name)
        self.banked[name] = banked
        if self.adapter_set.serving:
            self.bank.set_slot(slot, a, b, self.scaling[name], banked)
            return
        for attr, factor in zip(self.factor_names, (a, b), strict=True):
            getattr(self, attr).set(name, nn.Parameter(factor))

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        if name in self.slots:
            self.bank.reset_slot(self.slots.pop(name))
        self._copied.pop(name, None)
        for table in (self.r, self.lora_alpha, self.scaling, self.banked, self.variants):
            table.pop(name, None)

    def _add_variant(self, name: str, variant, weights: tuple[torch.Tensor, ...] | None) -> None:
        self.variants[name] = variant
        variant.init(self, name, weights[2] if weights is not None and len(weights) > 2 else None)

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        variant = self.variants.get(name)
        return super().merged_weight(name, weight) if variant is None else variant.merged_weight(self, name, weight)

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        variant = self.variants.get(name)
        return super().unmerged_weight(name, weight) if variant is None else variant.unmerged_weight(self, name, weight)

    def _apply(self, fn, recurse: bool = True):
        """`.to()`, `.half()`, …: a serving model's bank rows move with the module; a training model's bank is
        a derived copy, re-made from the parameters when next needed."""
        super()._apply(fn, recurse)
        if self.adapter_set.serving:
            self.bank.convert(fn)
        else:
            self.bank.clear()
            self._copied.clear()
        return self

    def __getstate__(self) -> dict:
        """Pickled or deep-copied: the copy's parameters are new tensors whose versions restart, so it re-makes its
        bank rows from them rather than trust versions recorded on the originals."""
        return {**super().__getstate__(), "_copied": {}, "_copied_at": (-1, -1)}

    def _dropout(self, name: str, x: torch.Tensor) -> torch.Tensor:
        p = self.lora_dropout.get(name, 0.0)
        return F.dropout(x, p, self.training) if p > 0 else x

    def training_dropout(self) -> bool:
        return self.training and any(p > 0 for p in self.lora_dropout.values())


class LoraLinear(LoraLayer):
    def __init__(self, base_layer: nn.Module):
        # weight_transposed: GPT-2's Conv1D stores (in, out) — PEFT's fan_in_fan_out, DoRA's column norms
        in_features, out_features, transposed = linear_features(base_layer)
        super().__init__(base_layer, in_features, out_features, suffix="")
        self.weight_transposed = transposed
        self.fusable_base = type(base_layer) in (nn.Linear, conv1d_type())  # float layers fused.py handles
        self.lora_A = AdapterWeights()
        self.lora_B = AdapterWeights()
        self.initial_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # PiSSA/OLoRA (A0, B0), init.py

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
        self.lora_dropout[name] = lora_dropout
        device = self._base_device()
        if weights is not None:  # a loaded adapter, in its own dtype (files upcast half precision, as PEFT)
            a, b = (w.to(device=device) for w in weights[:2])
        else:  # nn.Linear's init for both, then PEFT's reset: the same random stream as PEFT
            a, b = torch.empty(r, self.in_features, device=device), torch.empty(self.out_features, r, device=device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        if is_weight_init(init_lora_weights):  # also for a loaded adapter: the base must hold the residual
            initial = self.take_out_of_base(name, init_lora_weights, r, scaling)
            if weights is None:  # a copy: the adapter trains, its initial part (A0, B0) must not move with it
                a, b = initial[0].to(a.dtype, copy=True), initial[1].to(b.dtype, copy=True)
        elif weights is None and init_lora_weights is not False:  # False keeps nn.Linear's random init: B ≠ 0
            if init_lora_weights == "gaussian":
                nn.init.normal_(a, std=1 / r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)
        self._store(name, r, lora_alpha, use_rslora, a, b, banked=not use_dora)
        if use_dora and self.base_is_4bit:
            keep_training_layout(self.base_layer)  # DoRA dequantizes W every forward (quant.py)
        if use_dora:
            self._add_variant(name, DORA_LINEAR, weights)

    def adapter_output(self, x: torch.Tensor, name: str, result: torch.Tensor | None = None) -> torch.Tensor:
        lora_a, lora_b = self.factors(name)
        x = x.to(lora_a.dtype)  # a bf16/int8 base may hand us other dtypes
        if name in self.variants:
            return self.variants[name].forward(self, name, x, result)
        return F.linear(F.linear(self._dropout(name, x), lora_a), lora_b) * self.scaling[name]

    # -- PiSSA / OLoRA (init.py) ------------------------------------------------------------------
    def take_out_of_base(self, name: str, init: str, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute (A0, B0) from the base weight and leave W − s·B0A0 in the base."""
        if is_quantized_weight(self.base_layer.weight) and init != "olora":
            raise ConfigError("PiSSA needs a full-precision base weight (its SVD of a quantized weight would be of the "
                              "quantization error too): initialise on the float base, then quantize the residual.")
        weight = self.base_weight_out_in()
        initial = weight_init_factors(weight, init, r, scaling)
        self.initial_factors[name] = initial
        self.set_base_weight(weight - scaling * initial[1] @ initial[0])
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

    def base_weight_out_in(self) -> torch.Tensor:
        """The base weight as float (out, in), dequantized if needed."""
        weight = float_weight(self.base_layer)
        return weight.t() if self.weight_transposed else weight

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """One `LoraLinearFunction` (lora_fn.py) for the common case: a single unmerged active
        adapter on a frozen float nn.Linear / Conv1D whose dtype matches the input and adapter."""
        names = [n for n in self.active_adapters if n in self.r]
        if len(names) != 1 or self.merged_adapters or not self.fusable_base:
            return None
        name = names[0]
        if name in self.variants:
            return None
        weight, bias = self.base_layer.weight, self.base_layer.bias
        lora_a, lora_b = self.factors(name)
        if weight.requires_grad:  # a base being trained too (rare): the plain path computes its gradient
            return None
        if lora_a.dtype != lora_b.dtype or (x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type)):
            log_fallback_once(f"input {x.dtype}, base weight {weight.dtype}, adapter A {lora_a.dtype} / B {lora_b.dtype}")
            return None
        if self.weight_transposed:  # Conv1D keeps (in, out)
            weight = weight.t()
        return LoraLinearFunction.apply(x, self._dropout(name, x), weight, bias, lora_a, lora_b, self.scaling[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        lora_a, lora_b = self.factors(name)
        delta = lora_b @ lora_a  # (out, r) @ (r, in)
        return (delta.T if self.weight_transposed else delta) * self.scaling[name]

    def sync_bank(self, names) -> None:
        """A training model's bank rows as copies of its parameters (bank.py), re-made for an adapter whose A or B
        changed in place (its version moved), was replaced (its container's `replaced` count moved: assign=True
        loads, set) or whose scaling changed. A mixed step routes every adapter through every layer, so the
        check is a few attribute reads per adapter, not a lookup of its parameters (bench/mixed_batch.py)."""
        a_weights, b_weights = (getattr(self, attr) for attr in self.factor_names)
        if self._copied_at != (a_weights.replaced, b_weights.replaced):
            self._copied, self._copied_at = {}, (a_weights.replaced, b_weights.replaced)
        for name in names:
            if name not in self.r:
                continue
            scaling, seen = self.scaling[name], self._copied.get(name)
            if seen is not None and seen[0]._version == seen[1] and seen[2]._version == seen[3] and seen[4] == scaling:
                continue
            a, b = a_weights.param(name), b_weights.param(name)
            self.bank.set_slot(self.slots[name], a.detach(), b.detach(), scaling, self.banked[name])
            self._copied[name] = (a, a._version, b, b._version, scaling)

    def banked_output(self, x: torch.Tensor, out: torch.Tensor, routing: Routing, tokens_per_entry: int) -> list[str]:
        """Every non-DoRA routed adapter in one bmm pair per rank bucket, from the bank (mixed.py)."""
        adapter_set = self.adapter_set
        if not adapter_set.serving:
            self.sync_bank(routing.adapters())
        slots = routing.cached(("slots", id(adapter_set)), lambda: [adapter_set.slots.get(n, -1) for n in routing.names])
        return banked_delta(self.bank, x, out, routing, slots, tokens_per_entry)
