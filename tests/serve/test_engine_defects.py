"""Engine defects (issue 30): one request's sampling failure stays with that request; a dead engine loop
fails every waiting request and `/health` says so; the adapter cache frees a stale version in O(1)."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from fastapi.testclient import TestClient

import lorakit
from conftest import tiny_llama
from lorakit.serve import Engine, SamplingParams
from lorakit.serve import runner as runner_module

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture
def model():
    torch.manual_seed(0)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return lorakit.get_peft_model(copy.deepcopy(tiny_llama()), config, adapter_name="a").eval()


def test_a_failing_sample_fails_its_own_request_and_its_neighbours_are_exact(model, monkeypatch):
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    expected = [o.token_ids for o in Engine(model, max_model_len=64).generate(prompts, ["a", None], GREEDY)]
    poisoned = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.7, seed=1)
    real = runner_module.choose

    def choose(logits, params, *args):
        if params is poisoned:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(logits, params, *args)

    monkeypatch.setattr(runner_module, "choose", choose)
    engine = Engine(model, max_model_len=64)
    outputs = engine.generate([*prompts, [3, 4]], ["a", None, "a"], [GREEDY, GREEDY, poisoned])
    assert [o.token_ids for o in outputs[:2]] == expected  # the neighbours in its steps: untouched
    assert outputs[2].finish_reason == "error" and "sampling failed" in outputs[2].error
    assert engine.generate([[5, 6, 7]], ["a"], GREEDY)[0].token_ids == expected[0]  # and the engine goes on


def test_a_dead_engine_loop_ends_every_request_and_health_says_so(model, monkeypatch):
    from lorakit.http.app import create_app
    from lorakit.http.state import ServerState

    engine = Engine(model, max_model_len=64)

    def broken() -> list:
        raise RuntimeError("scheduler bug")

    monkeypatch.setattr(engine.scheduler, "schedule", broken)
    state = ServerState(engine, "base", {"base"}, "base")
    client = TestClient(create_app(state))
    assert client.get("/health").json() == {"status": "ok"}
    handle = engine.add_request([5, 6, 7], "a", GREEDY)
    engine.start()
    deadline = time.monotonic() + 60
    while not handle.seq.finished and time.monotonic() < deadline:
        time.sleep(0.05)
    assert handle.seq.finished, "the request still waits on a dead engine"
    output = handle.result()  # ends, with the reason
    assert output.finish_reason == "error" and "scheduler bug" in output.error
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "engine_dead"
    reply = client.post("/v1/completions", json={"model": "base", "prompt": [1, 2, 3], "max_tokens": 2})
    assert reply.status_code == 400 and "engine has stopped" in reply.json()["error"]["message"]
    engine.close()


def test_release_touches_only_the_released_version(model, tmp_path):
    """A finished request frees its version without scanning every adapter: the cache keeps one map of
    versions (current and stale), and a stale one goes with its last user."""
    for i in range(3):
        torch.manual_seed(i)
        other = lorakit.get_peft_model(copy.deepcopy(tiny_llama()), lorakit.LoraConfig(r=2, init_lora_weights=False))
        other.save_pretrained(tmp_path / f"x{i}")
    engine = Engine(model, max_model_len=64)
    cache = engine.adapters
    for i in range(3):
        cache.load(f"x{i}", tmp_path / f"x{i}").result()
    old = cache.acquire("x0")
    cache.load("x0", tmp_path / "x1", replace=True).result()  # replaced while a request uses the old version
    assert cache.resident_count() == 5 and old in model.peft_config  # a, x0 twice, x1, x2

    class Watched(dict):
        scans = 0

        def values(self):
            Watched.scans += 1
            return super().values()

    cache._entries = Watched(cache._entries)
    cache.release(old)
    assert Watched.scans == 0 and cache.resident_count() == 4 and old not in model.peft_config
    assert engine.generate([[1, 2, 3]], ["x0"], GREEDY)[0].finish_reason == "length"
