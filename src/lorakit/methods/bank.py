"""Slot-indexed weight banks: where a layer's LoRA factors live, so adapters come and go as tensor writes.

Each adapted layer keeps, per rank bucket (r, dtype), two preallocated tensors

    A: (capacity, r, in)        B: (capacity, out, r)

and each adapter occupies one row of its bucket (its *local* index). The PEFT-named
parameters (the A and B factor of each adapter) are `nn.Parameter`s whose storage *is* that row,
so `named_parameters()`, `state_dict()`, optimizers and Trainer see PEFT's names while a
gradient step writes straight into the bank. Loading an adapter copies its tensors into a
free row; deleting one frees the row. Neither adds nor removes a module (vLLM / S-LoRA keep
adapters in slot-indexed stacks for the same reason: a live model must not be re-built).

Growth: a bucket starts with one row (a training run with one adapter holds exactly its
weights) and grows by 1/16 (at least 4 rows), so a bank of n adapters holds at most
max(4 rows, 6%) unused; loading N adapters copies each one ~16 times over its life, cheap
next to reading its file (bench/mixed_batch.py: 200 adapters, 2.4% slack).

Aliasing is the invariant: after anything that gives parameters new storage (`model.to()`,
`.half()`, deepcopy, pickling) the layer calls `retie`, which rebuilds the banks from the
parameters. The mixed-batch fast path (routing.py, lora/layer.py) reads the banks directly,
under `torch.no_grad()` only — a bank carries no autograd history; training goes through the
parameters.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

Key = tuple[int, torch.dtype]  # (rank, dtype)


class Bucket:
    """The rows of one (rank, dtype): A (cap, r, in), B (cap, out, r), a scaling per row, and who owns each row."""

    def __init__(self, r: int, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device,
                 capacity: int = 1):
        self.r = r
        self.a = torch.zeros(capacity, r, in_features, dtype=dtype, device=device)
        self.b = torch.zeros(capacity, out_features, r, dtype=dtype, device=device)
        self.owner: list[int | None] = [None] * capacity  # global slot (adapters.py) of each row

    @property
    def capacity(self) -> int:
        return len(self.owner)

    def free_row(self) -> int:
        """A free row; grows the bucket when full (callers re-point their parameters, see SlotBank.add)."""
        if None not in self.owner:
            self.resize(max(self.capacity + 4, math.ceil(self.capacity * 1.0625)))
        return self.owner.index(None)

    def resize(self, capacity: int) -> None:
        old_a, old_b, used = self.a, self.b, self.capacity
        self.a = old_a.new_zeros(capacity, *old_a.shape[1:])
        self.b = old_b.new_zeros(capacity, *old_b.shape[1:])
        self.a[:used].copy_(old_a)
        self.b[:used].copy_(old_b)
        self.owner += [None] * (capacity - used)


@dataclass(frozen=True)
class BankRow:
    """Where one adapter's factors sit in one layer, and how it is applied."""

    key: Key
    row: int
    scaling: float
    banked: bool  # False: the fast path skips it (DoRA rows go through the layer's plain path)


class Layout:
    """A layer's slot → BankRow map. Equal layouts are one object (`Layout.of`), so layers with the same
    adapters in the same rows share one routing plan, found by identity."""

    _interned: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def __init__(self, entries: dict[int, BankRow]):
        self.entries = entries

    @classmethod
    def of(cls, entries: dict[int, BankRow]) -> Layout:
        key = tuple(sorted((slot, e.key, e.row, e.scaling, e.banked) for slot, e in entries.items()))
        layout = cls._interned.get(key)
        if layout is None:
            layout = cls._interned[key] = cls(dict(entries))
        return layout


