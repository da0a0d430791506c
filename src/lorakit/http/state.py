"""`ServerState`: what the HTTP routes of one server share — the engine, the names that mean the base model,
the keys and limits, the registry it follows — and the answers that need all of them: which adapter a
request's `model` names, which tokenizer renders it, and each served model's card for /v1/models."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import RegistryUnavailable
from lorakit.http.errors import ApiError
from lorakit.http.metrics import ServerMetrics
from lorakit.serve.engine import Engine, RequestHandle


@dataclass
class ServerState:
    engine: Engine
    base_name: str  # the served name of the base model (the first of `base_names`)
    base_names: set[str]
    base_root: str  # /v1/models' `root` for the base: its path or public id
    api_key: str | None = None
    admin_key: str | None = None
    adapter_roots: list[Path] = field(default_factory=list)
    max_queue: int = 256
    max_adapter_bytes: int = 1 << 30
    created: int = 0
    draining: bool = False
    sync: object | None = None  # a RegistrySync when the server follows a registry
    refused_local: dict[str, str] = field(default_factory=dict)  # local adapters refused at start, and why
    inflight: set[RequestHandle] = field(default_factory=set)
    metrics: ServerMetrics = field(init=False)
    _tokenizers: dict[Path, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(self.engine)

    def resolve(self, model: str) -> str | None:
        """The adapter a request's `model` names (None: the base model); 404 for an unknown name."""
        if model in self.base_names:
            return None
        if model in self.engine.adapters:
            return model
        try:
            if self.sync is not None and self.sync.knows(model):
                return model
        except RegistryUnavailable as error:
            raise ApiError(503, str(error), type="service_unavailable", code="registry_unavailable",
                           headers={"Retry-After": "2"}) from None
        reason = self.refused_local.get(model) or (self.sync.refused.get(model) if self.sync else None)
        if reason is not None:
            raise ApiError(400, reason, param="model", code="adapter_refused")
        raise ApiError(404, f"The model `{model}` does not exist. Served: {self.base_name} (the base model) and the "
                            "adapters listed by GET /v1/models.", param="model", code="model_not_found")

    async def resolve_off_loop(self, model: str) -> str | None:
        """`resolve`, with a first-use registry lookup (a database query and a blob re-hash for a
        pinned NAME@N) run in a worker thread, so the event loop keeps streaming other requests."""
        if self.sync is None or model in self.base_names or model in self.engine.adapters:
            return self.resolve(model)
        return await asyncio.to_thread(self.resolve, model)

    def tokenizer_for(self, adapter: str | None):
        """The adapter's own tokenizer (chat template) if its folder has one, else the base's."""
        path = self.engine.adapters.path_of(adapter) if adapter else None
        if path is None or not any((path / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json")):
            return self.engine.tokenizer
        if path not in self._tokenizers:
            from transformers import AutoTokenizer

            self._tokenizers[path] = AutoTokenizer.from_pretrained(path)
        return self._tokenizers[path]

    # -- /v1/models ---------------------------------------------------------------------------------
    def cards(self) -> list[dict]:
        """The base model and every adapter the server serves now, with the version loaded (if any)."""
        return [self.card(None), *(self.card(name) for name in self.engine.adapters.names())]

    def card(self, name: str | None) -> dict:
        """vLLM's model card: `root` is the base's id, a registry adapter's blob digest, or a local adapter's
        folder relative to its --adapter-dir (never an absolute server path); `lorakit` says what is loaded."""
        base = {"object": "model", "created": self.created, "owned_by": "lorakit", "permission": [],
                "max_model_len": self.engine.max_model_len}
        if name is None:
            return {"id": self.base_name, **base, "root": self.base_root, "parent": None}
        followed = self.sync.card(name) if self.sync else None
        version = self.engine.adapters.version_of(name)
        card = {"id": name, **base, "root": self._local_root(name), "parent": self.base_name,
                "lorakit": {"version": version, "resident": version is not None}}
        if followed is not None:
            card["root"] = followed.pop("root")
            card.update(followed)
        return card

    def _local_root(self, name: str) -> str:
        path = self.engine.adapters.path_of(name)
        if path is None:
            return name
        for root in self.adapter_roots:
            if path.resolve().is_relative_to(root.resolve()):
                return f"{root.name}/{path.resolve().relative_to(root.resolve())}"
        return str(path)  # an operator's explicit --adapter NAME=PATH: the path as it was given
