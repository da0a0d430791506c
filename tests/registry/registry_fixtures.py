"""Registry fixtures (imported by the registry tests; not a conftest.py, which would shadow tests/conftest.py): a tiny chat model and adapters on it (and one on another base), and a registry on
SQLite or on a real PostgreSQL server (the same tests run on both)."""

from __future__ import annotations

import itertools
import os

import pytest
from postgres import Postgres, unavailable

from chat_model import FACTS, build_chat_model, save_adapter, write_jsonl

_databases = itertools.count()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from transformers import LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("registry-models")
    model = build_chat_model(tmp / "base")
    other = build_chat_model(tmp / "other", seed=7)
    base = LlamaForCausalLM.from_pretrained(model).eval()
    adapters = {f"v{i}": save_adapter(base, tmp / "adapters" / f"v{i}", seed=40 + i) for i in (1, 2, 3)}
    adapters["other_base"] = save_adapter(LlamaForCausalLM.from_pretrained(other).eval(), tmp / "adapters" / "ob", 9)
    data = write_jsonl(tmp / "eval.jsonl", [{"messages": [{"role": "user", "content": q},
                                                          {"role": "assistant", "content": a}]} for q, a in FACTS])
    return {"model": model, "other": other, "base": base, "adapters": adapters, "eval": data}


@pytest.fixture(scope="session")
def postgres():
    reason = unavailable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL registry tests, but {reason}.")
        pytest.skip(reason)
    server = Postgres()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    """(database URL, blob folder) of an empty registry."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "blobs"
    server = request.getfixturevalue("postgres")
    return server.database(f"registry_{os.getpid()}_{next(_databases)}"), tmp_path / "blobs"
