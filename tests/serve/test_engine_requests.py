"""The engine honours the request surface (issue 31): `n` choices share their prompt's KV blocks and
equal n independent seeded runs; logprobs and prompt logprobs are the model's log-softmax (an
in-process forward of the same adapter is the oracle, fp32 within 1e-4); penalties, logit_bias
and min_tokens follow vLLM's formulas (a reference implementation on the oracle's logits); ids
past the vocabulary are refused before admission; a step one request poisons is re-run without it,
and its neighbours' tokens stay exact; adapters loaded for queued requests are not evicted."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from conftest import VOCAB, tiny_llama
from lorakit.errors import RequestError
from lorakit.serve import Engine, SamplingParams

ATOL = 1e-4  # the bound: packed paged attention vs a plain forward, fp32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return lorakit.get_peft_model(copy.deepcopy(tiny_llama()), config, adapter_name="a").eval()


def _engine(model, **options) -> Engine:
    return Engine(copy.deepcopy(model), **{"max_model_len": 96, "kv_cache_memory": 1 << 22, "block_size": 4,
                                           **options})


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    """The oracle: log-softmax of a plain forward with adapter "a", one row per position."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def test_n_choices_share_the_prompt_blocks_and_equal_independent_seeded_runs(model):
    prompt = list(range(3, 3 + 18))  # 18 tokens: 4 full blocks of 4 and a partial one
    sampling = SamplingParams(max_tokens=6, n=3, temperature=0.9, seed=11, ignore_eos=True)
    engine = _engine(model)
    handle = engine.add_request(prompt, "a", sampling)
    assert len(handle.choices) == 3
    engine.step()  # the prompt in one step; the first token of all three choices sampled from its logits
    # 5 prompt blocks, shared: the forks copy only the partly filled last one (plain: 3 × 5 = 15)
    assert engine.cache.used_blocks == 5 + 2
    outputs = [choice.result() for choice in handle.choices]
    for choice, output in enumerate(outputs):
        alone = SamplingParams(max_tokens=6, temperature=0.9, seed=11 + choice, ignore_eos=True)
        assert output.token_ids == _engine(model).generate([prompt], ["a"], alone)[0].token_ids
    assert len({tuple(o.token_ids) for o in outputs}) > 1  # the seeds differ per choice
    assert engine.stats()["kv_blocks_used"] == 0  # every shared block went back exactly once


def test_sampled_and_prompt_logprobs_equal_an_in_process_forward(model):
    prompt = [5, 9, 14, 2, 7, 30, 11]
    sampling = SamplingParams(max_tokens=5, temperature=1.0, seed=3, logprobs=4, prompt_logprobs=2, ignore_eos=True)
    out = _engine(model, max_num_batched_tokens=3).generate([prompt], ["a"], sampling)[0]  # chunked prefill
    oracle = _logprobs(model, prompt + out.token_ids)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for t, entry in enumerate(out.prompt_logprobs[1:], start=1):  # prompt token t from position t - 1
        assert entry.token == prompt[t]
        assert abs(entry.logprob - oracle[t - 1, prompt[t]].item()) < ATOL
        assert [i for i, _ in entry.top] == oracle[t - 1].topk(2).indices.tolist()
    for k, entry in enumerate(out.logprobs):  # output token k from the position before it
        row = oracle[len(prompt) - 1 + k]
        assert entry.token == out.token_ids[k] and abs(entry.logprob - row[entry.token].item()) < ATOL
        top = row.topk(4)
        assert [i for i, _ in entry.top] == top.indices.tolist()
        assert torch.allclose(torch.tensor([v for _, v in entry.top]), top.values, atol=ATOL)


def _reference_greedy(model, prompt: list[int], steps: int, bias: dict[int, float], presence: float,
                      frequency: float, repetition: float) -> list[int]:
    """vLLM's documented order on the oracle's logits: bias, repetition (prompt and output), frequency and
    presence (output), then argmax."""
    out: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + out])).logits[0, -1].float()
        for token, value in bias.items():
            logits[token] += value
        for token in set(prompt + out):
            logits[token] = logits[token] / repetition if logits[token] > 0 else logits[token] * repetition
        for token in set(out):
            logits[token] -= frequency * out.count(token) + presence
        out.append(int(logits.argmax()))
    return out


def test_penalties_and_logit_bias_follow_vllms_formulas(model):
    prompt = [4, 8, 15, 16, 23, 42]
    plain = _engine(model).generate([prompt], ["a"], SamplingParams(max_tokens=10, ignore_eos=True))[0].token_ids
    settings = {"bias": {7: 3.0, 8: -2.0}, "presence": 1.5, "frequency": 0.7, "repetition": 1.3}
    sampling = SamplingParams(max_tokens=10, ignore_eos=True, logit_bias=settings["bias"],
                              presence_penalty=settings["presence"], frequency_penalty=settings["frequency"],
                              repetition_penalty=settings["repetition"])
    penalised = _engine(model).generate([prompt], ["a"], sampling)[0].token_ids
    assert penalised == _reference_greedy(model, prompt, 10, **settings)
    assert penalised != plain  # the settings change the answer (else this test would prove nothing)
    forced = SamplingParams(max_tokens=4, ignore_eos=True, logit_bias={17: 100.0}, temperature=0.8, seed=1)
    assert _engine(model).generate([prompt], ["a"], forced)[0].token_ids == [17] * 4


