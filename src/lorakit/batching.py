"""Per-row adapter choice: which rows of a batch use which adapter.

`model(x, adapter_names=[...])` gives one adapter name per batch row (`"__base__"` for
none). The model validates the names once, groups the rows once, and publishes that
`Routing` through a context variable for the duration of the forward, so every adapted
layer reuses the same grouping instead of re-deriving it (and HF model code, which calls
our layers as `layer(x)`, needs no changes). A context variable, not a global, so threads
serving different requests never see each other's routing.

Each layer gathers the adapter rows once (sorted by adapter), runs one pair of thin GEMMs
per adapter on contiguous slices, and scatters the result back with one `index_add_`; ranks
are never padded and B@A is never formed. The per-group gather/scatter of the first
version is kept as `reference` for the tests.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch

BASE_ADAPTER = "__base__"  # a row that uses no adapter


class Routing:
    """Rows grouped by adapter, computed once per batch and shared by every adapted layer.

    Two views of the same grouping:
    - `groups(device)`: [(name, row indices)] — the plain reference path (gather and scatter
      once per group);
    - `order(device)` + `spans`: the rows that use an adapter, sorted by adapter, and each
      adapter's [lo, hi) slice of that order — the fast path gathers once per layer, works on
      contiguous slices, and scatters back once.
    """

    def __init__(self, adapter_names: Sequence[str], reference: bool = False, reusable: bool = False):
        self.names = list(adapter_names)
        self.reference = reference  # use the plain per-group path (tests compare the fast one to it)
        # Reused for several forwards (generate's decode steps): worth building per-layer caches.
        self.reusable = reusable
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            rows.setdefault(name, []).append(i)
        self._rows = rows
        self._order = [i for name, idx in rows.items() if name != BASE_ADAPTER for i in idx]
        self.spans: list[tuple[str, int, int]] = []
        for name, idx in rows.items():
            if name != BASE_ADAPTER:
                lo = self.spans[-1][2] if self.spans else 0
                self.spans.append((name, lo, lo + len(idx)))
        self._cache: dict[tuple[str, torch.device], object] = {}

    def __len__(self) -> int:
        return len(self.names)

    def _cached(self, key: str, device: torch.device, build):
        if (key, device) not in self._cache:
            self._cache[key, device] = build()
        return self._cache[key, device]

    def groups(self, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """[(adapter name, row indices)] for every name but `__base__`, on `device`."""
        return self._cached("groups", device, lambda: [
            (name, torch.tensor(idx, dtype=torch.long, device=device))
            for name, idx in self._rows.items() if name != BASE_ADAPTER
        ])

    def cached_for(self, layer: object, device: torch.device, build):
        """Per-layer data derived from this routing (e.g. stacked weights), built once per batch."""
        return self._cached(f"layer-{id(layer)}", device, build)

    def order(self, device: torch.device) -> torch.Tensor:
        """Indices of the rows that use an adapter, sorted by adapter (see `spans`)."""
        return self._cached("order", device, lambda: torch.tensor(self._order, dtype=torch.long, device=device))


_current: ContextVar[Routing | None] = ContextVar("lorakit_routing", default=None)


@contextmanager
def adapter_routing(
    adapter_names: Sequence[str] | Routing, reference: bool = False, reusable: bool = False
) -> Iterator[Routing]:
    """Publish a per-row routing to every adapted layer for the duration of the block
    (a prebuilt Routing is reused as is, with what it has cached)."""
    routing = adapter_names if isinstance(adapter_names, Routing) else Routing(adapter_names, reference, reusable)
    token = _current.set(routing)
    try:
        yield _current.get()
    finally:
        _current.reset(token)


def current_routing() -> Routing | None:
    return _current.get()
