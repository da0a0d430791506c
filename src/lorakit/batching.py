"""Per-row adapter choice: which rows of a batch use which adapter.

`model(x, adapter_names=[...])` gives one adapter name per batch row (`"__base__"` for
none). The model validates the names once, groups the rows once, and publishes that
`Routing` through a context variable for the duration of the forward, so every adapted
layer reuses the same grouping instead of re-deriving it (and HF model code, which calls
our layers as `layer(x)`, needs no changes). A context variable, not a global, so threads
serving different requests never see each other's routing.

This is the plain reference path: each layer runs one LoRA pair per adapter group on the
gathered rows and scatters the result back with `index_add_`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch

BASE_ADAPTER = "__base__"  # a row that uses no adapter


class Routing:
    """Rows grouped by adapter name, computed once per batch; index tensors cached per device."""

    def __init__(self, adapter_names: Sequence[str]):
        self.names = list(adapter_names)
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            rows.setdefault(name, []).append(i)
        self._rows = rows
        self._on_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}

    def __len__(self) -> int:
        return len(self.names)

    def groups(self, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """[(adapter name, row indices)] for every name but `__base__`, on `device`."""
        if device not in self._on_device:
            self._on_device[device] = [
                (name, torch.tensor(idx, dtype=torch.long, device=device))
                for name, idx in self._rows.items()
                if name != BASE_ADAPTER
            ]
        return self._on_device[device]


_current: ContextVar[Routing | None] = ContextVar("lorakit_routing", default=None)


@contextmanager
def adapter_routing(adapter_names: Sequence[str]) -> Iterator[Routing]:
    """Publish a per-row routing to every adapted layer for the duration of the block."""
    token = _current.set(Routing(adapter_names))
    try:
        yield _current.get()
    finally:
        _current.reset(token)


def current_routing() -> Routing | None:
    return _current.get()
