"""`lorakit serve` honours the request surface real clients send (issue 31), driven by the official
`openai` package and langchain-openai against a real process on 127.0.0.1.

Numbers are checked against an in-process PEFT model of the same adapter file (the oracle):
logprobs are its log-softmax within 1e-4 (fp32), greedy answers its tokens.
"""

from __future__ import annotations

import copy

import httpx
import openai
import pytest
import torch

from chat_model import QUESTION, build_chat_model, chat_ids, save_adapter
from lorakit.http.process import ServerProcess

ATOL = 1e-4
IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A chat model, two adapters under root/, a folder whose config is not JSON, and one whose weights are corrupt."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("requests")
    model_dir = build_chat_model(tmp / "base")
    base = LlamaForCausalLM.from_pretrained(model_dir).eval()
    root = tmp / "root"
    adapters = {"alpha": save_adapter(base, root / "alpha", 1), "beta": save_adapter(base, root / "beta", 2, r=4)}
    broken = save_adapter(base, root / "notjson", 3)
    (broken / "adapter_config.json").write_text("{ this is not json")
    corrupt = save_adapter(base, root / "corrupt", 4)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 50)
    return {"model": model_dir, "base": base, "adapters": adapters, "tokenizer": AutoTokenizer.from_pretrained(model_dir)}


@pytest.fixture(scope="module")
def server(files):
    with ServerProcess("--model", str(files["model"]), "--adapter-dir", str(files["adapters"]["alpha"].parent),
                       "--max-model-len", "128", "--max-num-seqs", "8", "--kv-cache-memory", "32") as process:
        yield process


@pytest.fixture(scope="module")
def oracle(files):
    """token ids → log-softmax rows of PEFT's forward with that adapter (float32)."""
    import peft

    models = {name: peft.PeftModel.from_pretrained(copy.deepcopy(files["base"]), folder).eval()
              for name, folder in files["adapters"].items()}

    def logprobs(adapter: str, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(models[adapter](input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)

    return logprobs


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=120)


def test_chat_n_choices_seeds_and_logprobs_equal_in_process(server, files, oracle):
    client, prompt = _client(server), chat_ids(files["tokenizer"])
    asked = dict(model="alpha", messages=QUESTION, n=3, temperature=1.0, seed=7, max_tokens=5, logprobs=True,
                 top_logprobs=3, extra_body={**IGNORE_EOS, "return_token_ids": True})
    reply = client.chat.completions.create(**asked)
    assert [c.index for c in reply.choices] == [0, 1, 2] and reply.usage.completion_tokens == 15
    assert reply.model_extra["prompt_token_ids"] == prompt
    assert len({tuple(c.model_extra["token_ids"]) for c in reply.choices}) > 1  # each choice its own seed
    for choice in reply.choices:
        ids = choice.model_extra["token_ids"]
        rows = oracle("alpha", prompt + ids)[len(prompt) - 1:]
        for k, entry in enumerate(choice.logprobs.content):
            assert abs(entry.logprob - rows[k, ids[k]].item()) < ATOL
            top = rows[k].topk(3)
            assert [t.logprob for t in entry.top_logprobs[:3]] == pytest.approx(top.values.tolist(), abs=ATOL)
    again = client.chat.completions.create(**asked)  # a seeded request answers the same
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]
    streamed = client.chat.completions.create(**{**asked, "logprobs": False, "top_logprobs": None}, stream=True,
                                              stream_options={"include_usage": True})
    texts = ["", "", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in reply.choices]


def test_completions_list_prompts_echo_and_logprobs_as_lm_eval_sends_them(server, files, oracle):
    """lm-eval's loglikelihood request: several token-id prompts, max_tokens 1, logprobs 1, echo."""
    prompts = [[5, 9, 14, 2, 7], [30, 11, 12], [40, 41, 42, 43, 44, 45]]
    reply = _client(server).completions.create(model="beta", prompt=prompts, max_tokens=1, logprobs=1, echo=True,
                                               temperature=0, seed=1234)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage.prompt_tokens == sum(map(len, prompts)) and reply.usage.completion_tokens == 3
    for choice, prompt in zip(reply.choices, prompts, strict=True):
        logprobs = choice.logprobs
        assert len(logprobs.token_logprobs) == len(prompt) + 1 and logprobs.token_logprobs[0] is None
        generated = int(oracle("beta", prompt)[-1].argmax())
        rows = oracle("beta", prompt + [generated])
        for t, value in enumerate(logprobs.token_logprobs[1:], start=1):
            assert abs(value - rows[t - 1, (prompt + [generated])[t]].item()) < ATOL
            assert len(logprobs.top_logprobs[t]) <= 2 and max(logprobs.top_logprobs[t].values()) == pytest.approx(
                rows[t - 1].max().item(), abs=ATOL)
    zero = _client(server).completions.create(model="beta", prompt=prompts[0], max_tokens=2, logprobs=0, temperature=0)
    assert len(zero.choices[0].logprobs.token_logprobs) == 2  # logprobs=0: the sampled token's own, not ignored
    assert all(len(top) == 1 for top in zero.choices[0].logprobs.top_logprobs)


