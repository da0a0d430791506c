"""`lorakit serve` as a real process on 127.0.0.1, driven by the official `openai` client and httpx.

Every greedy answer is checked against PEFT's `generate` on the same base and adapter file
(the oracle), so "the right adapter answered" means the right tokens, not just a 200.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from chat_model import GREEDY, QUESTION, build_chat_model, chat_ids, peft_answer, save_adapter
from lorakit.http.process import ServerProcess

ADMIN, KEY = "admin-secret", "inference-secret"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A chat model; adapters served from root/ (alpha, beta), hot-swap variants and bad files below root/."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("serve")
    model_dir = build_chat_model(tmp / "base")
    base = LlamaForCausalLM.from_pretrained(model_dir).eval()
    root = tmp / "root"
    adapters = {"alpha": save_adapter(base, root / "alpha", 1), "beta": save_adapter(base, root / "beta", 2, r=4)}
    variants = {f"h{i}_v{v}": save_adapter(base, root / "variants" / f"h{i}_v{v}", 10 + 2 * i + v)
                for i in range(3) for v in (1, 2)}
    bad = root / "bad"
    corrupt = save_adapter(base, bad / "corrupt", 3)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 50)
    pickled = save_adapter(base, bad / "pickled", 4)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    other_base = LlamaForCausalLM.from_pretrained(build_chat_model(tmp / "other", seed=7)).eval()
    save_adapter(other_base, bad / "other_base", 5)
    outside = save_adapter(base, tmp / "outside" / "adapter", 6)
    (bad / "escape").symlink_to(outside, target_is_directory=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    answers = {name: peft_answer(base, folder, tokenizer) for name, folder in {**adapters, **variants}.items()}
    own = AutoTokenizer.from_pretrained(model_dir)  # an adapter folder with its own chat template
    own.chat_template = "{{ 'Answer briefly. ' }}" + own.chat_template
    adapters["templated"] = save_adapter(base, root / "templated", 1)  # alpha's weights, another template
    own.save_pretrained(adapters["templated"])
    answers["templated"] = peft_answer(base, adapters["templated"], own)
    answers["__base__"] = peft_answer(base, None, tokenizer)
    assert len(set(answers.values())) == len(answers), "the oracle answers must tell the adapters apart"
    return {"model": model_dir, "root": root, "adapters": adapters, "variants": variants, "outside": outside,
            "answers": answers}


@pytest.fixture(scope="module")
def server(files):
    with ServerProcess("--model", str(files["model"]), "--adapter-dir", str(files["root"]), "--api-key", KEY,
                       "--admin-key", ADMIN, "--max-model-len", "256", "--max-num-seqs", "8",
                       "--kv-cache-memory", "64") as process:
        yield process


def _client(server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def _admin(server, route: str, body: dict, key: str | None = ADMIN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}/v1/{route}", json=body, headers=headers, timeout=30)


def _metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_openai_client_chat_and_completions_streaming_or_not_answer_as_peft(server, files):
    client, answers = _client(server), files["answers"]
    for model in ("alpha", "beta", "templated"):  # templated: rendered with its own folder's chat template
        reply = client.chat.completions.create(model=model, messages=QUESTION, **GREEDY)
        assert reply.model == model and reply.choices[0].message.content == answers[model]
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 6
        chunks = list(client.chat.completions.create(model=model, messages=QUESTION, stream=True,
                                                     stream_options={"include_usage": True}, **GREEDY))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answers[model]
        assert chunks[-1].usage.total_tokens == reply.usage.total_tokens
    base_name = str(files["model"])
    reply = client.chat.completions.create(model=base_name, messages=QUESTION, **GREEDY)
    assert reply.choices[0].message.content == answers["__base__"]  # the base's name: no adapter
    from transformers import AutoTokenizer

    ids = chat_ids(AutoTokenizer.from_pretrained(files["model"]))
    text = client.completions.create(model="alpha", prompt=ids, **GREEDY)
    streamed = client.completions.create(model="alpha", prompt=ids, stream=True, **GREEDY)
    assert text.choices[0].text == "".join(c.choices[0].text for c in streamed) == answers["alpha"]
    cards = {m.id: m for m in client.models.list().data}
    assert {base_name, "alpha", "beta"} <= set(cards)
    assert cards["alpha"].parent == base_name and cards["alpha"].root == "root/alpha"  # never the server's absolute path


def test_errors_are_openai_shaped_and_name_what_was_wrong(server):
    client = _client(server)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=QUESTION)
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    with pytest.raises(openai.AuthenticationError):
        _client(server, key="wrong").chat.completions.create(model="alpha", messages=QUESTION)
    with pytest.raises(openai.BadRequestError) as n:
        client.chat.completions.create(model="alpha", messages=QUESTION, n=0)
    assert n.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as extra:
        client.chat.completions.create(model="alpha", messages=QUESTION, extra_body={"mirostat": 1})
    assert extra.value.body["param"] == "mirostat"
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "the " * 400}])
    assert long.value.body["code"] == "context_length_exceeded"
    assert "maximum context length is 256 tokens" in long.value.body["message"]
    assert _metric(server, 'lorakit_requests_total{adapter="",status="404"') >= 1


def test_admin_is_its_own_privilege_and_loads_only_from_the_adapter_dirs(server, files):
    before = {m.id for m in _client(server).models.list().data}
    body = {"lora_name": "gamma", "lora_path": "variants/h0_v1"}
    assert _admin(server, "load_lora_adapter", body, key=None).status_code == 401
    assert _admin(server, "load_lora_adapter", body, key=KEY).status_code == 401  # the inference key is not admin
    assert {m.id for m in _client(server).models.list().data} == before  # nothing was loaded
    refused = {
        "../outside/adapter": (400, "'..'"),
        str(files["outside"]): (400, "outside the server's adapter directories"),
        "bad/escape": (400, "outside the server's adapter directories"),  # a symlink out of the root
        "bad/corrupt": (400, "adapter_model.safetensors"),
        "bad/pickled": (400, "pickle"),
        "bad/other_base": (400, "base"),
        "variants/missing": (404, "No adapter found"),
    }
    for path, (status, words) in refused.items():
        reply = _admin(server, "load_lora_adapter", {"lora_name": "gamma", "lora_path": path})
        assert reply.status_code == status and words in reply.json()["error"]["message"], (path, reply.text)
    assert _admin(server, "load_lora_adapter", {"lora_name": "gamma"}).status_code == 400
    assert "gamma" not in {m.id for m in _client(server).models.list().data}
    loaded = _admin(server, "load_lora_adapter", body)
    assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'gamma' added successfully."
    assert _admin(server, "load_lora_adapter", body).status_code == 400  # already loaded
    reply = _client(server).chat.completions.create(model="gamma", messages=QUESTION, **GREEDY)
    assert reply.choices[0].message.content == files["answers"]["h0_v1"]
    assert _admin(server, "unload_lora_adapter", {"lora_name": "gamma"}).text == (
        "Success: LoRA adapter 'gamma' removed successfully.")
    assert _admin(server, "unload_lora_adapter", {"lora_name": "gamma"}).status_code == 404
    with pytest.raises(openai.NotFoundError):
        _client(server).chat.completions.create(model="gamma", messages=QUESTION)


def test_a_client_that_disconnects_mid_stream_frees_its_request(server):
    aborted = _metric(server, 'lorakit_requests_total{adapter="alpha",status="499"')
    body = {"model": "alpha", "messages": QUESTION, "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("data: {") or _metric(server, "lorakit_kv_cache_blocks_used") == 0:
            pass  # read until tokens flow and the request holds KV blocks, then hang up
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (_metric(server, "lorakit_num_requests_running")
                                           or _metric(server, "lorakit_kv_cache_blocks_used")):
        time.sleep(0.05)
    assert _metric(server, "lorakit_num_requests_running") == 0 and _metric(server, "lorakit_kv_cache_blocks_used") == 0
    assert _metric(server, 'lorakit_requests_total{adapter="alpha",status="499"') == aborted + 1
    assert _metric(server, "lorakit_generation_tokens_total") < 1000  # it did not run its 200 tokens to the end


def test_hot_swap_under_load_every_reply_is_the_version_loaded_at_admission(server, files):
    """8 clients send 240 requests over three adapters (streaming and not) while an admin task replaces
    them in place and unloads/reloads one. Each reply must be the answer of a version that was current
    at some moment between sending and receiving it (exactly one, when no swap overlapped)."""
    answers = files["answers"]
    names = ["h0", "h1", "h2"]
    timeline: dict[str, list[tuple[float, float, str | None]]] = {}  # name -> (start, end, variant or None)
    results: list[tuple[float, float, str, int, str]] = []
    stop_at = time.monotonic() + 60

    async def admin(http: httpx.AsyncClient) -> None:
        current = {name: "v1" for name in names}
        for name in names:
            await _load(http, name, f"{name}_v1", False, timeline)
        loaded.set()
        k = 0
        while not done.is_set() and time.monotonic() < stop_at:
            name = names[k % 3]
            if k % 5 == 4:  # unload h2, let requests find it gone, load it again
                start = time.monotonic()
                reply = await http.post("/v1/unload_lora_adapter", json={"lora_name": "h2"},
                                        headers={"Authorization": f"Bearer {ADMIN}"})
                assert reply.status_code == 200, reply.text
                timeline["h2"].append((start, time.monotonic(), None))
                await asyncio.sleep(0.15)
                current["h2"] = "v1"
                await _load(http, "h2", "h2_v1", False, timeline)
            else:  # replace in place with the other file
                current[name] = "v2" if current[name] == "v1" else "v1"
                await _load(http, name, f"{name}_{current[name]}", True, timeline)
            k += 1
            await asyncio.sleep(0.05)

    async def worker(client: openai.AsyncOpenAI, i: int) -> None:
        await loaded.wait()
        for j in range(30):
            name = names[(i + j) % 3]
            sent = time.monotonic()
            try:
                if j % 2:
                    stream = await client.chat.completions.create(model=name, messages=QUESTION, stream=True, **GREEDY)
                    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
                else:
                    reply = await client.chat.completions.create(model=name, messages=QUESTION, **GREEDY)
                    text = reply.choices[0].message.content
                status = 200
            except openai.APIStatusError as error:
                status, text = error.status_code, ""
            results.append((sent, time.monotonic(), name, status, text))

    async def main() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=30)
            admin_task = asyncio.create_task(admin(http))
            await asyncio.gather(*(worker(client, i) for i in range(8)))
            done.set()
            await admin_task

    loaded, done = asyncio.Event(), asyncio.Event()
    asyncio.run(main())
    assert len(results) == 240 and not [r for r in results if r[3] >= 500]
    swaps = sum(len(v) for v in timeline.values())
    assert swaps >= 10, f"only {swaps} admin changes overlapped the load"
    gone = 0
    for sent, received, name, status, text in results:
        possible = _possible_versions(timeline[name], sent, received)
        if status == 404:
            assert None in possible, (name, sent, received)
            gone += 1
        else:
            assert status == 200 and text in {answers[v] for v in possible if v}, (name, text, possible)
    assert gone >= 1, "no request arrived while h2 was unloaded"


async def _load(http: httpx.AsyncClient, name: str, variant: str, inplace: bool, timeline) -> None:
    start = time.monotonic()
    reply = await http.post("/v1/load_lora_adapter", headers={"Authorization": f"Bearer {ADMIN}"},
                            json={"lora_name": name, "lora_path": f"variants/{variant}", "load_inplace": inplace})
    assert reply.status_code == 200, reply.text
    timeline.setdefault(name, []).append((start, time.monotonic(), variant))


def _possible_versions(events: list[tuple[float, float, str | None]], sent: float, received: float) -> set:
    """What could have been current when a request sent at `sent` and answered at `received` was admitted:
    the state after the last change finished before `sent`, and every change that began before `received`."""
    before = [e for e in events if e[1] <= sent]
    possible = {before[-1][2]} if before else set()
    possible |= {e[2] for e in events if e[1] > sent and e[0] < received}
    return possible


def test_queue_limit_429_then_sigterm_drains_in_flight_requests_and_exits_0(files):
    with ServerProcess("--model", str(files["model"]), "--adapter", f"alpha={files['adapters']['alpha']}",
                       "--max-num-seqs", "1", "--max-queue", "1", "--max-model-len", "256",
                       "--kv-cache-memory", "64", "--shutdown-timeout", "60") as server:
        assert _admin(server, "load_lora_adapter", {"lora_name": "x", "lora_path": "y"}).status_code == 404  # no admin key

        async def one(client: httpx.AsyncClient, tokens: int) -> httpx.Response:
            return await client.post("/v1/chat/completions", json={
                "model": "alpha", "messages": QUESTION, "max_tokens": tokens, "temperature": 0, "ignore_eos": True})

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                return await asyncio.gather(*(one(client, 60) for _ in range(6)))

        replies = asyncio.run(burst())
        limited = [r for r in replies if r.status_code == 429]
        assert limited and all(r.status_code == 200 for r in replies if r not in limited)
        assert limited[0].headers["retry-after"] == "1" and limited[0].json()["error"]["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):  # the official client's type, while one runs and one waits
            async def crowd():
                async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
                    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0)
                    running = []
                    for _ in range(2):  # one running, one waiting: the queue is full
                        running.append(asyncio.create_task(one(http, 200)))
                        await asyncio.sleep(0.3)
                    try:
                        await client.chat.completions.create(model="alpha", messages=QUESTION, max_tokens=2)
                    finally:
                        await asyncio.gather(*running)
            asyncio.run(crowd())

        async def drain() -> tuple[list[dict], int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                running = []
                for _ in range(2):  # one running, one waiting (spaced: the queue holds one, or it is a 429)
                    running.append(asyncio.create_task(one(client, 200)))
                    await asyncio.sleep(0.4)
                server.signal()
                await asyncio.sleep(0.3)
                refused = await one(client, 2)
                return [(await r).json() for r in running], refused.status_code

        finished, refused = asyncio.run(drain())
        assert refused == 503
        assert all(f["choices"][0]["finish_reason"] == "length" and f["usage"]["completion_tokens"] == 200
                   for f in finished)
        assert server.wait(timeout=30) == 0


def test_readme_server_example_runs(files, tmp_path):
    """The README's `lorakit serve` section: its curl and Python blocks, against a real server."""
    import re
    import subprocess

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## The server: `lorakit serve`", 1)[1].split("\n## ", 1)[0]
    shell = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    python = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert shell and python
    import shutil

    adapters = tmp_path / "adapters"
    shutil.copytree(files["adapters"]["alpha"], adapters / "support")
    shutil.copytree(files["adapters"]["beta"], adapters / "sql")
    with ServerProcess("--model", str(files["model"]), "--served-model-name", "HuggingFaceTB/SmolLM2-135M-Instruct",
                       "--adapter-dir", str(adapters), "--admin-key", "change-me", "--max-model-len", "256",
                       "--kv-cache-memory", "64") as server:
        port = str(server.port)
        for block in shell:
            for command in re.findall(r"^(curl .*?)(?<!\\)$", block.replace("\\\n", " "), flags=re.M):
                done = subprocess.run(command.replace("8000", port), shell=True, capture_output=True, text=True,
                                      cwd=tmp_path, timeout=60)
                assert done.returncode == 0 and '"error"' not in done.stdout, (command, done.stdout, done.stderr)
                if "load_lora_adapter" in command:
                    assert "Success" in done.stdout, done.stdout
        for block in python:
            exec(compile(block.replace("8000", port), "README.md", "exec"), {"__name__": "readme"})
        assert json.loads(httpx.get(f"{server.url}/v1/models").text)["data"][0]["id"] == (
            "HuggingFaceTB/SmolLM2-135M-Instruct")
