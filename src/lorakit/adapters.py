"""`AdapterSet`: the one owner of a model's adapters — names, configs, slots, which are active — and its lock.

Every adapted layer of a model holds a reference to the same set and reads the call state
from it (active adapters, adapters disabled, fast path on) instead of keeping flags of its
own; so switching adapters is one assignment, not a walk over 200 layers, and a layer can
never disagree with its model.

A *slot* is an adapter's stable integer id while it is loaded. Layers key their weight banks
by slot (methods/bank.py) and a per-row or per-token `Routing` is resolved to slots once per
batch. A deleted adapter's slot is reused by the next one loaded.

The lock is a readers-writer lock: forwards read (many at once, re-entrant per thread),
loading / replacing / deleting write. A write waits until the forwards in flight are done
and holds new ones back, so a forward always sees every adapter as it was when it started,
and a load on a serving model is a tensor write between two forwards.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from lorakit.errors import AdapterNameError, AdapterStateError, RoutingError
from lorakit.routing import BASE_ADAPTER, Routing


class ReadWriteLock:
    """Many readers or one writer, phase-fair: a waiting writer holds new readers back, and the readers
    that waited during a write go before the next writer (neither side starves)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._readers_waiting = 0
        self._readers_turn = False
        self._writer: int | None = None
        self._writers_waiting = 0
        self._local = threading.local()

    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    def busy(self) -> bool:
        """Whether a forward (reader) or a change (writer) is under way right now."""
        return bool(self._readers) or self._writer is not None

    @contextmanager
    def reading(self) -> Iterator[None]:
        if self._depth() or self._writer == threading.get_ident():  # nested in a read, or in our own write
            self._local.depth = self._depth() + 1
            try:
                yield
            finally:
                self._local.depth -= 1
            return
        with self._cond:
            self._readers_waiting += 1
            self._cond.wait_for(lambda: self._writer is None and (not self._writers_waiting or self._readers_turn))
            self._readers_waiting -= 1
            self._readers_turn = self._readers_turn and self._readers_waiting > 0
            self._readers += 1
        self._local.depth = 1
        try:
            yield
        finally:
            self._local.depth = 0
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Exclusive access: waits for the forwards in flight, holds new ones back."""
        me = threading.get_ident()
        if self._writer == me:
            yield
            return
        if self._depth():
            raise AdapterStateError("Adapters cannot be changed from inside a forward of the same model.")
        with self._cond:
            self._writers_waiting += 1
            try:
                self._cond.wait_for(lambda: self._writer is None and not self._readers and not self._readers_turn)
            finally:
                self._writers_waiting -= 1
            self._writer = me
        try:
            yield
        finally:
            with self._cond:
                self._writer = None
                self._readers_turn = self._readers_waiting > 0
                self._cond.notify_all()


class SharesAdapterSet:
    """For modules that wrap part of a model (adapted layers, saved-module wrappers): PEFT's per-layer
    names for the call state, read from (and written to) the model's shared `AdapterSet`."""

    adapter_set: AdapterSet

    @property
    def active_adapters(self) -> list[str]:
        return self.adapter_set.active

    @property
    def disable_adapters(self) -> bool:
        return self.adapter_set.disabled

    @disable_adapters.setter
    def disable_adapters(self, value: bool) -> None:
        self.adapter_set.disabled = value


class AdapterSet:
    """name → config and slot, the active adapters and the model-wide switches, behind one lock."""

    def __init__(self) -> None:
        self.configs: dict[str, Any] = {}
        self.slots: dict[str, int] = {}
        self.active: list[str] = []
        self.disabled = False  # PEFT's disable_adapter(): run the base model
        self.fast_path = True  # fused LoRA op and the loss without full logits, where they apply
        self.merged: set[str] = set()  # merged into the base weights through the model (tuner.merge)
        self.serving = False  # adapters kept in the layers' slot banks only, for inference (PeftModel.for_serving)
        self.lock = ReadWriteLock()

    # A lock cannot be copied or pickled; a copied model gets a fresh one (and its own set).
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lock = ReadWriteLock()

    def __contains__(self, name: object) -> bool:
        return name in self.configs

    def __iter__(self) -> Iterator[str]:
        return iter(self.configs)

    # -- names and slots -----------------------------------------------------------------
    def slot(self, name: str) -> int:
        """`name`'s slot, assigned (the lowest free one) on first use."""
        if name not in self.slots:
            taken = set(self.slots.values())
            self.slots[name] = next(i for i in range(len(taken) + 1) if i not in taken)
        return self.slots[name]

    def add(self, name: str, config: Any) -> None:
        self.configs[name] = config
        self.slot(name)

    def remove(self, name: str) -> None:
        del self.configs[name]
        self.slots.pop(name, None)
        self.active = [a for a in self.active if a != name] or list(self.configs)[:1]

    def check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise AdapterNameError(f"Adapter names must be non-empty strings without '.', got {name!r}.")
        if name == BASE_ADAPTER:
            raise AdapterNameError(f"{BASE_ADAPTER!r} is reserved for rows that use no adapter.")
        if name in self.configs:
            raise AdapterNameError(f"An adapter named {name!r} exists; delete it first or pick another name.")

    def check_known(self, names: Sequence[str]) -> None:
        for name in names:
            if name not in self.configs:
                raise AdapterNameError(f"Unknown adapter {name!r}; loaded adapters: {sorted(self.configs)}.")

    def trainable(self) -> bool:
        """Whether the active adapters train (none of them loaded for inference only)."""
        return not any(self.configs[a].inference_mode for a in self.active if a in self.configs)

    # -- routing -------------------------------------------------------------------------------
    def routing(self, adapter_names: Sequence[str] | Routing, per_token: bool = False) -> Routing:
        """A checked `Routing` for one batch: one name per row (or per token, `per_token`)."""
        if isinstance(adapter_names, Routing):
            routing = adapter_names
        else:
            if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
                raise RoutingError("adapter_names must be a list with one adapter name (or '__base__') per batch "
                                   f"{'token' if per_token else 'row'}.")
            routing = Routing(adapter_names, per_token=per_token)
        unknown = sorted({n for n in routing.names if n != BASE_ADAPTER and n not in self.configs})
        if unknown:
            raise AdapterNameError(
                f"adapter_names has unknown adapter(s) {unknown}; loaded: {sorted(self.configs)} "
                f"(use {BASE_ADAPTER!r} for rows without an adapter)."
            )
        return routing