def test_n_times_list_prompts_index_as_openai_and_streams_interleave(server):
    client = _client(server)
    asked = dict(model="alpha", prompt=["Who built", "What colour"], n=3, max_tokens=4, temperature=0.9, seed=3,
                 extra_body=IGNORE_EOS)
    reply = client.completions.create(**asked)
    assert [c.index for c in reply.choices] == list(range(6))
    for i, prompt in enumerate(asked["prompt"]):  # choice j of prompt i is index i·n + j, seeded seed + j
        alone = client.completions.create(**{**asked, "prompt": prompt})
        assert [c.text for c in reply.choices[3 * i:3 * i + 3]] == [c.text for c in alone.choices]
    texts = [""] * 6
    for chunk in client.completions.create(**asked, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in reply.choices]
    best = client.completions.create(**{**asked, "n": 1, "prompt": "Who built"}, best_of=3, logprobs=0)
    candidates = client.completions.create(**{**asked, "prompt": "Who built"}, logprobs=0)
    scores = [sum(c.logprobs.token_logprobs) for c in candidates.choices]
    assert best.choices[0].text == candidates.choices[scores.index(max(scores))].text  # the likeliest of best_of


def test_openai_fields_and_no_op_values_are_honoured(server, files, oracle):
    client, tokenizer = _client(server), files["tokenizer"]
    prompt = chat_ids(tokenizer)
    greedy = oracle("alpha", prompt)[-1].argmax().item()
    reply = client.chat.completions.create(
        model="alpha", messages=QUESTION, max_tokens=3, temperature=0, user="u-1", store=False, metadata={"k": "v"},
        service_tier="auto", parallel_tool_calls=False, tools=[], tool_choice="none", response_format={"type": "text"},
        stop=["zz1", "zz2", "zz3", "zz4"], presence_penalty=0.0, frequency_penalty=0.0,
        logit_bias={str(greedy): -100}, extra_body={**IGNORE_EOS, "return_token_ids": True})
    assert reply.choices[0].model_extra["token_ids"][0] != greedy  # the bias moved the first token off the argmax
    forced = client.chat.completions.create(model="alpha", messages=QUESTION, max_tokens=3, temperature=0.7, seed=1,
                                            logit_bias={"42": 100}, extra_body={**IGNORE_EOS, "return_token_ids": True})
    assert forced.choices[0].model_extra["token_ids"] == [42, 42, 42]
    penalised = client.chat.completions.create(model="alpha", messages=QUESTION, max_tokens=8, temperature=0,
                                               logit_bias={"42": 8}, frequency_penalty=2.0, presence_penalty=2.0,
                                               extra_body={**IGNORE_EOS, "return_token_ids": True})
    assert penalised.choices[0].model_extra["token_ids"].count(42) < 8  # penalties push back against the bias


