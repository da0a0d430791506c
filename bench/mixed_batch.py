"""Many adapters in one batch: lorakit vs PEFT on SmolLM2-135M, all-linear adapters of rank 8/16/32.

(a) decode-like step: 32 rows x 1 new token on a 16-token KV cache, 32 different adapters;
(b) prefill: 16 rows x 64 tokens, 8 adapters (2 rows each).
For each: base (adapters off), single adapter for all rows, mixed (one adapter per row, a
*fresh* `adapter_names` routing every call, as a continuous-batching engine builds one per
step), and PEFT's mixed step (`adapter_names=`). The KV cache is copied before every call
(untimed), since a forward appends to it.

Also: the memory of a bank of 200 adapters (ranks 8/16/32, all-linear) against the bytes of
their own weights.

    python bench/mixed_batch.py
"""

from __future__ import annotations

import argparse
import copy
import warnings

import peft
import torch

import lorakit
from harness import emit, time_interleaved
from lorakit.base_models import load_model
from lorakit.methods import AdapterLayer

RANKS = (8, 16, 32)


def adapters(count: int) -> list[tuple[str, dict]]:
    return [(f"a{i}", dict(r=RANKS[i % 3], lora_alpha=2 * RANKS[i % 3], target_modules="all-linear",
                           init_lora_weights=False)) for i in range(count)]


def wrap(base, count: int, side: str):
    specs = adapters(count)
    make = (lorakit.get_peft_model, lorakit.LoraConfig) if side == "lorakit" else (peft.get_peft_model, peft.LoraConfig)
    model = make[0](copy.deepcopy(base), make[1](**specs[0][1]), adapter_name=specs[0][0])
    for name, config in specs[1:]:
        model.add_adapter(name, make[1](**config))
    return model.eval()


def scenario(base, ours, theirs, rows: int, prompt: int, new: int, count: int, reps: int) -> dict:
    """Times of one step with `new` tokens per row after a `prompt`-token cache (none if new == prompt)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (rows, prompt + (new if new != prompt else 0)), generator=gen)
    names = [f"a{i % count}" for i in range(rows)]
    decode = new != prompt
    cache = {}
    if decode:
        with torch.no_grad():
            cache["kv"] = base(input_ids=ids[:, :prompt], use_cache=True).past_key_values
    step_ids = ids[:, prompt:] if decode else ids
    mask = torch.ones_like(ids)

    def call(model, **kwargs):
        def run():
            extra = {"past_key_values": cache["copy"]} if decode else {}
            with torch.no_grad():
                model(input_ids=step_ids, attention_mask=mask, use_cache=decode, **extra, **kwargs)
        return run

    def disabled():
        with ours.disable_adapter():
            call(ours)()

    candidates = {
        "base": disabled,
        "lorakit_single": call(ours),
        "lorakit_mixed": call(ours, adapter_names=names),  # a new routing every call
        "peft_mixed": call(theirs, adapter_names=names),
    }
    fresh_cache = (lambda: cache.update(copy=copy.deepcopy(cache["kv"]))) if decode else (lambda: None)
    return time_interleaved(candidates, reps=reps, warmup=1, before=dict.fromkeys(candidates, fresh_cache))


def bank_memory(base, count: int = 200) -> dict:
    """Bytes of a serving model's banks holding `count` adapters vs the bytes of their own A and B."""
    model = lorakit.PeftModel.for_serving(copy.deepcopy(base), lorakit.LoraConfig(r=1, target_modules="all-linear"))
    own = 0
    for name, config in adapters(count):
        model.add_adapter(name, lorakit.LoraConfig(**config))
        own += sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for m in model.modules() if isinstance(m, AdapterLayer) and name in m.r for a, b in [m.factors(name)])
    banks = sum(m.bank.bytes() for m in model.modules() if isinstance(m, AdapterLayer))
    return {"adapters": count, "own_mb": round(own / 2**20, 1), "bank_mb": round(banks / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    base, _ = load_model()
    ours, theirs = wrap(base, 32, "lorakit"), wrap(base, 32, "peft")
    ours.set_adapter("a0")
    theirs.set_adapter("a0")
    decode = scenario(base, ours, theirs, rows=32, prompt=16, new=1, count=32, reps=args.reps)
    prefill = scenario(base, ours, theirs, rows=16, prompt=64, new=64, count=8, reps=args.reps)
    del ours, theirs
    memory = bank_memory(base)
    results = {"decode_32x1_32_adapters_s": {k: round(v, 5) for k, v in decode.items()},
               "prefill_16x64_8_adapters_s": {k: round(v, 5) for k, v in prefill.items()},
               "bank_200_adapters": memory}
    ratios = {
        "decode_mixed_vs_single": decode["lorakit_mixed"] / decode["lorakit_single"],
        "decode_peft_mixed_vs_ours_mixed": decode["peft_mixed"] / decode["lorakit_mixed"],
        "decode_single_vs_base": decode["lorakit_single"] / decode["base"],
        "prefill_mixed_vs_single": prefill["lorakit_mixed"] / prefill["lorakit_single"],
        "prefill_peft_mixed_vs_ours_mixed": prefill["peft_mixed"] / prefill["lorakit_mixed"],
        "bank_slack": memory["bank_mb"] / memory["own_mb"] - 1,
    }
    setup = {"model": "SmolLM2-135M-Instruct", "targets": "all-linear", "ranks": list(RANKS), "dtype": "fp32",
             "decode": "32 rows x 1 token, 16-token KV cache, 32 adapters", "prefill": "16 rows x 64 tokens, 8 adapters",
             "reps": args.reps}
    emit("mixed_batch", "python bench/mixed_batch.py", setup, results, ratios)


if __name__ == "__main__":
    main()
