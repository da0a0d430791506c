"""Training-step speed and peak memory: lorakit vs PEFT, SmolLM2-135M, r16 all-linear, fp32, eager.

One step = forward, loss, backward, AdamW step. Also times the "floor" a LoRA step can
approach with frozen base weights: two no-grad forwards of the base model (the backward
to the inputs costs about one forward, and no weight gradients are needed).

    python bench/train_step.py [--batch 4 --seq 128]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from harness import emit, peak_rss_mb, side_in_subprocess, time_interleaved

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def load_base():
    from lorakit.models import load_model

    model, _ = load_model()
    return model


def make_batch(batch: int, seq: int, vocab: int) -> dict:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def train_step_fn(side: str, base, batch: dict):
    if side == "lorakit":
        import lorakit

        model = lorakit.get_peft_model(base, lorakit.LoraConfig(**LORA))
    else:
        import peft

        model = peft.get_peft_model(base, peft.LoraConfig(**LORA))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def floor_fn(base, batch: dict):
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def two_forwards():
        with torch.no_grad():
            base(**inputs)
            base(**inputs)

    return two_forwards


def run_side(side: str, batch_size: int, seq: int) -> None:
    """Child process: one side alone, so its peak RSS is its own."""
    base = load_base()
    step = train_step_fn(side, base, make_batch(batch_size, seq, base.config.vocab_size))
    seconds = time_interleaved({side: step}, reps=3, warmup=1)[side]
    print(f'{{"side": "{side}", "step_s": {seconds}, "peak_rss_mb": {peak_rss_mb()}}}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--side", choices=["lorakit", "peft"], help="internal: run one side alone")
    args = parser.parse_args()
    if args.side:
        return run_side(args.side, args.batch, args.seq)

    base = load_base()
    batch = make_batch(args.batch, args.seq, base.config.vocab_size)
    candidates = {
        "lorakit": train_step_fn("lorakit", copy.deepcopy(base), batch),
        "peft": train_step_fn("peft", copy.deepcopy(base), batch),
        "floor": floor_fn(base.eval(), batch),
    }
    times = time_interleaved(candidates, reps=args.reps, warmup=1)
    memory = {side: side_in_subprocess(Path(__file__), side, "--batch", str(args.batch), "--seq", str(args.seq))
              for side in ("lorakit", "peft")}
    tokens = args.batch * args.seq
    results = {
        "step_s": {k: round(v, 4) for k, v in times.items()},
        "tokens_per_s": {k: round(tokens / times[k], 1) for k in ("lorakit", "peft")},
        "peak_rss_mb": {k: round(memory[k]["peak_rss_mb"], 1) for k in memory},
    }
    ratios = {
        "speedup_vs_peft": times["peft"] / times["lorakit"],
        "rss_vs_peft": memory["lorakit"]["peak_rss_mb"] / memory["peft"]["peak_rss_mb"],
        "lorakit_vs_floor": times["lorakit"] / times["floor"],
        "peft_vs_floor": times["peft"] / times["floor"],
    }
    setup = {"model": "SmolLM2-135M-Instruct", **LORA, "batch": args.batch, "seq": args.seq, "dtype": "fp32",
             "mode": "eager", "reps": args.reps}
    emit(f"train_step_{args.batch}x{args.seq}", f"python bench/train_step.py --batch {args.batch} --seq {args.seq}",
         setup, results, ratios)


if __name__ == "__main__":
    main()
