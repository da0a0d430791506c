"""The continuous-batching engine: every request's greedy tokens equal that request run alone
through `model.generate` with its adapter (fp32, token for token), whatever the batch around it
— arrivals mid-flight, mixed ranks, base-only requests, chunked prefill, preemption, an adapter
replaced while its old requests decode."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

import lorakit
from conftest import VOCAB, tiny_llama
from lorakit.errors import RequestError
from lorakit.serve import Engine, SamplingParams

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


def _config(r: int, seed: int) -> lorakit.LoraConfig:
    torch.manual_seed(seed)
    return lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A base, a model with adapters "a" (r4) and "b" (r8), and adapters c, d, e, f (r2/4/8/16) saved on disk."""
    base = tiny_llama()
    model = lorakit.get_peft_model(copy.deepcopy(base), _config(4, 1), adapter_name="a").eval()
    model.add_adapter("b", _config(8, 2))
    root = tmp_path_factory.mktemp("adapters")
    paths = {}
    for i, (name, r) in enumerate([("c", 2), ("d", 4), ("e", 8), ("f", 16)]):
        one = lorakit.get_peft_model(copy.deepcopy(base), _config(r, 10 + i), adapter_name=name)
        one.save_pretrained(root / name, selected_adapters=[name])
        paths[name] = root / name / name if (root / name / name).exists() else root / name
    return base, model, paths


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (int(n),), generator=gen).tolist()
            for n in torch.randint(2, 14, (count,), generator=gen)]


def _alone(base, model, paths, prompt, adapter, max_tokens=8) -> list[int]:
    """The oracle: `generate` on a fresh model holding only this request's adapter."""
    if adapter in (None, "a", "b"):
        oracle = copy.deepcopy(model)
    else:
        oracle = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), paths[adapter], adapter_name=adapter)
    ids = torch.tensor([prompt])
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                  pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        if adapter is None:
            with oracle.disable_adapter():
                return oracle.generate(**kwargs)[0, len(prompt):].tolist()
        oracle.set_adapter(adapter)
        return oracle.generate(**kwargs)[0, len(prompt):].tolist()


def _engine(model, **options) -> Engine:
    options = {"max_model_len": 64, "kv_cache_memory": 1 << 22, "block_size": 4, **options}
    return Engine(copy.deepcopy(model), **options)


def test_greedy_tokens_equal_each_request_alone_with_arrivals_mid_flight(setup):
    base, model, paths = setup
    engine = _engine(model, max_num_batched_tokens=10, max_num_seqs=4)  # chunked prefill, a queue
    for name in ("c", "e"):
        engine.adapters.register(name, paths[name])
    prompts = _prompts(9)
    adapters = ["a", None, "b", "c", "a", "e", None, "b", "c"]
    handles = [engine.add_request(p, a, GREEDY) for p, a in zip(prompts[:4], adapters[:4], strict=True)]
    for _ in range(3):
        engine.step()
    handles += [engine.add_request(p, a, GREEDY) for p, a in zip(prompts[4:], adapters[4:], strict=True)]
    outputs = [h.result() for h in handles]
    assert engine.stats()["kv_blocks_used"] == 0
    for prompt, adapter, out in zip(prompts, adapters, outputs, strict=True):
        assert out.finish_reason == "length"
        assert out.token_ids == _alone(base, model, paths, prompt, adapter), adapter


def test_preemption_by_recompute_keeps_answers_exact(setup):
    base, model, paths = setup
    engine = _engine(model, kv_cache_memory=8 * 1024, max_model_len=24, max_num_seqs=6)  # 8 blocks of 4 tokens
    prompts, adapters = _prompts(6, seed=3), ["a", "b", None, "a", "b", None]
    outputs = engine.generate(prompts, adapters, SamplingParams(max_tokens=10, ignore_eos=True))
    assert sum(o.preemptions for o in outputs) > 0  # the tiny budget forced some
    for prompt, adapter, out in zip(prompts, adapters, outputs, strict=True):
        assert out.token_ids == _alone(base, model, paths, prompt, adapter, max_tokens=10)


def test_a_replaced_adapter_keeps_serving_its_old_requests(setup):
    base, model, paths = setup
    engine = _engine(model)
    engine.adapters.register("x", paths["c"])
    prompts = _prompts(2, seed=5)
    old = engine.add_request(prompts[0], "x", SamplingParams(max_tokens=12, ignore_eos=True))
    while len(old.seq.output_ids) < 3:
        engine.step()
    engine.adapters.register("x", paths["f"])  # replaced mid-flight
    new = engine.add_request(prompts[1], "x", GREEDY)
    assert old.result().token_ids == _alone(base, model, paths, prompts[0], "c", max_tokens=12)
    assert new.result().token_ids == _alone(base, model, paths, prompts[1], "f")
    assert "x@1" not in engine.model.peft_config  # released with its last request


