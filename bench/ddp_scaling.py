"""Training throughput on 1 vs 2 processes (DDP through torchrun, gloo on CPU), SmolLM2-135M,
LoRA r16 all-linear, the demo data, equal batch per process, one thread per process.

    python bench/ddp_scaling.py [--steps 12] [--batch 4]

Both runs are the real job (`lorakit train`, `--nproc 2` for the second), so the numbers are
what a user sees. tokens/s = non-padding tokens per optimizer step (all processes) / the
median step time (the first step and the before/after evaluation are not counted). The
communication share of a 2-process step is its extra time over a 1-process step of the same
per-process work: (t2 - t1) / t2 (gradient all-reduce, waiting for the slower rank).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import ROOT, emit, progress

DEMO = ROOT / "src" / "lorakit" / "data"


def run(out: Path, steps: int, batch: int, nproc: int) -> dict:
    overrides = [f"output_dir={out}", f"train.max_steps={steps}", f"train.batch_size={batch}", "train.logging_steps=1",
                 f"train.save_steps={steps}", f"train.eval_steps={steps}", "eval.max_examples=1", "eval.max_new_tokens=1",
                 "eval.samples=0", "train.learning_rate=2e-4"]
    command = [sys.executable, "-m", "lorakit", "train", str(DEMO / "demo.yaml"), *(f"--set={o}" for o in overrides),
               "--nproc", str(nproc)]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    summary = json.loads((out / "summary.json").read_text())["run"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seen = [m["num_input_tokens_seen"] for m in metrics if "loss" in m]
    tokens_per_step = (seen[-1] - seen[0]) / (len(seen) - 1)
    return {"median_step_seconds": summary["median_step_seconds"], "tokens_per_step": tokens_per_step,
            "tokens_per_second": tokens_per_step / summary["median_step_seconds"], "world_size": summary["world_size"],
            "global_batch": summary["global_batch"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for nproc in (1, 2):
            progress(f"{nproc} process(es)…")
            results[f"{nproc}_process"] = run(Path(folder) / f"p{nproc}", args.steps, args.batch, nproc)
    one, two = results["1_process"], results["2_process"]
    ratios = {"tokens_per_second_2_vs_1": two["tokens_per_second"] / one["tokens_per_second"],
              "communication_share_of_a_2_process_step": (two["median_step_seconds"] - one["median_step_seconds"])
              / two["median_step_seconds"]}
    return emit("ddp_scaling", f"python bench/ddp_scaling.py --steps {args.steps} --batch {args.batch}",
                {"model": "smollm2-135m-instruct", "lora": "r16 all-linear", "data": "the demo's", "steps": args.steps,
                 "batch_per_process": args.batch, "threads_per_process": 1, "backend": "gloo (CPU)"}, results, ratios)


if __name__ == "__main__":
    main()