def test_min_tokens_holds_back_eos_and_stop_ids_then_lets_them_end_it(model):
    engine = _engine(model)
    eos = 2
    engine.eos_ids = {eos}
    eager = SamplingParams(max_tokens=10, logit_bias={eos: 100.0})  # EOS every time it may
    assert engine.generate([[5, 6]], ["a"], eager)[0].token_ids == [eos]
    held = SamplingParams(max_tokens=10, logit_bias={eos: 100.0}, min_tokens=3)
    out = engine.generate([[5, 6]], ["a"], held)[0]
    assert len(out.token_ids) == 4 and eos not in out.token_ids[:3] and out.token_ids[3] == eos
    assert out.finish_reason == "stop"
    stop_id = SamplingParams(max_tokens=10, logit_bias={9: 100.0}, stop_token_ids=[9], min_tokens=2, ignore_eos=True)
    out = engine.generate([[5, 6]], ["a"], stop_id)[0]
    assert out.token_ids[-1] == 9 and len(out.token_ids) == 3 and out.stop_reason == 9


def test_token_ids_past_the_vocabulary_are_refused_before_admission(model):
    engine = _engine(model)
    with pytest.raises(RequestError, match=f"Token id {VOCAB} is outside"):
        engine.add_request([5, VOCAB], "a")
    with pytest.raises(RequestError, match="Token id -1"):
        engine.add_request([-1, 5], None)
    assert engine.waiting == 0 and engine.stats()["kv_blocks_used"] == 0


def test_a_request_that_poisons_a_step_fails_alone_and_its_neighbours_are_exact(model):
    """A sentinel token id (valid, in range) makes the embedding raise — as a bug would — only when that request's
    tokens are in the step: the step runs again chunk by chunk; the neighbours never notice."""
    prompts, adapters = [[5, 6, 7, 8], [9, 10, 11], [12, 13]], ["a", None, "a"]
    sampling = SamplingParams(max_tokens=6, ignore_eos=True)
    expected = [o.token_ids for o in _engine(model).generate(prompts, adapters, sampling)]
    sentinel = max(set(range(VOCAB)) - {t for ids in [*prompts, *expected] for t in ids})  # only the poisoner's
    engine = _engine(model)

    def poison(module, args):
        if (args[0] == sentinel).any():
            raise RuntimeError("poisoned input")

    engine.model.get_input_embeddings().register_forward_pre_hook(poison)
    outputs = engine.generate([prompts[0], [20, sentinel, 21], *prompts[1:]], [adapters[0], "a", *adapters[1:]],
                              sampling)
    assert [outputs[0].token_ids, outputs[2].token_ids, outputs[3].token_ids] == expected
    assert outputs[1].finish_reason == "error" and "poisoned input" in outputs[1].error
    assert engine.generate([prompts[0]], ["a"], sampling)[0].token_ids == expected[0]  # the engine goes on


def test_adapters_loaded_for_queued_requests_are_not_evicted_before_they_run(tmp_path):
    """10 adapters requested in turn, three rounds all queued at once, room for 2: each is loaded once."""
    base = tiny_llama()
    paths = {}
    for i in range(10):
        torch.manual_seed(100 + i)
        config = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
        lorakit.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / f"a{i}")
        paths[f"a{i}"] = tmp_path / f"a{i}"
    serving = lorakit.PeftModel.for_serving(copy.deepcopy(base), lorakit.LoraConfig(r=1, target_modules="all-linear"))
    engine = Engine(serving, max_model_len=32, kv_cache_memory=1 << 22, block_size=4, max_num_seqs=4,
                    max_cpu_loras=2)
    for name, path in paths.items():
        engine.adapters.register(name, path)
    names = [f"a{i}" for i in range(10)] * 3
    sampling = SamplingParams(max_tokens=3, ignore_eos=True)
    outputs = engine.generate([[5, 6, 7]] * len(names), names, sampling)
    stats = engine.stats()
    assert all(o.finish_reason == "length" for o in outputs)
    assert stats["adapter_loads"] == 10  # before: an adapter evicted before its queued request ran, reloaded
    assert stats["adapters_resident"] <= 2  # and the cap held
    for name in ("a0", "a9"):  # the answers are each adapter's own
        oracle = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), paths[name])
        expected = _engine(oracle).generate([[5, 6, 7]], ["default"], sampling)[0].token_ids
        assert outputs[names.index(name)].token_ids == expected
