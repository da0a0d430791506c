"""Training-step speed and peak memory: lorakit vs PEFT, SmolLM2-135M, r16 all-linear, fp32, eager.

One step = forward, loss, backward, AdamW step. Also times the "floor" a LoRA step can
approach with frozen base weights: two no-grad forwards of the base model (the backward
to the inputs costs about one forward, and no weight gradients are needed).

    python bench/train_step.py [--batch 4 --seq 128] [--quantize nf4] [--compile] [--bf16]

--bf16: both sides train under bf16 autocast (fp32 weights and adapters), as HF Trainer's
bf16=True runs them; the floor's forwards run under it too.

--compile: lorakit's decoder layers go through torch.compile (lorakit.compile.compile_blocks);
the first step, which compiles, is timed apart as compile_s; PEFT stays eager.

With --quantize (QLoRA): each side loads the NF4 base and runs its own
prepare_model_for_kbit_training (PEFT's or ours: gradient checkpointing on, as the QLoRA
recipe has it); the floor is then two no-grad forwards of the quantized base.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from harness import emit, peak_rss_mb, reset_peak_rss, side_in_subprocess, time_interleaved

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def load_base(side: str, quantize: str | None = None):
    """Ours through lorakit.load_base; the peer as a PEFT user loads it: plain transformers."""
    from lorakit.base_models import load_base as load

    if side == "lorakit" or quantize is None:
        return load(quantize=quantize)
    from transformers import AutoModelForCausalLM

    from lorakit.base_models import resolve_model_path
    from lorakit.quant import bnb_config

    return AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2-135m-instruct"),
                                                quantization_config=bnb_config(quantize), device_map="cpu")


def make_batch(batch: int, seq: int, vocab: int) -> dict:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def train_step_fn(side: str, base, batch: dict, quantized: bool = False, compiled: bool = False, bf16: bool = False,
                  **lora_extra):
    """One training step's closure; `lora_extra` adds LoraConfig fields (e.g. use_dora=True) on both sides."""
    lora = {**LORA, **lora_extra}
    if side == "lorakit":
        import lorakit
        from lorakit.quant import prepare_model_for_kbit_training

        if quantized:
            base = prepare_model_for_kbit_training(base)
        model = lorakit.get_peft_model(base, lorakit.LoraConfig(**lora))
    else:
        import peft

        if quantized:
            base = peft.prepare_model_for_kbit_training(base)
        model = peft.get_peft_model(base, peft.LoraConfig(**lora))
    model.train()
    if compiled and side == "lorakit":
        from lorakit.compile import compile_blocks

        compile_blocks(model.get_base_model())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def floor_fn(base, batch: dict, bf16: bool = False):
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def two_forwards():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            base(**inputs)
            base(**inputs)

    return two_forwards


def run_side(side: str, batch_size: int, seq: int, quantize: str | None, compiled: bool, bf16: bool) -> None:
    """Child process: one side alone, so its peak RSS (loading included) is its own."""
    reset_peak_rss()
    base = load_base(side, quantize)
    step = train_step_fn(side, base, make_batch(batch_size, seq, base.config.vocab_size), quantize is not None, compiled,
                         bf16)
    seconds = time_interleaved({side: step}, reps=3, warmup=1)[side]
    print(f'{{"side": "{side}", "step_s": {seconds}, "peak_rss_mb": {peak_rss_mb()}}}')


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quantize", choices=["nf4", "fp4", "int8"], help="QLoRA: quantized base")
    parser.add_argument("--compile", action="store_true", help="torch.compile lorakit's decoder layers")
    parser.add_argument("--bf16", action="store_true", help="both sides under bf16 autocast")
    parser.add_argument("--side", choices=["lorakit", "peft"], help="internal: run one side alone")
    args = parser.parse_args(argv)
    if args.side:
        return run_side(args.side, args.batch, args.seq, args.quantize, args.compile, args.bf16)

    quantized = args.quantize is not None
    # Each side gets its own freshly loaded base (prepare_model_for_kbit_training changes it in place).
    bases = {side: load_base(side, args.quantize) for side in ("lorakit", "peft", "floor")}
    batch = make_batch(args.batch, args.seq, bases["floor"].config.vocab_size)
    candidates = {
        "lorakit": train_step_fn("lorakit", bases["lorakit"], batch, quantized, args.compile, args.bf16),
        "peft": train_step_fn("peft", bases["peft"], batch, quantized, bf16=args.bf16),
        "floor": floor_fn(bases["floor"].eval(), batch, args.bf16),
    }
    started = time.perf_counter()
    candidates["lorakit"]()  # the first step (compiles, with --compile)
    first_step_s = time.perf_counter() - started
    times = time_interleaved(candidates, reps=args.reps, warmup=1)
    extra = (["--quantize", args.quantize] if quantized else []) + (["--compile"] if args.compile else []) \
        + (["--bf16"] if args.bf16 else [])
    memory = {side: side_in_subprocess(Path(__file__), side, "--batch", str(args.batch), "--seq", str(args.seq), *extra)
              for side in ("lorakit", "peft")}
    tokens = args.batch * args.seq
    results = {
        "step_s": {k: round(v, 4) for k, v in times.items()},
        "tokens_per_s": {k: round(tokens / times[k], 1) for k in ("lorakit", "peft")},
        "peak_rss_mb": {k: round(memory[k]["peak_rss_mb"], 1) for k in memory},
        "lorakit_first_step_s": round(first_step_s, 2),
    }
    ratios = {
        "speedup_vs_peft": times["peft"] / times["lorakit"],
        "rss_vs_peft": memory["lorakit"]["peak_rss_mb"] / memory["peft"]["peak_rss_mb"],
        "lorakit_vs_floor": times["lorakit"] / times["floor"],
        "peft_vs_floor": times["peft"] / times["floor"],
    }
    setup = {"model": "SmolLM2-135M-Instruct", **LORA, "batch": args.batch, "seq": args.seq,
             "dtype": "bf16 autocast" if args.bf16 else "fp32",
             "base": args.quantize or "fp32", "gradient_checkpointing": quantized,
             "mode": "lorakit compiled, peft eager" if args.compile else "eager", "reps": args.reps}
    name = f"{'qlora' if quantized else 'train'}_step_{args.batch}x{args.seq}" + ("_compiled" if args.compile else "") \
        + ("_bf16" if args.bf16 else "")
    command = f"python bench/train_step.py --batch {args.batch} --seq {args.seq}" + " ".join([""] + extra)
    emit(name, command, setup, results, ratios)


if __name__ == "__main__":
    main()