def test_vllm_extensions_are_honoured(server, files):
    client, tokenizer = _client(server), files["tokenizer"]
    eos = tokenizer.eos_token_id
    held = client.completions.create(model="alpha", prompt=[5, 6, 7], max_tokens=8, temperature=0,
                                     logit_bias={str(eos): 100}, extra_body={"min_tokens": 3, "return_token_ids": True})
    assert len(held.choices[0].model_extra["token_ids"]) == 4 and held.choices[0].finish_reason == "stop"
    stop_id = client.completions.create(model="alpha", prompt=[5, 6, 7], max_tokens=8, temperature=0, logit_bias={"50": 100},
                                        extra_body={"stop_token_ids": [50], "return_token_ids": True})
    assert stop_id.choices[0].model_extra["token_ids"] == [50] and stop_id.choices[0].model_extra["stop_reason"] == 50
    allowed = client.completions.create(model="alpha", prompt=[5, 6, 7], max_tokens=6, temperature=1.0, seed=2,
                                        extra_body={**IGNORE_EOS, "allowed_token_ids": [60, 61], "top_k": 1,
                                                    "min_p": 0.1, "repetition_penalty": 1.2, "return_token_ids": True})
    assert set(allowed.choices[0].model_extra["token_ids"]) <= {60, 61}
    text = tokenizer.decode([60])
    stopped = client.completions.create(model="alpha", prompt=[5, 6, 7], max_tokens=6, temperature=0,
                                        logit_bias={"60": 100}, stop=[text],
                                        extra_body={"include_stop_str_in_output": True})
    assert stopped.choices[0].text == text and stopped.choices[0].model_extra["stop_reason"] == text
    specials = client.completions.create(model="alpha", prompt=[5, 6, 7], max_tokens=1, temperature=0,
                                         logit_bias={str(eos): 100},
                                         extra_body={"skip_special_tokens": False, "ignore_eos": True})
    assert specials.choices[0].text == tokenizer.eos_token
    truncated = client.completions.create(model="alpha", prompt=list(range(5, 45)), max_tokens=1, temperature=0,
                                          extra_body={"truncate_prompt_tokens": 10})
    assert truncated.usage.prompt_tokens == 10
    as_ids = client.completions.create(model="alpha", prompt=[5, 6], max_tokens=2, temperature=0, logprobs=1,
                                       extra_body={"return_tokens_as_token_ids": True, "prompt_logprobs": 1,
                                                   "request_id": "my-id"})
    assert as_ids.id == "cmpl-my-id" and all(t.startswith("token_id:") for t in as_ids.choices[0].logprobs.tokens)
    assert as_ids.choices[0].model_extra["prompt_logprobs"][0] is None
    assert "6" in as_ids.choices[0].model_extra["prompt_logprobs"][1]


