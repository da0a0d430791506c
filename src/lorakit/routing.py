"""Per-row or per-token adapter choice: which rows (or tokens) of a batch use which adapter.

`model(x, adapter_names=[...])` gives one adapter name per batch row (`"__base__"` for
none); a packed batch (`[1, T]`, sequences laid end to end, as a paged continuous-batching
engine builds it) gives one name per token instead (`per_token=True`). The model checks the
names once and publishes the `Routing` through a context variable for the duration of the
forward, so every adapted layer reads the same one (and HF model code, which calls our layers
as `layer(x)`, needs no changes). A context variable, not a global, so threads serving
different requests never see each other's routing.

A routing is cheap to build and meant to be built fresh for every step (a continuous-batching
engine changes the batch every step): layers work from the adapters' slots in their weight
banks (methods/bank.py), and what a layer derives from a routing — token indices per rank
bucket — is computed once per distinct bank layout and shared by every layer with that
layout (all of them, for adapters that target the same modules with one rank).

Everything is expressed over *entries*: the rows (per-row) or the tokens (per-token) the
names are given for; an entry covers `tokens_per_entry` consecutive tokens of the flattened
batch (the sequence length per row, or 1).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from lorakit.errors import RoutingError

BASE_ADAPTER = "__base__"  # a row that uses no adapter


class Routing:
    """Entries grouped by adapter, computed once per batch and shared by every adapted layer.

    `reference` forces every layer's plain path (a GEMM pair per adapter group), which the
    tests compare the banked one to.
    """

    def __init__(self, adapter_names: Sequence[str], per_token: bool = False, reference: bool = False):
        self.names = list(adapter_names)
        self.per_token = per_token
        self.reference = reference
        entries: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            entries.setdefault(name, []).append(i)
        self._entries = entries
        self._cache: dict[object, object] = {}

    def __len__(self) -> int:
        return len(self.names)

    def cached(self, key: object, build):
        """Data derived from this routing (index tensors, a bank layout's plan), built once per batch."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def adapters(self) -> list[str]:
        """The adapters this batch uses (not `__base__`), in order of first use."""
        return self.cached("adapters", lambda: [name for name in self._entries if name != BASE_ADAPTER])

    def token_indices(self, entries: Sequence[int], tokens_per_entry: int) -> list[int]:
        if tokens_per_entry == 1:
            return list(entries)
        return [e * tokens_per_entry + t for e in entries for t in range(tokens_per_entry)]

    def groups(self, device: torch.device, tokens_per_entry: int = 1) -> dict[str, torch.Tensor]:
        """{adapter name: token indices into the flattened batch} for every adapter but `__base__`."""
        return self.cached(("groups", device, tokens_per_entry), lambda: {
            name: torch.tensor(self.token_indices(idx, tokens_per_entry), dtype=torch.long, device=device)
            for name, idx in self._entries.items() if name != BASE_ADAPTER
        })

    def tokens_not_using(self, name: str, device: torch.device, tokens_per_entry: int = 1) -> torch.Tensor:
        """Token indices of the entries whose adapter is not `name` (`__base__` included)."""
        return self.cached(("not", name, device, tokens_per_entry), lambda: torch.tensor(
            self.token_indices([i for i, n in enumerate(self.names) if n != name], tokens_per_entry),
            dtype=torch.long, device=device))

    def tokens_per_entry(self, rows: int, tokens: int) -> int:
        """How many tokens of the flattened batch one entry covers, for a batch of `rows` rows holding
        `tokens` tokens; raises RoutingError when the names do not fit the batch."""
        if self.per_token:
            if tokens != len(self.names):
                raise RoutingError(f"adapter_names has {len(self.names)} entries but the packed batch has {tokens} "
                                   "tokens; give one name per token (per_token=True).")
            return 1
        if rows != len(self.names):
            raise RoutingError(f"adapter_names has {len(self.names)} entries but the batch has {rows} rows; "
                               "give one name per row.")
        return tokens // rows


_current: ContextVar[Routing | None] = ContextVar("lorakit_routing", default=None)


@contextmanager
def adapter_routing(adapter_names: Sequence[str] | Routing, reference: bool = False,
                    per_token: bool = False) -> Iterator[Routing]:
    """Publish a routing to every adapted layer for the duration of the block."""
    routing = adapter_names if isinstance(adapter_names, Routing) else Routing(adapter_names, per_token, reference)
    token = _current.set(routing)
    try:
        yield routing
    finally:
        _current.reset(token)


def current_routing() -> Routing | None:
    return _current.get()


def gradient_checkpointing_on(model: nn.Module) -> bool:
    """Whether any block will be recomputed in backward. transformers marks each checkpointed module
    with `gradient_checkpointing=True` (and derives its own `is_activation_checkpointing` the same
    way); the model-level `is_gradient_checkpointing` is deprecated, and a `getattr(…, False)` on it
    would silently read False once it is gone (tests/test_peft_api.py enables checkpointing through
    transformers' API and asserts the refusal)."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())
