"""Slot-indexed weight banks: the copy of a layer's LoRA factors the mixed-batch path reads.

Each adapted layer keeps, per rank bucket (r, dtype), two preallocated tensors

    A: (capacity, r, in)        B: (capacity, out, r)

and each adapter occupies one row of its bucket. Adapters come and go as tensor writes into
rows (`set_slot` / `reset_slot`, as vLLM's `set_lora` / `reset_lora`), never as modules added
to a live model (vLLM / S-LoRA keep adapters in slot-indexed stacks for the same reason).

Who owns the numbers:
- a *serving* model (PeftModel.for_serving) keeps its adapters here only — one copy, written
  once when an adapter loads;
- a *training* model keeps plain `nn.Parameter`s, whose storage is their own: anything may give
  them new storage (an optimizer step, `load_state_dict(assign=True)`, `.to()`, FSDP flattening,
  `torch.compile`) and nothing breaks. Their rows here are a derived copy, written when a mixed
  batch routes to them and re-written whenever a parameter is no longer the tensor, or the
  version, it was copied from (the layer's `sync_bank`: a version check per routed adapter, and a
  count of replaced parameters per `AdapterWeights`).

Growth: a bucket starts with one row and grows by 1/16 (at least 4 rows), so a bank of n
adapters holds at most max(4 rows, 6%) unused (bench/mixed_batch.py: 200 adapters, 2.4% slack).
The mixed-batch path (routing.py, lora/mixed.py) reads the banks under `torch.no_grad()` only — a
bank carries no autograd history; training goes through the parameters.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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
        """A free row; grows the bucket (a new tensor, rows copied) when full."""
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

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float, banked: bool) -> None:
        """Copy (A, B) into `slot`'s row (a free row of its bucket if it has none of that rank and dtype)."""
        key = (a.shape[0], a.dtype)
        entry = self.entries.get(slot)
        if entry is not None and entry.key != key:
            self.reset_slot(slot)
            entry = None
        if entry is None:
            bucket = self.buckets.get(key)
            if bucket is None:
                bucket = self.buckets[key] = Bucket(a.shape[0], self.in_features, self.out_features, a.dtype, a.device)
            row = bucket.free_row()
            bucket.owner[row] = slot
        else:
            bucket, row = self.buckets[key], entry.row
        with torch.no_grad():
            bucket.a[row].copy_(a)
            bucket.b[row].copy_(b)
        if entry is None or entry.scaling != scaling or entry.banked != banked:
            self.entries[slot] = BankRow(key, row, scaling, banked)
            self.layout = Layout.of(self.entries)

    def reset_slot(self, slot: int) -> None:
        entry = self.entries.pop(slot, None)
        if entry is not None:
            bucket = self.buckets[entry.key]
            bucket.owner[entry.row] = None
            bucket.a[entry.row].zero_()
            bucket.b[entry.row].zero_()
            self.layout = Layout.of(self.entries)

    def row(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of `slot`: views of its row."""
        entry = self.entries[slot]
        bucket = self.buckets[entry.key]
        return bucket.a[entry.row], bucket.b[entry.row]

    def convert(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Every row through `fn` (a module's `_apply`: `.to(dtype)`, `.to(device)`, `.half()`), rebucketed."""
        rows = {slot: (*(fn(t) for t in self.row(slot)), e.scaling, e.banked) for slot, e in self.entries.items()}
        self.clear()
        for slot, (a, b, scaling, banked) in rows.items():
            self.set_slot(slot, a, b, scaling, banked)

    def clear(self) -> None:
        self.buckets, self.entries = {}, {}
        self.layout = Layout.of({})

    def bytes(self) -> int:
        return sum(b.a.numel() * b.a.element_size() + b.b.numel() * b.b.element_size() for b in self.buckets.values())


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
        self.replaced = 0  # parameters put in another's place (a training model's bank copies re-check theirs)

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
        self.replaced += 1

    def remove(self, name: str) -> None:
        self._parameters.pop(f"{name}{self.suffix}", None)
        self.replaced += 1

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # nn.Module's own loader reads a '.' in a key as a submodule; this one reads the keys as they are.
        assign = local_metadata.get("assign_to_params_buffers", False)
        for key, param in list(self._parameters.items()):
            full = prefix + key
            if full not in state_dict:
                missing_keys.append(full)
                continue
            value = state_dict[full]
            if value.shape != param.shape:
                error_msgs.append(f"size mismatch for {full}: copying a param with shape {tuple(value.shape)}, "
                                  f"the shape in current model is {tuple(param.shape)}.")
                continue
            if assign:  # load_state_dict(assign=True): the given tensor becomes the parameter
                self._parameters[key] = nn.Parameter(value, requires_grad=param.requires_grad)
                self.replaced += 1
            else:
                with torch.no_grad():
                    param.copy_(value)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in self._parameters)

    def extra_repr(self) -> str:
        return f"adapters={list(self)}"
