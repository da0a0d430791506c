"""`AdapterLayer`: one frozen base module plus any number of named low-rank adapters.

What every adapted layer shares, whatever the base (Linear, Conv1D, Embedding, a
bitsandbytes 4/8-bit Linear): the bookkeeping of which adapters exist, which are active,
which are merged, and the three ways to run:

    y = base(x) + Σ_{a active, not merged} Δ_a(x)           (stacking; default)
    y = base(x)                                              (adapters disabled)
    y[i] = base(x)[i] + Δ_{names[i]}(x[i])                   (per-row adapter choice)

Which adapters are active, whether adapters are disabled and whether the fast path is on
are not this layer's flags: they are the state of the model's `AdapterSet` (adapters.py),
which every layer of a model shares (`self.adapter_set`); a layer built on its own gets a
set of its own. A per-row or per-token choice comes with the call (routing.py).

Subclasses (one per method) supply the maths: `adapter_output(x, name, result)` = Δ(x), `delta_weight(name)` =
ΔW in the base weight's own layout, and `merged_weight` where a merge is not W + ΔW (DoRA).
The base layer is only ever
*called*; its `.weight` is read only to merge, and merging refuses quantized weights
(merging into 4-bit storage would bake the quantization error into the model).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext

import torch
from torch import nn

from lorakit.adapters import AdapterSet, SharesAdapterSet
from lorakit.errors import AdapterStateError, MergeError
from lorakit.quant import float_weight, keep_training_layout, quant_kind, requantize_like
from lorakit.routing import Routing, adapter_routing, current_routing


def is_quantized_weight(weight: torch.Tensor) -> bool:
    """bitsandbytes stores 4/8-bit weights as Params4bit / Int8Params (uint8 / int8 data)."""
    return quant_kind(weight) is not None or not weight.dtype.is_floating_point


class AdapterLayer(SharesAdapterSet, nn.Module):
    """Base of every adapted layer; holds per-adapter scalars and the merge/route logic."""

    peft_type: str  # which method (methods/registry.py) this layer belongs to, e.g. "LORA"
    input_feature_dims = 1  # trailing input dims of one token (1 for a linear layer, 0 for an embedding's ids)

    def __init__(self, base_layer: nn.Module, adapter_set: AdapterSet | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.adapter_set = adapter_set if adapter_set is not None else AdapterSet()
        self.merged_adapters: list[str] = []  # in merge order, so unmerge can go in reverse
        self.merged_into_quantized = False  # a requantizing merge cannot be undone
        self.base_is_4bit = quant_kind(getattr(base_layer, "weight", None)) == "4bit"

    @property
    def fused(self) -> bool:
        """Whether `fused_forward` may run (the model's fast path); False: the plain reference path."""
        return self.adapter_set.fast_path

    # HF model code sometimes reads these straight off a submodule (tied embeddings, T5).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)  # an Embedding has none

    # -- what a subclass provides ----------------------------------------------------
    def adapter_output(self, x: torch.Tensor, name: str, result: torch.Tensor | None = None) -> torch.Tensor:
        """Δ_name(x): the adapter's additive contribution to the output (`result`: the output so
        far, base included — DoRA rescales it, as PEFT does)."""
        raise NotImplementedError

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The weight with adapter `name` merged in (same layout): W + ΔW for LoRA."""
        return weight + self.delta_weight(name).to(weight.dtype)

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The inverse of `merged_weight`."""
        return weight - self.delta_weight(name).to(weight.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW_name in the layout of `base_layer.weight` (so merge is `W += ΔW`)."""
        raise NotImplementedError

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The same output as the plain path in one autograd op, or None where none applies."""
        return None

    def restore_base(self, names: Iterable[str] | None = None) -> None:
        """Give back to the base weight what adapters took out of it at init (PiSSA/OLoRA); most take nothing."""

    def withheld_adapters(self) -> Sequence[str]:
        """Adapters that took part of the base weight into themselves (PiSSA/OLoRA): the base
        layer holds W − (that part), so a row not using such an adapter must get it back."""
        return ()

    def withheld_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """What adapter `name` took out of the base layer's output for input x (see above)."""
        raise NotImplementedError

    def banked_output(self, x: torch.Tensor, out: torch.Tensor, routing: Routing,
                      tokens_per_entry: int) -> Sequence[str] | None:
        """Add into `out` (tokens, out) the deltas of the routed adapters this layer can run from its
        weight banks in one batched op per bucket (x: (tokens, …)); return the routed adapters it
        holds and left to the plain path, or None if it has no banked path. Called only under
        no_grad, outside dropout, unless the routing asks for the reference path."""
        return None

    def adapter_containers(self) -> Iterable[nn.Module]:
        """The `AdapterWeights` (methods/bank.py) keyed by adapter name that hold this layer's parameters."""
        raise NotImplementedError

    def training_dropout(self) -> bool:
        """Whether a forward now would drop inputs (the banked path has no dropout)."""
        return False

    def active_output(self, x: torch.Tensor, names: Sequence[str], *args, **kwargs) -> torch.Tensor:
        """The output with adapters `names` applied: base(x) + Σ Δ_name(x) (stacking); a method whose
        adapters compose otherwise (IA3 multiplies its scalings) overrides this."""
        result = self.base_layer(x, *args, **kwargs)
        for name in names:
            result = result + self.adapter_output(x, name, result).to(result.dtype)
        return result

    def merged_bias(self, name: str, bias: torch.Tensor) -> torch.Tensor:
        """The base bias with adapter `name` merged (unchanged for most methods)."""
        return bias

    def unmerged_bias(self, name: str, bias: torch.Tensor) -> torch.Tensor:
        return bias

    # -- adapters ----------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        """The adapters this layer holds, in the order they were added."""
        raise NotImplementedError

    def holds(self, name: str) -> bool:
        return name in self.adapters

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        for container in self.adapter_containers():
            if name in container:
                yield container.param(name)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise AdapterStateError(f"Adapter {name!r} is merged; unmerge it before deleting it.")
        for container in self.adapter_containers():
            container.remove(name)

    def set_adapter(self, names: Sequence[str], trainable: bool) -> None:
        """Activate `names` (stacked) in this layer's set; only active adapters' parameters require grad
        (a layer used on its own; a model sets its whole set at once)."""
        self.adapter_set.active = list(names)
        self.set_trainable(names, trainable)

    def set_trainable(self, names: Sequence[str], trainable: bool) -> None:
        """Only `names`' parameters require grad here (and only if `trainable`)."""
        for name in self.adapters:
            self.set_requires_grad(name, trainable and name in names)

    def set_requires_grad(self, name: str, requires_grad: bool) -> None:
        for param in self.adapter_parameters(name):
            param.requires_grad_(requires_grad)
        if requires_grad and self.base_is_4bit:
            keep_training_layout(self.base_layer)  # no gradient-less inference kernel (quant.py)

    def _base_device(self) -> torch.device:
        param = next(self.base_layer.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, adapter_names: Sequence[str] | None = None, **kwargs) -> torch.Tensor:
        routing = Routing(adapter_names) if adapter_names is not None else current_routing()
        if self.base_is_4bit and torch.is_grad_enabled() and keep_training_layout(self.base_layer):
            warnings.warn("A 4-bit base layer had been repacked for bitsandbytes' CPU inference kernel, which has no "
                          "backward; it was converted back (best effort) before this gradient-enabled forward. "
                          "Make adapters trainable before evaluating to avoid the repacking.", stacklevel=2)
        if self.adapter_set.disabled:
            if self.merged_adapters:
                raise AdapterStateError("Adapters are merged into the weights; unmerge them before disabling.")
            return self._give_back(x, self.base_layer(x, *args, **kwargs), using=())
        if routing is not None:
            return self._routed_forward(x, routing, *args, **kwargs)
        result = self.fused_forward(x) if self.fused and not args and not kwargs else None
        if result is None:
            names = [n for n in self.active_adapters if self.holds(n) and n not in self.merged_adapters]
            result = self.active_output(x, names, *args, **kwargs)
        return self._give_back(x, result, using=(*self.active_adapters, *self.merged_adapters))

    def _give_back(self, x: torch.Tensor, result: torch.Tensor, using: Sequence[str]) -> torch.Tensor:
        """Add back what withheld adapters not in `using` took out of the base (PiSSA/OLoRA), so
        the base — disabled adapters, `__base__` rows, other adapters — is the original model."""
        for name in self.withheld_adapters():
            if name not in using:
                result = result + self.withheld_output(x, name).to(result.dtype)
        return result

    def _routed_forward(self, x: torch.Tensor, routing: Routing, *args, **kwargs) -> torch.Tensor:
        """Each entry (row, or token of a packed batch) with its own adapter. Works on the batch
        flattened to tokens: `out` is a view of the base output, updated in place."""
        if self.merged_adapters:
            raise AdapterStateError(
                f"Adapters {self.merged_adapters} are merged into the weights, so rows cannot choose adapters; "
                "call unmerge_adapter() first."
            )
        feature_shape = x.shape[x.dim() - self.input_feature_dims:]
        flat_x = x.reshape(-1, *feature_shape)
        per_entry = routing.tokens_per_entry(x.shape[0], flat_x.shape[0])
        result = self.base_layer(x, *args, **kwargs).contiguous()
        out = result.view(flat_x.shape[0], -1)
        plain = None
        if not routing.reference and not torch.is_grad_enabled() and not self.training_dropout():
            plain = self.banked_output(flat_x, out, routing, per_entry)
        groups = routing.groups(x.device, per_entry)
        stacked = isinstance(self.base_layer, AdapterLayer)  # another method's layer inside (methods.layer_chain)
        for name in routing.adapters() if plain is None else plain:  # the plain path: a GEMM pair per group
            if self.holds(name):  # this layer may not be targeted by every adapter
                tokens = groups[name]
                # A method that runs its base on the group's tokens (IA3 on inputs) calls the layers inside
                # with those tokens only: they get the group's routing, so they pass its rows untouched.
                with adapter_routing(Routing([name] * len(tokens), per_token=True)) if stacked else nullcontext():
                    delta = self.adapter_output(flat_x.index_select(0, tokens), name, out.index_select(0, tokens))
                out.index_add_(0, tokens, delta.to(out.dtype))
        for name in self.withheld_adapters():  # entries of other adapters and __base__ get the original base
            tokens = routing.tokens_not_using(name, x.device, per_entry)
            if len(tokens):
                out.index_add_(0, tokens, self.withheld_output(flat_x.index_select(0, tokens), name).to(out.dtype))
        return result

    # -- merge -----------------------------------------------------------------------------
    def check_merge(self, names: Sequence[str], check_finite: bool = False, allow_quantized: bool = False) -> None:
        """Raise if merging `names` here is not possible (already merged, quantized weights) or,
        with `check_finite`, would give NaN/Inf weights. Changes nothing."""
        held = [name for name in names if self.holds(name)]
        if not held:
            return
        twice = [name for name in held if name in self.merged_adapters]
        if twice:
            raise AdapterStateError(f"Adapter(s) {twice} already merged; merging again would add them twice.")
        weight = self.base_layer.weight
        if is_quantized_weight(weight) and not allow_quantized:
            raise MergeError(
                f"{type(self.base_layer).__name__} stores quantized weights ({type(weight).__name__}, {weight.dtype}); "
                "merging into them would bake the quantization error into the model. Merge into a full-precision "
                "base instead: `lorakit merge --base <full-precision model> --adapter <saved adapter> --out <dir> "
                "[--requantize nf4]`. To merge into the quantized weights anyway, pass allow_quantized_merge=True "
                "to merge_and_unload (it dequantizes, merges, requantizes and reports the error)."
            )
        if check_finite:
            merged = float_weight(self.base_layer)
            for name in held:
                merged = self.merged_weight(name, merged)
                if not torch.isfinite(merged).all():
                    raise MergeError(f"Merging adapter {name!r} gives NaN/Inf weights; the adapter seems broken.")

    def merge(self, names: Sequence[str], safe_merge: bool = False, checked: bool = False,
              allow_quantized: bool = False) -> float | None:
        """W += ΔW for each named adapter this layer holds (`checked`: the caller ran check_merge).

        Into quantized weights (only with `allow_quantized`): dequantize, add, requantize with
        the same settings; returns ‖Q(W+ΔW) − (W+ΔW)‖ / ‖ΔW‖, the share of the update lost to
        requantization. Such a merge cannot be undone.
        """
        if not checked:
            self.check_merge(names, check_finite=safe_merge, allow_quantized=allow_quantized)
        held = [name for name in names if self.holds(name)]
        weight = self.base_layer.weight
        if held and is_quantized_weight(weight):
            start = target = float_weight(self.base_layer)
            for name in held:
                target = self.merged_weight(name, target)
            self.base_layer.weight = requantize_like(weight, target)
            for name in held:
                self._merge_bias(name, self.merged_bias)
            self.merged_adapters.extend(held)
            self.merged_into_quantized = True
            update = (target - start).norm().clamp_min(1e-12)
            return ((float_weight(self.base_layer) - target).norm() / update).item()
        for name in held:
            weight.data.copy_(self.merged_weight(name, weight.data))
            self._merge_bias(name, self.merged_bias)
            self.merged_adapters.append(name)
        return None

    def _merge_bias(self, name: str, rule) -> None:
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None:
            bias.data.copy_(rule(name, bias.data))

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        """W -= ΔW, newest merge first. Restores W up to float rounding of one add and one subtract."""
        if self.merged_into_quantized:
            raise AdapterStateError("These adapters were merged into quantized weights, which cannot be undone.")
        names = list(self.merged_adapters) if names is None else list(names)
        for name in reversed(list(self.merged_adapters)):
            if name in names:
                weight = self.base_layer.weight
                weight.data.copy_(self.unmerged_weight(name, weight.data))
                self._merge_bias(name, self.unmerged_bias)
                self.merged_adapters.remove(name)
