"""The continuous-batching engine vs PEFT and transformers on SmolLM2-135M: many adapters, one base.

One fixed request set (prompts 32–256 tokens, `--new-tokens` output tokens each, greedy, EOS
ignored so every side does the same work), adapters r8/16/32 all-linear. Ours:
  - all requests at once over 1, 8, 64 and 256 adapters, popularity uniform (round robin);
  - zipf popularity (s=1.1) over 64 and 256 adapters;
  - a Poisson arrival stream at ~80% of our 1-adapter capacity, over 1 and 64 adapters;
  - varied output lengths (32–128) over 64 adapters, against the static batch that must run
    every row to the longest (only the requested tokens count as output).
Peers on the same requests:
  (a) PEFT switching adapters between batches: grouped by adapter, `set_adapter`, one batched
      `generate` per group (S-LoRA's PEFT baseline);
  (b) PEFT's mixed batch: one static `generate(adapter_names=…)` over all requests;
  (c) transformers' continuous batching (`generate_batch`, paged|sdpa) on the base, no adapter;
  (d) plain batched `generate` of the base alone, all requests in one batch: the CPU ceiling.
Reported: output tok/s, req/s, TTFT and inter-token latency p50/p99 (ours), seconds (peers).
Ours and (d) at 1 and 64 adapters: median of `--reps` interleaved runs; the rest once.

    python bench/serve_engine.py
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
import warnings

import peft
import torch

import lorakit
from harness import emit, progress
from lorakit.base_models import load_model
from lorakit.serve import Engine, SamplingParams

RANKS = (8, 16, 32)


def config(i: int, side) -> object:
    r = RANKS[i % 3]
    return side.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)


def requests(count: int, vocab: int, low: int = 32, high: int = 256) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(10, vocab, (int(n),), generator=gen).tolist()
            for n in torch.randint(low, high + 1, (count,), generator=gen)]


def popularity(count: int, adapters: int, kind: str) -> list[str]:
    """Each request's adapter: round robin (uniform), or drawn from zipf(s=1.1) over the adapters."""
    if kind == "uniform":
        return [f"a{i % adapters}" for i in range(count)]
    rng = random.Random(0)
    weights = [1 / (k + 1) ** 1.1 for k in range(adapters)]
    return [f"a{k}" for k in rng.choices(range(adapters), weights, k=count)]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))] if values else 0.0


def latency_summary(outputs, elapsed: float, tokens: int) -> dict:
    """Throughput and TTFT / inter-token latency percentiles of finished requests."""
    ttft = [o.ttft_s for o in outputs if o.ttft_s is not None]
    itl = [x for o in outputs for x in o.itl_s]
    return {"s": round(elapsed, 2), "tok_s": round(tokens / elapsed, 1), "req_s": round(len(outputs) / elapsed, 3),
            "ttft_p50": round(statistics.median(ttft), 3), "ttft_p99": round(percentile(ttft, 0.99), 3),
            "itl_p50": round(statistics.median(itl), 4), "itl_p99": round(percentile(itl, 0.99), 4)}


def engine_for(base, adapters: int) -> Engine:
    model = lorakit.get_peft_model(copy.deepcopy(base), config(0, lorakit), adapter_name="a0")
    for i in range(1, adapters):
        model.add_adapter(f"a{i}", config(i, lorakit))
    return Engine(model, max_model_len=512, max_num_seqs=16, max_num_batched_tokens=512,
                  kv_cache_memory=512 << 20, max_loras=min(adapters, 16))  # every adapter of a step usable


def ours(engine: Engine, prompts, names, new: list[int], rate: float | None = None) -> dict:
    progress(f"lorakit: {len(set(names))} adapters used, {'all at once' if rate is None else f'poisson {rate:.2f}/s'}")
    engine.generate(prompts[:2], names[:2], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in new]
    start = time.perf_counter()
    if rate is None:  # all at once
        outputs = engine.generate(prompts, names, params)
    else:  # a Poisson stream, the engine's loop in the background
        rng, at, handles = random.Random(1), 0.0, []
        engine.start()
        for prompt, name, p in zip(prompts, names, params, strict=True):
            time.sleep(max(0.0, start + at - time.perf_counter()))
            handles.append(engine.add_request(prompt, name, p))
            at += rng.expovariate(rate)
        outputs = [h.result() for h in handles]
        engine.stop()
    return latency_summary(outputs, time.perf_counter() - start, sum(new))


def _batched_generate(model, prompts, new: int, **kwargs) -> None:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=0, **kwargs)


def timed(fn, tokens: int) -> dict:
    progress(f"peer: {getattr(fn, '__name__', 'run')}")
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    return {"s": round(elapsed, 2), "tok_s": round(tokens / elapsed, 1)}


def peft_model(base, names: list[str]):
    """PEFT with the adapters these requests use (loading all 256 would not change its per-batch speed)."""
    used = sorted(set(names), key=lambda n: int(n[1:]))
    model = peft.get_peft_model(copy.deepcopy(base), config(int(used[0][1:]), peft), adapter_name=used[0])
    for name in used[1:]:
        model.add_adapter(name, config(int(name[1:]), peft))
    return model.eval()