class SlotBank:
    """All buckets of one layer: A rows of shape (r, in), B rows of shape (out, r)."""

    def __init__(self, in_features: int, out_features: int):
        self.in_features, self.out_features = in_features, out_features
        self.buckets: dict[Key, Bucket] = {}
        self.entries: dict[int, BankRow] = {}
        self.layout = Layout.of({})

    def add(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float, banked: bool,
            params: dict[int, tuple[nn.Parameter, nn.Parameter]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy (A, B) into a free row and return that row's views. `params`: the parameters
        already aliasing this bank, by slot, re-pointed if the bucket has to grow."""
        key = (a.shape[0], a.dtype)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = Bucket(a.shape[0], self.in_features, self.out_features, a.dtype, a.device)
        capacity = bucket.capacity
        row = bucket.free_row()
        if bucket.capacity != capacity:
            self._repoint(key, params)
        with torch.no_grad():
            bucket.a[row].copy_(a)
            bucket.b[row].copy_(b)
        bucket.owner[row] = slot
        self.entries[slot] = BankRow(key, row, scaling, banked)
        self.layout = Layout.of(self.entries)
        return bucket.a[row], bucket.b[row]

    def remove(self, slot: int) -> None:
        entry = self.entries.pop(slot, None)
        if entry is not None:
            bucket = self.buckets[entry.key]
            bucket.owner[entry.row] = None
            bucket.a[entry.row].zero_()
            bucket.b[entry.row].zero_()
            self.layout = Layout.of(self.entries)

    def _repoint(self, key: Key, params: dict[int, tuple[nn.Parameter, nn.Parameter]]) -> None:
        bucket = self.buckets[key]
        for slot, entry in self.entries.items():
            if entry.key == key:
                param_a, param_b = params[slot]
                param_a.data, param_b.data = bucket.a[entry.row], bucket.b[entry.row]

    def retie(self, params: dict[int, tuple[nn.Parameter, nn.Parameter]]) -> None:
        """Rebuild every bucket from the parameters after they got new storage (same rows and capacity,
        in the parameters' new dtype and device) and point them at it again."""
        buckets, self.buckets = self.buckets, {}
        for old_key, old in buckets.items():
            slots = [slot for slot, entry in self.entries.items() if entry.key == old_key]
            like = params[slots[0]][0] if slots else old.a
            key = (old_key[0], like.dtype)
            if key in self.buckets:  # two dtypes of one rank became one (e.g. `.double()`): re-add these rows
                for slot in slots:
                    param_a, param_b = params[slot]
                    entry = self.entries.pop(slot)
                    param_a.data, param_b.data = self.add(slot, param_a.data, param_b.data, entry.scaling, entry.banked,
                                                          params)
                continue
            bucket = self.buckets[key] = Bucket(key[0], self.in_features, self.out_features, like.dtype, like.device,
                                                old.capacity)
            bucket.owner = list(old.owner)
            for slot in slots:
                entry = self.entries[slot] = replace(self.entries[slot], key=key)
                param_a, param_b = params[slot]
                with torch.no_grad():
                    bucket.a[entry.row].copy_(param_a.data)
                    bucket.b[entry.row].copy_(param_b.data)
                param_a.data, param_b.data = bucket.a[entry.row], bucket.b[entry.row]
        self.layout = Layout.of(self.entries)

    def bytes(self) -> int:
        return sum(b.a.numel() * b.a.element_size() + b.b.numel() * b.b.element_size() for b in self.buckets.values())

    def is_tied(self, params: dict[int, tuple[nn.Parameter, nn.Parameter]]) -> bool:
        """Whether every parameter still aliases its bank row (cheap: a pointer compare per tensor)."""
        for slot, entry in self.entries.items():
            bucket = self.buckets[entry.key]
            param_a, param_b = params[slot]
            if param_a.data_ptr() != bucket.a[entry.row].data_ptr() or \
                    param_b.data_ptr() != bucket.b[entry.row].data_ptr():
                return False
        return True


class LinearView:
    """`layer.lora_A[name]` as PEFT users reach it: `.weight`, and callable like the nn.Linear PEFT holds there."""

    def __init__(self, weight: nn.Parameter):
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class AdapterWeights(nn.Module):
    """Per-adapter parameters under PEFT's names (`<adapter>.weight`, or `<adapter>` for embeddings),
    registered on this one module so that adding an adapter never adds a module to the tree.

    The keys contain a '.', which `register_parameter` refuses, so they are written into
    `_parameters` directly; `named_parameters`, `state_dict`, `.to()` and optimizers read
    `_parameters` as is, and `_load_from_state_dict` below reads them back.
    """

    def __init__(self, suffix: str = ".weight"):
        super().__init__()
        self.suffix = suffix

    def __contains__(self, name: object) -> bool:
        return f"{name}{self.suffix}" in self._parameters

    def __iter__(self) -> Iterator[str]:
        return (key[: len(key) - len(self.suffix)] for key in self._parameters)

    def __len__(self) -> int:
        return len(self._parameters)

    def keys(self) -> list[str]:
        return list(self)

    def values(self) -> list[nn.Parameter]:
        return list(self._parameters.values())

    def param(self, name: str) -> nn.Parameter:
        return self._parameters[f"{name}{self.suffix}"]

    def __getitem__(self, name: str):
        param = self.param(name)
        return LinearView(param) if self.suffix else param

    def set(self, name: str, param: nn.Parameter) -> None:
        self._parameters[f"{name}{self.suffix}"] = param

    def remove(self, name: str) -> None:
        self._parameters.pop(f"{name}{self.suffix}", None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # Copy in place (never `assign`): the parameters must keep aliasing their bank rows.
        for key, param in self._parameters.items():
            full = prefix + key
            if full not in state_dict:
                missing_keys.append(full)
                continue
            value = state_dict[full]
            if value.shape != param.shape:
                error_msgs.append(f"size mismatch for {full}: copying a param with shape {tuple(value.shape)}, "
                                  f"the shape in current model is {tuple(param.shape)}.")
                continue
            with torch.no_grad():
                param.copy_(value)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in self._parameters)

    def extra_repr(self) -> str:
        return f"adapters={list(self)}"
