"""`lorakit serve` defects found by trying it as a new user and as an attacker (issue 30), each pinned by a
test that failed before the fix — on real server processes on 127.0.0.1 with the `openai` client, httpx
and raw sockets: sampling settings that killed the engine thread, a huge prompt that froze every stream,
streams cut at shutdown that looked complete, start-up looser than the admin API, plain-text 500s, a
registry name silently replacing a local adapter, and a client gone before its first byte."""

from __future__ import annotations

import shutil
import signal
import socket
import threading
import time

import httpx
import openai
import pytest

from chat_model import GREEDY, QUESTION, build_chat_model, peft_answer, save_adapter
from lorakit.http.process import ServerProcess
from lorakit.registry import Registry
from lorakit.registry.store import folder_location

ADMIN, KEY = "admin-secret", "inference-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A chat model; root/ with a good adapter, one whose weights are a symlink out of root, one over a 1 MiB
    cap, and `support` (a local adapter whose name the registry also has, with other weights)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("serve-defects")
    model_dir = build_chat_model(tmp / "base")
    base = LlamaForCausalLM.from_pretrained(model_dir).eval()
    root = tmp / "root"
    good = save_adapter(base, root / "good", 1)
    local_support = save_adapter(base, root / "support", 2)
    outside = save_adapter(base, tmp / "outside", 3)
    linked = root / "linked"
    linked.mkdir()
    shutil.copy(outside / "adapter_config.json", linked / "adapter_config.json")
    (linked / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    huge = save_adapter(base, root / "huge", 4)
    (huge / "padding.bin").write_bytes(b"\0" * (2 << 20))  # 2 MiB: over --max-adapter-size 1
    registry_dir = tmp / "registry"
    registered = save_adapter(base, tmp / "registered", 5)
    store = Registry(*folder_location(registry_dir))
    store.push("support", registered, alias="prod")
    other = LlamaForCausalLM.from_pretrained(build_chat_model(tmp / "other", seed=7)).eval()
    store.push("support", save_adapter(other, tmp / "other_base", 6))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    answers = {name: peft_answer(base, folder, tokenizer) for name, folder in
               {"good": good, "local": local_support, "registered": registered}.items()}
    assert len(set(answers.values())) == 3
    return {"model": model_dir, "root": root, "registry": registry_dir, "answers": answers}


@pytest.fixture(scope="module")
def server(files):
    with ServerProcess("--model", str(files["model"]), "--adapter-dir", str(files["root"]), "--api-key", KEY,
                       "--admin-key", ADMIN, "--max-adapter-size", "1", "--registry", str(files["registry"]),
                       "--registry-poll", "0.5", "--max-model-len", "4096", "--kv-cache-memory", "64",
                       "--max-request-mb", "4") as process:
        yield process


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def _answer(server, model: str) -> str:
    return _client(server).chat.completions.create(model=model, messages=QUESTION, **GREEDY).choices[0].message.content


# -- 10: sampling settings never take the engine down ------------------------------------------------------
def test_extreme_sampling_settings_answer_and_the_engine_lives_on(server, files):
    client = _client(server)
    tiny_top_p = client.chat.completions.create(model="good", messages=QUESTION, temperature=1, top_p=1e-300,
                                                max_tokens=6, extra_body={"ignore_eos": True})
    assert tiny_top_p.choices[0].message.content == files["answers"]["good"]  # keeps only the likeliest token
    tiny_temperature = client.chat.completions.create(model="good", messages=QUESTION, temperature=1e-300,
                                                      max_tokens=6, extra_body={"ignore_eos": True})
    assert tiny_temperature.choices[0].message.content == files["answers"]["good"]  # greedy, as vLLM
    with pytest.raises(openai.BadRequestError) as seed:
        client.chat.completions.create(model="good", messages=QUESTION, seed=2**80, temperature=1)
    assert seed.value.body["param"] == "seed"
    assert _answer(server, "good") == files["answers"]["good"]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


# -- 11: a huge prompt is refused before it is read; a big one does not freeze the others ----------------------
def test_a_huge_body_gets_413_and_a_big_prompt_is_tokenized_off_the_event_loop(server, files):
    reply = httpx.post(f"{server.url}/v1/completions", headers=AUTH, timeout=60,
                       json={"model": "good", "prompt": "word " * (2 << 20)})  # 10 MiB
    assert reply.status_code == 413 and "--max-request-mb" in reply.json()["error"]["message"]
    big = {"model": "good", "messages": [{"role": "user", "content": "hello world, a long prompt. " * 120_000}]}
    finished: dict[str, float] = {}

    def send_big() -> None:
        answer = httpx.post(f"{server.url}/v1/chat/completions", headers=AUTH, json=big, timeout=300)
        finished["big"] = time.monotonic()
        finished["big_status"] = answer.status_code

    thread = threading.Thread(target=send_big)
    thread.start()
    time.sleep(0.3)  # the big prompt is being rendered and tokenized (seconds of CPU)
    assert _answer(server, "good") == files["answers"]["good"]
    finished["small"] = time.monotonic()
    thread.join()
    assert finished["big_status"] == 400  # longer than any context, found once tokenized
    assert finished["small"] < finished["big"], "a short request waited for a long prompt's tokenization"


# -- 13: start-up checks like the admin API; errors are OpenAI-shaped; no store paths ---------------------------------
def test_startup_refuses_what_the_admin_api_refuses(server):
    for name, words in (("linked", "outside the server's adapter directories"), ("huge", "over the server's cap")):
        with pytest.raises(openai.BadRequestError) as refused:
            _client(server).chat.completions.create(model=name, messages=QUESTION)
        assert words in refused.value.body["message"] and refused.value.body["code"] == "adapter_refused"
    assert "not serving linked" in server.output() and "not serving huge" in server.output()


def test_a_registry_name_never_replaces_a_local_adapter(server, files):
    assert _answer(server, "support") == files["answers"]["local"]  # --adapter-dir's support
    assert _answer(server, "support:prod") == files["answers"]["registered"]  # the registry's, by alias
    assert "registry adapter 'support' is not served under that name" in server.output()
    registry = Registry(*folder_location(files["registry"]))
    registry.promote("support@2", "prod", new_base=True)  # a version this server refuses
    deadline = time.monotonic() + 15
    while "support@2" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _answer(server, "support") == files["answers"]["local"]  # the local adapter was not unloaded
    assert _answer(server, "support:prod") == files["answers"]["registered"]  # the last good version
    admin = httpx.post(f"{server.url}/v1/load_lora_adapter", headers={"Authorization": f"Bearer {ADMIN}"},
                       json={"lora_name": "support:prod", "lora_path": "good", "load_inplace": True})
    assert admin.status_code == 400 and "follows the adapter registry" in admin.json()["error"]["message"]
    registry.rollback("support", "prod")


# -- the also-open items: a client gone before the first byte -----------------------------------------------------
def test_a_client_gone_before_the_first_byte_does_not_leave_its_request_running(server):
    before = _metric(server, "lorakit_generation_tokens_total")
    gone = _metric(server, 'lorakit_requests_total{adapter="good",status="499"')
    body = (b'{"model": "good", "prompt": "Hello", "max_tokens": 3000, "stream": true, "ignore_eos": true}')
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(request)
        connection.shutdown(socket.SHUT_RDWR)  # hang up before a byte of the reply
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _metric(server, 'lorakit_requests_total{adapter="good",status="499"') == gone:
        time.sleep(0.1)
    assert _metric(server, 'lorakit_requests_total{adapter="good",status="499"') == gone + 1
    time.sleep(1.0)
    assert _metric(server, "lorakit_num_requests_running") == 0
    assert _metric(server, "lorakit_generation_tokens_total") - before < 3000  # not decoded to the end, unread


# -- 12: a stream cut at shutdown says so ---------------------------------------------------------------------------
def test_streams_cut_at_the_shutdown_timeout_end_with_an_error_not_done(files):
    process = ServerProcess("--model", str(files["model"]), "--max-model-len", "4096", "--kv-cache-memory", "64",
                            "--shutdown-timeout", "0.5")
    try:
        client = openai.OpenAI(base_url=f"{process.url}/v1", api_key="-", max_retries=0, timeout=120)
        stream = client.completions.create(model=str(files["model"]), prompt="Hello", max_tokens=4000, stream=True,
                                           extra_body={"ignore_eos": True})
        texts = []
        with pytest.raises(openai.APIError, match="shut down before this request finished"):
            for chunk in stream:  # the openai client raises on an error event; [DONE] would end it quietly
                texts.append(chunk.choices[0].text if chunk.choices else "")
                if len(texts) == 2:
                    process.signal(signal.SIGTERM)
        assert len(texts) < 4000
        assert process.wait(timeout=60) == 0
    finally:
        process.stop()


@pytest.fixture(autouse=True)
def _quiet_tokenizers(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
