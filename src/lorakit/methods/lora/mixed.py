"""Mixed batches from the weight banks: one batched GEMM pair per rank bucket, for a routing built fresh.

With many adapters in one batch, a GEMM pair per adapter is all dispatch overhead (decode:
one token per row, 32 adapters × 210 layers × ~7 ops). Instead, per rank bucket of a
layer's bank (methods/bank.py; ranks are never padded to another rank):

    X: (n, L, in)   the tokens of each used bank row, gathered and padded to L tokens
    X *= s · mask                     the row's scaling, 0 for padding
    h = bmm(X, Aᵀ)                    (n, L, r)     A: the bank's rows (n, r, in)
    Δ = bmm(h, Bᵀ)                    (n, L, out)   B: (n, out, r)
    out.index_add_(tokens, Δ)

(the gather, the scaling and the add run once for all buckets of a layer).

The same code serves decode (L = tokens of one row) and prefill (L = all tokens of one
adapter's rows), per-row and per-token routings. A, B come from the bank without a copy
when the used rows are dense (`narrow`: a slice of the bank, unused rows padded), and by one
`index_select` otherwise — never by stacking per-adapter tensors, which is what made the
previous version slower than the per-group path for a routing used only once.

The token indices, row ranges and scale masks (`BucketPlan`) depend only on the routing and
on the layer's bank layout, so they are built once per step per distinct layout and shared by
every layer with that layout (`Routing.cached`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.methods.bank import Key, Layout, SlotBank
from lorakit.routing import Routing


@dataclass
class BucketPlan:
    key: Key
    offset: int  # where its (n·L) tokens start in the step's gathered tokens
    rows: tuple[int, int] | torch.Tensor  # bank rows: (start, count) of a slice (no copy), or indices
    count: int  # n
    length: int  # L


@dataclass
class MixedPlan:
    """Every bucket's tokens gathered once, scaled once, and added back once (fewer ops per layer)."""

    tokens: torch.Tensor  # (Σ n·L,) token indices into the flattened batch, bucket after bucket (padding → 0)
    scale: torch.Tensor  # (Σ n·L, 1) each token's adapter scaling, 0 where padded
    buckets: list[BucketPlan]
    plain: list[str]  # routed adapters the layer holds but not in a bank (DoRA): the plain path runs them


def _plan(routing: Routing, slots: list[int], layout: Layout, per_entry: int, device: torch.device,
          dtype: torch.dtype) -> MixedPlan:
    """Group the routed tokens by (bucket, bank row)."""
    by_bucket: dict[Key, dict[int, list[int]]] = {}
    plain = []
    for entry, slot in enumerate(slots):
        spot = layout.entries.get(slot)
        if spot is None or not spot.banked:
            if spot is not None and routing.names[entry] not in plain:
                plain.append(routing.names[entry])
            continue
        tokens = by_bucket.setdefault(spot.key, {}).setdefault(spot.row, [])
        tokens.extend(range(entry * per_entry, (entry + 1) * per_entry))
    buckets, index, scale = [], [], []
    for key, rows in by_bucket.items():
        scaling = {e.row: e.scaling for e in layout.entries.values() if e.key == key}
        used = sorted(rows)
        low, high = used[0], used[-1] + 1
        dense = high - low <= 2 * len(used)  # reading a few unused rows beats copying the used ones
        order = list(range(low, high)) if dense else used
        length = max(len(t) for t in rows.values())
        buckets.append(BucketPlan(key, len(index), (low, high - low) if dense else
                                  torch.tensor(order, dtype=torch.long, device=device), len(order), length))
        for row in order:
            tokens = rows.get(row, [])
            pad = length - len(tokens)
            index += tokens + [0] * pad
            scale += [scaling.get(row, 0.0)] * len(tokens) + [0.0] * pad  # a free row in a dense span: no tokens
    return MixedPlan(torch.tensor(index, dtype=torch.long, device=device),
                     torch.tensor(scale, dtype=dtype, device=device).view(-1, 1), buckets, plain)


def banked_delta(bank: SlotBank, x: torch.Tensor, out: torch.Tensor, routing: Routing, slots: list[int],
                 per_entry: int) -> list[str]:
    """Add Δ of every banked adapter the routing uses into `out` (tokens, out); return the routed
    adapters this layer holds but could not run from its bank."""
    dtypes = {bucket.a.dtype for bucket in bank.buckets.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32  # adapters in mixed dtypes: fp32 for x
    plan = routing.cached(("bank", bank.layout, per_entry, x.device, dtype),
                          lambda: _plan(routing, slots, bank.layout, per_entry, x.device, dtype))
    if not plan.buckets:
        return plan.plain
    x_all = x.index_select(0, plan.tokens)
    x_all = (x_all if x_all.dtype == dtype else x_all.to(dtype)).mul_(plan.scale)  # s·x: the scaling, once
    delta = x_all.new_empty(x_all.shape[0], out.shape[1])
    for item in plan.buckets:
        bucket = bank.buckets[item.key]
        if isinstance(item.rows, tuple):  # narrow: a view (indexing with a slice costs more in Python)
            a, b = bucket.a.narrow(0, *item.rows), bucket.b.narrow(0, *item.rows)
        else:
            a, b = bucket.a.index_select(0, item.rows), bucket.b.index_select(0, item.rows)
        span = item.count * item.length
        x_rows = x_all.narrow(0, item.offset, span).view(item.count, item.length, -1)
        h = torch.bmm(x_rows if x_rows.dtype == a.dtype else x_rows.to(a.dtype), a.transpose(1, 2))
        target = delta.narrow(0, item.offset, span).view(item.count, item.length, -1)
        if b.dtype == target.dtype:
            torch.bmm(h, b.transpose(1, 2), out=target)
        else:  # adapters of several dtypes in one layer (rare)
            target.copy_(torch.bmm(h, b.transpose(1, 2)))
    out.index_add_(0, plan.tokens, delta if delta.dtype == out.dtype else delta.to(out.dtype))
    return plan.plain