def test_seeded_sampling_does_not_depend_on_the_batch(setup):
    _, model, _ = setup
    sampled = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=20, seed=7, ignore_eos=True)
    prompt = _prompts(1, seed=9)[0]
    alone = _engine(model).generate([prompt], ["a"], sampled)[0].token_ids
    crowd = _engine(model).generate([*_prompts(5, seed=2), prompt], ["b", None, "a", "b", None, "a"],
                                    [SamplingParams(max_tokens=6, temperature=1.0)] * 5 + [sampled])[-1].token_ids
    assert crowd == alone
    unseeded = SamplingParams(max_tokens=10, temperature=0.9, ignore_eos=True)
    assert len({tuple(_engine(model).generate([prompt], ["a"], unseeded)[0].token_ids) for _ in range(3)}) > 1


def test_max_loras_never_starves_a_rare_adapter(setup):
    _, model, _ = setup
    engine = _engine(model, max_loras=1, max_num_seqs=8)
    stream = [engine.add_request(p, "a", GREEDY) for p in _prompts(3, seed=1)]
    rare = engine.add_request(_prompts(1, seed=4)[0], "b", GREEDY)
    for step in range(200):
        stream.append(engine.add_request(_prompts(1, seed=100 + step)[0], "a", GREEDY))  # A keeps coming
        engine.step()
        if rare.seq.finished:
            break
    assert rare.seq.finished and rare.result().finish_reason == "length"
    assert any(not h.seq.finished for h in stream)  # it finished while A was still being served


def test_lru_evicts_and_answers_stay_right(setup):
    base, model, paths = setup
    engine = _engine(model, max_cpu_loras=2)
    for name in "cdef":
        engine.adapters.register(name, paths[name])
    prompt = _prompts(1, seed=11)[0]
    for name in "cdefc":
        out = engine.generate([prompt], [name], GREEDY)[0]
        assert out.token_ids == _alone(base, model, paths, prompt, name), name
    stats = engine.stats()
    assert stats["adapter_evictions"] >= 2 and stats["adapter_loads"] == 5  # c was evicted, then reloaded
    resident = [n for n in engine.model.peft_config if "@" in n]
    assert len(resident) <= 2


def test_a_failing_load_fails_only_its_requests(setup, tmp_path):
    _, model, _ = setup
    engine = _engine(model)
    (tmp_path / "adapter_config.json").write_text("{not json")
    engine.adapters.register("broken", tmp_path)
    good = engine.add_request(_prompts(1)[0], "a", GREEDY)
    bad = engine.add_request(_prompts(1)[0], "broken", GREEDY)
    assert good.result().finish_reason == "length"
    out = bad.result()
    assert out.finish_reason == "error" and "broken" in out.error and "adapter_config.json" in out.error