def test_chat_template_options_and_continuous_usage(server, files):
    client, tokenizer = _client(server), files["tokenizer"]
    messages = [*QUESTION, {"role": "assistant", "content": "Quen"}]
    continued = client.chat.completions.create(model="alpha", messages=messages, max_tokens=2, temperature=0,
                                               extra_body={"continue_final_message": True, "add_generation_prompt": False,
                                                           "echo": True, "return_token_ids": True, **IGNORE_EOS})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert continued.model_extra["prompt_token_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert continued.choices[0].message.content.startswith("Quen")  # vLLM's chat echo: the last message first
    kwargs = client.chat.completions.create(model="alpha", messages=QUESTION, max_tokens=1, temperature=0,
                                            extra_body={"chat_template_kwargs": {"add_generation_prompt": False},
                                                        "return_token_ids": True})
    plain = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=False)
    assert kwargs.model_extra["prompt_token_ids"] == tokenizer(plain, add_special_tokens=False)["input_ids"]
    chunks = list(client.chat.completions.create(model="alpha", messages=QUESTION, max_tokens=4, temperature=0,
                                                 stream=True, extra_body=IGNORE_EOS,
                                                 stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(c.usage is not None for c in chunks)  # usage on every chunk (guidellm reads it)
    assert [c.usage.completion_tokens for c in chunks if c.choices and c.choices[0].delta.content] == [1, 2, 3, 4][
        :len([c for c in chunks if c.choices and c.choices[0].delta.content])]
    assert chunks[-1].usage.completion_tokens == 4 and not chunks[-1].choices


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"prompt": [[5, 100000]]}, "prompt", "outside this model's vocabulary"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream"),
    ({"prompt": "hi", "mirostat": 1}, "mirostat", "Neither OpenAI nor vLLM"),
    ({"prompt": "hi", "structural_tag": "{}"}, "structural_tag", "does not implement"),
    ({"prompt": "hi", "use_beam_search": True}, "use_beam_search", "no beam search"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs", "less than or equal to 20"),
    ({"prompt": "hi", "logit_bias": {"99999": 1}}, "logit_bias", "outside"),
    ({"prompt": "hi", "n": 3, "best_of": 2}, "best_of", "at least n"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens", "unless echo"),
    ({"prompt": ["a", [1]]}, "prompt", "not both"),
    ({"model": "notjson", "prompt": "hi"}, "model", "not valid JSON"),
    ({"model": "corrupt", "prompt": "hi"}, "model", "corrupt"),
    ({"model": "corrupt", "prompt": "hi", "stream": True}, "model", "corrupt"),
])
def test_invalid_requests_get_a_400_that_names_the_field(server, body, param, says):
    reply = httpx.post(f"{server.url}/v1/completions", json={"model": "alpha", "max_tokens": 2, **body}, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and says in error["message"]


def test_chat_400s_and_a_malformed_body_says_where(server):
    named = {"type": "function", "function": {"name": "g"}}
    for body, param in [({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": named},
                         "tool_choice"),
                        ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
                        ({"response_format": {"type": "json_schema"}}, "response_format")]:
        reply = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "alpha", "messages": QUESTION, **body})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param
    cut = b'{"model": "alpha", "messages": ['
    broken = httpx.post(f"{server.url}/v1/chat/completions", content=cut, headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    assert f"at character {len(cut)}" in broken.json()["error"]["message"]  # where it broke: the end


def test_a_bad_request_never_fails_its_neighbour(server, files):
    """One client sends token ids past the vocabulary while another's greedy answer decodes: the first gets a 400,
    the second the same tokens as when alone."""
    client = _client(server)
    alone = client.completions.create(model="beta", prompt=[5, 6, 7], max_tokens=12, temperature=0,
                                      extra_body=IGNORE_EOS).choices[0].text
    with httpx.Client(timeout=120) as http:
        stream = client.completions.create(model="beta", prompt=[5, 6, 7], max_tokens=12, temperature=0, stream=True,
                                           extra_body=IGNORE_EOS)
        first = next(iter(stream))
        bad = http.post(f"{server.url}/v1/completions", json={"model": "alpha", "prompt": [[1, 10**6]]})
        text = first.choices[0].text + "".join(c.choices[0].text for c in stream)
    assert bad.status_code == 400 and text == alone


def test_models_route_and_tokenizer_routes(server, files):
    tokenizer = files["tokenizer"]
    card = httpx.get(f"{server.url}/v1/models/alpha").json()
    assert card["id"] == "alpha" and card["parent"] == str(files["model"]) and card["root"] == "root/alpha"
    missing = httpx.get(f"{server.url}/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    tokens = httpx.post(f"{server.url}/tokenize", json={"model": "alpha", "prompt": "Who built"}).json()
    assert tokens["tokens"] == tokenizer("Who built")["input_ids"] and tokens["count"] == len(tokens["tokens"])
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": QUESTION}).json()
    assert chat["tokens"] == chat_ids(tokenizer)
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == "Who built"
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": [10**6]}).status_code == 400
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.eos_token and info["chat_template"] == tokenizer.chat_template
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_metrics_are_per_adapter_and_version(server):
    client = _client(server)
    client.completions.create(model="beta", prompt=[5, 6], max_tokens=3, temperature=0, extra_body=IGNORE_EOS)
    assert httpx.post(f"{server.url}/v1/completions", json={"model": "beta", "prompt": [[10**6]]}).status_code == 400
    text = httpx.get(f"{server.url}/metrics").text

    def value(prefix: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))

    assert value('lorakit_requests_total{adapter="beta",status="200",version="beta@1"}') >= 1
    assert value('lorakit_request_tokens_total{adapter="beta",kind="generation",version="beta@1"}') >= 3
    assert value('lorakit_time_to_first_token_seconds_count{adapter="beta",version="beta@1"}') >= 1
    assert value('lorakit_request_latency_seconds_count{adapter="beta",version="beta@1"}') >= 1
    assert value('lorakit_adapter_resident{adapter="beta",version="beta@1"}') == 1
    assert 0 <= value("lorakit_adapter_cache_hit_ratio") <= 1
    assert value('lorakit_request_errors_total{adapter="beta",type="invalid_request_error"') >= 1
    models = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    assert models["beta"]["lorakit"] == {"version": "beta@1", "resident": True}


def test_langchain_invoke_stream_batch_and_logprobs(server, files):
    from langchain_openai import ChatOpenAI, OpenAI

    chat = ChatOpenAI(model="alpha", base_url=f"{server.url}/v1", api_key="-", temperature=0, max_tokens=5,
                      max_retries=0, extra_body=IGNORE_EOS)
    answer = chat.invoke("What is the capital of Veloria?").content
    assert answer == "".join(chunk.content for chunk in chat.stream("What is the capital of Veloria?"))
    assert [m.content for m in chat.batch(["What is the capital of Veloria?"] * 3)] == [answer] * 3
    with_logprobs = chat.bind(logprobs=True).invoke("What is the capital of Veloria?")
    assert len(with_logprobs.response_metadata["logprobs"]["content"]) == 5
    llm = OpenAI(model="beta", base_url=f"{server.url}/v1", api_key="-", temperature=0, max_tokens=3, max_retries=0,
                 batch_size=4, extra_body=IGNORE_EOS)
    outputs = llm.batch(["Who built", "What colour", "How many"])  # one request, a list of prompts
    assert outputs == [llm.invoke(p) for p in ["Who built", "What colour", "How many"]]
