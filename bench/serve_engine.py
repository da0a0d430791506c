"""The continuous-batching engine vs PEFT on SmolLM2-135M: many adapters, one base.

A fixed set of requests (prompts 32–128 tokens, 32 new tokens each, greedy, all arriving at
once), adapters r8/16/32 all-linear, popularity uniform over 1, 8 and 64 adapters. Reported:
output tok/s, req/s, TTFT and inter-token latency p50/p99 (ours), and the peers on the same
requests:
  (a) PEFT switching adapters between batches: requests grouped by adapter, `set_adapter`,
      one batched `generate` per group (S-LoRA's PEFT baseline);
  (d) plain batched `generate` of the base model alone, all requests in one batch: the
      ceiling on CPU.
Scaled down from the issue's spec (fewer requests, 32 new tokens, no Poisson stream, no zipf,
no 256 adapters) to fit a few minutes on 2 cores; see docs/benchmarks.md.

    python bench/serve_engine.py
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import peft
import torch

import lorakit
from harness import emit
from lorakit.base_models import load_model
from lorakit.serve import Engine, SamplingParams

RANKS = (8, 16, 32)


def config(i: int, side) -> object:
    r = RANKS[i % 3]
    return side.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)


def requests(count: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(10, vocab, (int(n),), generator=gen).tolist()
            for n in torch.randint(32, 129, (count,), generator=gen)]


def engine_for(base, adapters: int) -> Engine:
    model = lorakit.get_peft_model(copy.deepcopy(base), config(0, lorakit), adapter_name="a0")
    for i in range(1, adapters):
        model.add_adapter(f"a{i}", config(i, lorakit))
    return Engine(model, max_model_len=256, max_num_seqs=16, max_num_batched_tokens=512,
                  kv_cache_memory=512 << 20, max_loras=adapters)  # every adapter usable in one step


def ours(engine: Engine, prompts, adapters: int, new: int) -> dict:
    names = [f"a{i % adapters}" for i in range(len(prompts))]
    engine.generate(prompts[:2], names[:2], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    outputs = engine.generate(prompts, names, SamplingParams(max_tokens=new, ignore_eos=True))
    elapsed = time.perf_counter() - start
    ttft = sorted(o.ttft_s for o in outputs)
    itl = sorted(x for o in outputs for x in o.itl_s)
    return {"s": round(elapsed, 2), "tok_s": round(len(prompts) * new / elapsed, 1),
            "req_s": round(len(prompts) / elapsed, 2),
            "ttft_p50": round(statistics.median(ttft), 3), "ttft_p99": round(ttft[int(0.99 * (len(ttft) - 1))], 3),
            "itl_p50": round(statistics.median(itl), 4), "itl_p99": round(itl[int(0.99 * (len(itl) - 1))], 4)}


def _batched_generate(model, prompts, new: int) -> None:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=0)


def peft_switching(base, prompts, adapters: int, new: int) -> dict:
    model = peft.get_peft_model(copy.deepcopy(base), config(0, peft), adapter_name="a0")
    for i in range(1, adapters):
        model.add_adapter(f"a{i}", config(i, peft))
    model.eval()
    groups: dict[str, list[list[int]]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(f"a{i % adapters}", []).append(prompt)
    start = time.perf_counter()
    for name, group in groups.items():
        model.set_adapter(name)
        _batched_generate(model, group, new)
    elapsed = time.perf_counter() - start
    return {"s": round(elapsed, 2), "tok_s": round(len(prompts) * new / elapsed, 1)}


def base_ceiling(base, prompts, new: int) -> dict:
    start = time.perf_counter()
    _batched_generate(base, prompts, new)
    elapsed = time.perf_counter() - start
    return {"s": round(elapsed, 2), "tok_s": round(len(prompts) * new / elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    base, _ = load_model()
    base.eval()
    prompts = requests(args.requests, base.config.vocab_size)
    engines = {count: engine_for(base, count) for count in (1, 8, 64)}
    runs: dict[str, list[dict]] = {}
    for _ in range(args.reps):  # interleaved, so drift on a shared machine hits every side alike
        runs.setdefault("base_generate_all_at_once", []).append(base_ceiling(base, prompts, args.new_tokens))
        for count, engine in engines.items():
            runs.setdefault(f"lorakit_{count}_adapters", []).append(ours(engine, prompts, count, args.new_tokens))
    results = {name: sorted(values, key=lambda v: v["s"])[len(values) // 2] for name, values in runs.items()}
    for count in (8, 64):  # ~5x slower than ours: once
        results[f"peft_switching_{count}_adapters"] = peft_switching(base, prompts, count, args.new_tokens)
    tok = {k: v["tok_s"] for k, v in results.items()}
    ratios = {
        "ours_64_vs_ours_1": tok["lorakit_64_adapters"] / tok["lorakit_1_adapters"],
        "ours_8_vs_ours_1": tok["lorakit_8_adapters"] / tok["lorakit_1_adapters"],
        "ours_vs_peft_switching_64": tok["lorakit_64_adapters"] / tok["peft_switching_64_adapters"],
        "ours_vs_peft_switching_8": tok["lorakit_8_adapters"] / tok["peft_switching_8_adapters"],
        "ours_1_vs_base_generate": tok["lorakit_1_adapters"] / tok["base_generate_all_at_once"],
    }
    setup = {"model": "SmolLM2-135M-Instruct", "requests": args.requests, "prompt_tokens": "32-128",
             "new_tokens": args.new_tokens, "arrival": "all at once", "ranks": list(RANKS), "targets": "all-linear",
             "popularity": "uniform (round robin)", "dtype": "fp32", "reps": f"median of {args.reps} (ours, base)"}
    emit("serve_engine", "python bench/serve_engine.py", setup, results, ratios)


if __name__ == "__main__":
    main()