def test_abort_frees_blocks_and_too_long_requests_are_refused(setup):
    _, model, _ = setup
    engine = _engine(model)
    handle = engine.add_request(_prompts(1)[0], "a", SamplingParams(max_tokens=30, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.cache.used_blocks > 0
    engine.abort(handle)
    assert engine.cache.used_blocks == 0 and handle.result().finish_reason == "abort"
    with pytest.raises(RequestError, match="maximum context length is 64 tokens"):
        engine.add_request(list(range(1, 60)), None, SamplingParams(max_tokens=10))
    with pytest.raises(lorakit.errors.AdapterNameError, match="Unknown adapter 'nope'"):
        engine.add_request([1, 2], "nope")
    assert engine.stats()["waiting"] == 0


def test_streaming_sync_and_async_in_a_background_loop(setup):
    base, model, paths = setup
    engine = _engine(model)
    engine.start()
    try:
        prompt = _prompts(1, seed=12)[0]
        streamed = [token for token, _ in engine.add_request(prompt, "b", GREEDY)]

        async def consume():
            return [token async for token, _ in engine.add_request(prompt, "b", GREEDY)]

        assert streamed == asyncio.run(consume()) == _alone(base, model, paths, prompt, "b")
    finally:
        engine.stop()


def test_the_model_still_generates_normally_between_engine_steps(setup):
    base, model, paths = setup
    engine = _engine(model)
    prompt = _prompts(1, seed=13)[0]
    engine.generate([prompt], ["a"], GREEDY)
    ids = torch.tensor([prompt])
    engine.model.set_adapter("a")
    with torch.no_grad():
        out = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                    do_sample=False, pad_token_id=0, eos_token_id=None)
    assert out[0, len(prompt):].tolist() == _alone(base, model, paths, prompt, "a")


def test_text_chat_messages_and_stops_with_a_tokenizer(tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from chat_model import build_chat_model

    directory = build_chat_model(tmp_path / "chat")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    base = LlamaForCausalLM.from_pretrained(directory).eval()
    model = lorakit.get_peft_model(base, _config(4, 3), adapter_name="a")
    engine = Engine(model, tokenizer, max_model_len=128, kv_cache_memory=1 << 22)
    free = engine.generate(["What is the capital of Veloria?"], ["a"], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert free.text == tokenizer.decode(free.token_ids, skip_special_tokens=True) and len(free.token_ids) == 12
    stop = free.text[len(free.text) // 2:][:3]
    cut = engine.generate(["What is the capital of Veloria?"], ["a"],
                          SamplingParams(max_tokens=12, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and free.text.startswith(cut.text)
    streamed = engine.add_request("What is the capital of Veloria?", "a",
                                  SamplingParams(max_tokens=12, ignore_eos=True, stop=[stop]))
    assert "".join(delta for _, delta in streamed) == cut.text  # no part of the stop string was streamed
    by_id = engine.generate(["What is the capital of Veloria?"], ["a"],
                            SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=[free.token_ids[2]]))[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[2]) + 1]
    messages = [{"role": "user", "content": "Who built the zephyr engine?"}]
    chat = engine.generate([messages], ["a"], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert chat.prompt_ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=False)


def test_a_failing_step_is_run_again_request_by_request_and_the_loop_goes_on(setup):
    base, model, paths = setup
    engine = _engine(model)
    forward, calls = engine.runner.forward, []

    def broken_once(step):
        calls.append(len(step.plan))
        if len(calls) == 1:
            raise RuntimeError("injected")
        return forward(step)

    engine.runner.forward = broken_once
    prompts = _prompts(2, seed=20)
    handles = [engine.add_request(p, "a", GREEDY) for p in prompts]
    assert engine.step() == 2 and calls == [2, 1, 1]  # the step raised; its chunks ran again one by one
    for handle, prompt in zip(handles, prompts, strict=True):  # and nobody failed with it
        assert handle.result().token_ids == _alone(base, model, paths, prompt, "a")
    engine.runner.forward = forward
    assert engine.add_request(_prompts(1, seed=21)[0], "b", GREEDY).result().finish_reason == "length"
    assert engine.stats()["kv_blocks_used"] == 0


# bf16: the packed step and `generate` multiply in other shapes, so logits differ by bf16 rounding (measured
# up to ~0.03 here) and a near-tie can flip a greedy token. The check is then per step under teacher forcing:
# every token the engine chose scores within BF16_TIE of the best logit of the same prefix run alone.
BF16_TIE = 0.1


@pytest.mark.parametrize("kind", ["bf16", "nf4"])
def test_a_bf16_or_4_bit_base_answers_as_generate_does(kind, tmp_path):
    """Mixed precision is a normal path: a bf16 base (bf16 KV cache) and an NF4 base (bitsandbytes' CPU
    kernel, fp32 compute) give each request what that request alone gets: the same greedy tokens (NF4),
    or at every step a token tied with the best within bf16 rounding (bf16)."""
    from conftest import small_llama
    from lorakit.base_models import load_base

    if kind == "nf4":
        small_llama().save_pretrained(tmp_path)
        base = load_base(str(tmp_path), quantize="nf4")
    else:
        base = small_llama().to(torch.bfloat16)
    model = lorakit.get_peft_model(base, _config(4, 1), adapter_name="a").eval()
    model.add_adapter("b", _config(8, 2))
    engine = Engine(model, max_model_len=64, kv_cache_memory=1 << 22, block_size=4)
    assert engine.cache.k[0].dtype == (torch.bfloat16 if kind == "bf16" else torch.float32)
    prompts, adapters = _prompts(4, seed=30), ["a", None, "b", "a"]
    outputs = engine.generate(prompts, adapters, GREEDY)
    for prompt, adapter, out in zip(prompts, adapters, outputs, strict=True):
        ids = torch.tensor([prompt + out.token_ids])
        with torch.no_grad():
            if adapter is None:
                with model.disable_adapter():
                    logits = model(input_ids=ids).logits[0].float()
            else:
                model.set_adapter(adapter)
                logits = model(input_ids=ids).logits[0].float()
        steps = logits[len(prompt) - 1:-1]  # the logits each chosen token was picked from
        chosen = steps.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
        if kind == "nf4":
            assert out.token_ids == steps.argmax(-1).tolist(), adapter
        else:
            assert (steps.max(-1).values - chosen).max() <= BF16_TIE, adapter


def test_the_callers_attention_choice_is_untouched_between_steps(setup):
    """The paged attention is named on the config for an engine step's forward only: before, between and after
    steps the config says what its owner chose, and the model answers as it did (eager here)."""
    base, model, paths = setup
    mine = copy.deepcopy(model)
    mine.get_base_model().set_attn_implementation("eager")
    engine = Engine(mine, max_model_len=64, kv_cache_memory=1 << 22, block_size=4)
    assert mine.get_base_model().config._attn_implementation == "eager"
    prompt = _prompts(1, seed=30)[0]
    handle = engine.add_request(prompt, "a", GREEDY)
    engine.step()
    assert mine.get_base_model().config._attn_implementation == "eager"  # between two steps
    assert handle.result().token_ids == _alone(base, model, paths, prompt, "a")
    assert mine.get_base_model().config._attn_implementation == "eager"
