"""`lorakit serve --registry`: two server processes on one PostgreSQL registry follow promotions and
rollbacks together; tampered blobs and adapters of another base are refused; and the whole story —
train, push, promote, serve, retrain on a new base, promote, roll back — with the right answer at
each point (PEFT's greedy answer for that version is the oracle)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from registry_fixtures import backend, postgres, tiny  # noqa: F401 - fixtures
from transformers import AutoTokenizer, LlamaForCausalLM

from chat_model import QUESTION, peft_answer
from lorakit.errors import BlobIntegrityError
from lorakit.http.process import ServerProcess
from lorakit.registry import Registry

POLL = 0.5
BOUND = 15.0  # seconds within which every server must serve a promotion: the poll plus a load, with slack


def _ask(server: ServerProcess, model: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", timeout=30, json={
        "model": model, "messages": QUESTION, "max_tokens": 6, "temperature": 0, "ignore_eos": True})


def _answer(server: ServerProcess, model: str) -> str:
    reply = _ask(server, model)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def _serves(server: ServerProcess, model: str, expected: str) -> bool:
    reply = _ask(server, model)
    return reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == expected


def _wait_for(servers, model: str, expected: str) -> None:
    deadline = time.monotonic() + BOUND
    pending = list(servers)
    while pending and time.monotonic() < deadline:
        pending = [s for s in pending if not _serves(s, model, expected)]
        time.sleep(0.1)
    assert not pending, f"{model} did not switch to the expected version within {BOUND} s on {len(pending)} server(s)"


def _serve(model_dir: Path, url: str, blobs: Path) -> ServerProcess:
    return ServerProcess("--model", str(model_dir), "--registry", url, "--registry-blobs", str(blobs),
                         "--registry-poll", str(POLL), "--max-model-len", "256", "--kv-cache-memory", "64")


def test_two_servers_on_postgresql_switch_together_and_refuse_what_is_unsafe(postgres, tiny, tmp_path):
    url, blobs = postgres.database("serving"), tmp_path / "blobs"
    registry = Registry(url, blobs)
    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    answers = {v: peft_answer(tiny["base"], tiny["adapters"][v], tokenizer) for v in ("v1", "v2")}
    assert answers["v1"] != answers["v2"]
    registry.push("support", tiny["adapters"]["v1"], alias="prod")
    registry.push("support", tiny["adapters"]["v2"])
    servers = [_serve(tiny["model"], url, blobs), _serve(tiny["model"], url, blobs)]
    try:
        for server in servers:
            assert _answer(server, "support") == _answer(server, "support:prod") == answers["v1"]
            assert _answer(server, "support@2") == answers["v2"]  # pinned versions, looked up on first use
            cards = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
            assert cards["support"]["root"] == f"sha256:{registry.show('support@1').digest}"
        registry.promote("support@2", "prod")
        _wait_for(servers, "support", answers["v2"])
        registry.rollback("support", "prod")
        _wait_for(servers, "support", answers["v1"])

        other = registry.push("support", tiny["adapters"]["other_base"], alias="canary")  # trained on another base
        tampered = registry.push("support", tiny["adapters"]["v3"])
        weights = Path(registry.blobs.url(tampered.digest)) / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-3] ^= 0xFF
        weights.write_bytes(bytes(data))
        with pytest.raises(BlobIntegrityError):  # refused at promote: no server ever sees it as prod
            registry.promote(tampered.ref, "prod")
        registry.promote(other.ref, "prod", new_base=True)  # prod moves to a version these servers refuse ...
        time.sleep(3 * POLL + 1)
        for server in servers:
            refused = _ask(server, "support:canary")  # a name that never had a good version: 400, and why
            assert refused.status_code == 400 and "another base" in refused.json()["error"]["message"], refused.text
            assert other.ref in refused.json()["error"]["message"]
            broken = _ask(server, tampered.ref)
            assert broken.status_code == 400 and "does not match its digest" in broken.json()["error"]["message"]
            assert str(blobs) not in broken.text  # the blob store's path is the server's business
            assert _answer(server, "support") == answers["v1"]  # ... so they keep serving the last good one
            cards = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
            assert cards["support"]["registry"]["ref"] == "support@1"
            assert "another base" in cards["support"]["registry"]["held_back"]
            assert _ask(server, "nothing-here").status_code == 404
    finally:
        for server in servers:
            server.stop()


def test_train_push_promote_serve_retrain_on_a_new_base_promote_and_roll_back(tiny, tmp_path):
    """The registry as the source of truth across a base update: a server on each base answers with the
    version prod points to when that version belongs to its base, and refuses it (400) when it does not."""
    import textwrap

    from typer.testing import CliRunner

    from lorakit.cli import app

    registry_dir = tmp_path / "reg"
    train = tmp_path / "train.jsonl"
    train.write_text(tiny["eval"].read_text())
    config = tmp_path / "job.yaml"
    config.write_text(textwrap.dedent(f"""
        model: {tiny['model']}
        lora: {{r: 8, lora_alpha: 64, init_lora_weights: false}}
        data: {{train: {train}, eval: {train}, max_seq_len: 64}}
        train: {{max_steps: 2, batch_size: 2, save_steps: 100}}
        eval: {{max_examples: 2, max_new_tokens: 4, samples: 0}}
        register: {{name: facts, registry: {registry_dir}}}
        output_dir: {tmp_path / 'run'}
    """))
    runner = CliRunner()

    def cli(*args: str) -> None:
        result = runner.invoke(app, [*args])
        assert result.exit_code == 0, result.output

    cli("train", str(config))  # train -> push facts@1
    cli("registry", "promote", "facts@1", "--to", "prod", "--registry", str(registry_dir))
    cli("registry", "retrain", "facts", "--base", str(tiny["other"]), "--output-dir", str(tmp_path / "re"),
        "--registry", str(registry_dir))  # facts@2 on the new base
    registry = Registry(f"sqlite:///{registry_dir / 'registry.db'}", registry_dir / "blobs")
    old_base, new_base = (LlamaForCausalLM.from_pretrained(tiny[k]).eval() for k in ("model", "other"))
    answers = {1: peft_answer(old_base, registry.blob_folder(registry.show("facts@1")),
                              AutoTokenizer.from_pretrained(tiny["model"])),
               2: peft_answer(new_base, registry.blob_folder(registry.show("facts@2")),
                              AutoTokenizer.from_pretrained(tiny["other"]))}
    url = f"sqlite:///{registry_dir / 'registry.db'}"
    with _serve(tiny["model"], url, registry_dir / "blobs") as old, \
            _serve(tiny["other"], url, registry_dir / "blobs") as new:
        assert _answer(old, "facts") == answers[1]
        assert _ask(new, "facts").status_code == 400  # v1 belongs to the old base
        refused = runner.invoke(app, ["registry", "promote", "facts@2", "--to", "prod", "--registry", str(registry_dir)])
        assert refused.exit_code != 0 and "--new-base" in refused.output  # the base changes only when told
        cli("registry", "promote", "facts@2", "--to", "prod", "--new-base", "--registry", str(registry_dir))
        _wait_for([new], "facts", answers[2])

        def held_back(server: ServerProcess) -> str | None:
            cards = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
            return cards["facts"]["registry"]["held_back"]

        deadline = time.monotonic() + BOUND
        while held_back(old) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "another base" in held_back(old) and _answer(old, "facts") == answers[1]  # the last good version
        cli("registry", "rollback", "facts", "--alias", "prod", "--registry", str(registry_dir))
        _wait_for([old], "facts", answers[1])
        assert _answer(new, "facts@2") == answers[2]
    assert [e["action"] for e in registry.log("facts")] == ["push", "promote", "push", "promote", "rollback"]


def test_a_registry_outage_answers_503_in_openais_shape_and_aliases_keep_serving(tiny, tmp_path):
    from postgres import Postgres, unavailable

    if unavailable() is not None:
        pytest.skip(unavailable())
    database = Postgres()  # its own server: this test stops it
    try:
        url, blobs = database.database("outage"), tmp_path / "blobs"
        registry = Registry(url, blobs)
        tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
        answer = peft_answer(tiny["base"], tiny["adapters"]["v1"], tokenizer)
        registry.push("support", tiny["adapters"]["v1"], alias="prod")
        registry.push("support", tiny["adapters"]["v2"])
        registry.engine.dispose()
        with _serve(tiny["model"], url, blobs) as server:
            assert _answer(server, "support") == answer
            database.stop_server()
            reply = _ask(server, "support@2")  # a pinned version, looked up on first use: the database is down
            assert reply.status_code == 503, reply.text
            assert reply.json()["error"]["code"] == "registry_unavailable" and reply.headers["retry-after"]
            assert _answer(server, "support") == answer  # what the server follows keeps serving
            assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        database.stop()


@pytest.fixture(autouse=True)
def _quiet_tokenizers(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