def peft_switching(model, prompts, names, new: int) -> dict:
    groups: dict[str, list[list[int]]] = {}
    for prompt, name in zip(prompts, names, strict=True):
        groups.setdefault(name, []).append(prompt)

    def run():
        for name, group in groups.items():
            model.set_adapter(name)
            _batched_generate(model, group, new)

    return timed(run, len(prompts) * new)


def generate_batch(base, prompts, new: int) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(base.name_or_path, attn_implementation="paged|sdpa").eval()
    gen_config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)
    model.generate_batch(inputs=prompts[:2], generation_config=gen_config)  # warm-up
    return timed(lambda: model.generate_batch(inputs=prompts, generation_config=gen_config), len(prompts) * new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    base, _ = load_model()
    base.eval()
    n, new = args.requests, args.new_tokens
    prompts = requests(n, base.config.vocab_size)
    fixed = [new] * n
    engines = {count: engine_for(base, count) for count in (1, 8, 64, 256)}
    uniform = {count: popularity(n, count, "uniform") for count in engines}
    results: dict[str, dict] = {}
    runs: dict[str, list[dict]] = {}
    for _ in range(args.reps):  # interleaved, so drift on a shared machine hits every side alike
        runs.setdefault("base_generate_all_at_once", []).append(timed(lambda: _batched_generate(base, prompts, new),
                                                                      n * new))
        for count in (1, 64):
            runs.setdefault(f"lorakit_{count}_adapters", []).append(ours(engines[count], prompts, uniform[count], fixed))
    results |= {name: sorted(values, key=lambda v: v["s"])[len(values) // 2] for name, values in runs.items()}
    for count in (8, 256):
        results[f"lorakit_{count}_adapters"] = ours(engines[count], prompts, uniform[count], fixed)
    for count in (64, 256):
        results[f"lorakit_{count}_adapters_zipf"] = ours(engines[count], prompts, popularity(n, count, "zipf"), fixed)
    rate = 0.8 * results["lorakit_1_adapters"]["req_s"]
    for count in (1, 64):
        results[f"lorakit_{count}_adapters_poisson"] = ours(engines[count], prompts, uniform[count], fixed, rate)
    varied = [int(t) for t in torch.randint(32, 129, (n,), generator=torch.Generator().manual_seed(2))]
    results["lorakit_64_adapters_varied_out"] = ours(engines[64], prompts, uniform[64], varied)
    ceiling = timed(lambda: _batched_generate(base, prompts, max(varied)), sum(varied))  # rows run to the longest
    results["base_generate_varied_out"] = ceiling
    for engine in engines.values():
        engine.close()
    del engines
    for count in (8, 64):
        model = peft_model(base, uniform[count])
        results[f"peft_switching_{count}_adapters"] = peft_switching(model, prompts, uniform[count], new)
        if count == 64:
            results["peft_mixed_batch_64_adapters"] = timed(
                lambda model=model: _batched_generate(model, prompts, new, adapter_names=uniform[64]), n * new)
        del model
    results["transformers_generate_batch_base"] = generate_batch(base, prompts, new)
    tok = {k: v["tok_s"] for k, v in results.items()}
    ratios = {
        "ours_64_vs_ours_1": tok["lorakit_64_adapters"] / tok["lorakit_1_adapters"],
        "ours_256_vs_ours_1": tok["lorakit_256_adapters"] / tok["lorakit_1_adapters"],
        "ours_64_zipf_vs_ours_1": tok["lorakit_64_adapters_zipf"] / tok["lorakit_1_adapters"],
        "ours_vs_peft_switching_64": tok["lorakit_64_adapters"] / tok["peft_switching_64_adapters"],
        "ours_vs_peft_switching_8": tok["lorakit_8_adapters"] / tok["peft_switching_8_adapters"],
        "ours_vs_peft_mixed_batch_64": tok["lorakit_64_adapters"] / tok["peft_mixed_batch_64_adapters"],
        "ours_1_vs_base_generate": tok["lorakit_1_adapters"] / tok["base_generate_all_at_once"],
        "ours_1_vs_generate_batch": tok["lorakit_1_adapters"] / tok["transformers_generate_batch_base"],
        "ours_64_varied_vs_base_generate_varied": tok["lorakit_64_adapters_varied_out"] / tok["base_generate_varied_out"],
    }
    setup = {"model": "SmolLM2-135M-Instruct", "requests": n, "prompt_tokens": "32-256", "new_tokens": new,
             "varied_out": "32-128", "ranks": list(RANKS), "targets": "all-linear", "poisson_req_s": round(rate, 3),
             "dtype": "fp32", "reps": f"median of {args.reps} (ours at 1 and 64 adapters, base generate)"}
    emit("serve_engine", "python bench/serve_engine.py", setup, results, ratios)


if __name__ == "__main__":
    main()
