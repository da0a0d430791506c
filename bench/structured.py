"""Constrained vs unconstrained decoding in the engine, SmolLM2-135M, 16 concurrent requests, 4 adapters.

(a) throughput: the same 16 requests (64 new tokens each) with no constraint, and with a JSON Schema each
    (4 different schemas; the output is held to its schema until the schema completes, then the request
    stops — so the time per generated token is the fair measure, not the time per request);
(b) the mask cost alone: one step's masks for 16 sequences under 16 different schemas (compute the
    allowed tokens and apply them), against a step's decode time.

    python bench/structured.py
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings

import torch

import lorakit
from harness import emit, progress
from lorakit.base_models import load_model
from lorakit.serve import Engine, SamplingParams
from lorakit.serve.structured import StructuredOutput

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 20}}},
     "required": ["items"]},
    {"type": "object", "properties": {"city": {"type": "string"}, "sunny": {"type": "boolean"},
                                      "temp": {"type": "number"}}, "required": ["city", "sunny", "temp"]},
    {"type": "object", "properties": {"label": {"enum": ["positive", "negative", "neutral"]},
                                      "reason": {"type": "string", "maxLength": 80}}, "required": ["label", "reason"]},
]


def engine_with_adapters(base, tokenizer) -> Engine:
    model = lorakit.PeftModel.for_serving(copy.deepcopy(base), lorakit.LoraConfig(r=1, target_modules="all-linear"))
    for i in range(4):
        model.add_adapter(f"a{i}", lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                       init_lora_weights=False))
    return Engine(model, tokenizer, max_model_len=512, max_num_seqs=16, kv_cache_memory=256 << 20, max_loras=4)


def run(engine: Engine, prompts, constrained: bool) -> dict:
    params = [SamplingParams(max_tokens=64, ignore_eos=not constrained, temperature=0.0,
                             structured=StructuredOutput(kind="json_schema", spec=json.dumps(SCHEMAS[i % 4]))
                             if constrained else None) for i in range(len(prompts))]
    names = [f"a{i % 4}" for i in range(len(prompts))]
    engine.generate(prompts[:2], names[:2], params[:2])  # warm-up (and the grammars' first compile)
    start = time.perf_counter()
    outputs = engine.generate(prompts, names, params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outputs)
    return {"s": round(elapsed, 2), "tokens": tokens, "ms_per_token": round(1000 * elapsed / tokens, 2),
            "completed": sum(o.finish_reason == "stop" for o in outputs) if constrained else None}


def mask_cost(engine: Engine, reps: int) -> dict:
    """16 sequences, 16 schemas (the 4 above with their property names varied): one step's masks."""
    constraints = []
    for i in range(16):
        schema = copy.deepcopy(SCHEMAS[i % 4])
        schema["properties"] = {f"{k}{i}": v for k, v in schema["properties"].items()}
        schema["required"] = [f"{k}{i}" for k in schema["required"]]
        constraints.append(engine.grammars.constraint(StructuredOutput(kind="json_schema", spec=json.dumps(schema))))
    logits = torch.randn(16, engine.vocab_size)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for row, constraint in enumerate(constraints):
            logits[row].masked_fill_(~constraint.allowed(logits.device), float("-inf"))
        times.append(time.perf_counter() - start)
    return {"step_ms": round(1000 * statistics.median(times), 3), "per_row_ms": round(1000 * statistics.median(times) / 16, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    base, tokenizer = load_model()
    engine = engine_with_adapters(base.eval(), tokenizer)
    prompts = [tokenizer(f"Describe item {i} as JSON:", add_special_tokens=False)["input_ids"]
               for i in range(args.requests)]
    runs = {"free": [], "constrained": []}
    for _ in range(args.reps):  # interleaved
        for kind in runs:
            progress(f"{kind}")
            runs[kind].append(run(engine, prompts, kind == "constrained"))
    results = {kind: sorted(values, key=lambda v: v["ms_per_token"])[len(values) // 2] for kind, values in runs.items()}
    results["masks_16_schemas"] = mask_cost(engine, reps=50)
    step_ms = results["free"]["ms_per_token"] * 16  # a decode step of 16 sequences, unconstrained
    ratios = {"constrained_vs_free_per_token": results["constrained"]["ms_per_token"] / results["free"]["ms_per_token"],
              "mask_share_of_a_16_row_step": results["masks_16_schemas"]["step_ms"] / step_ms}
    engine.close()
    emit("structured", "python bench/structured.py", vars(args), results, ratios)


if __name__ == "__main__":
    main()
