"""DoRA's training-step overhead over LoRA: lorakit's vs PEFT's, SmolLM2-135M, r16 all-linear, 4 x 128.

    python bench/dora_step.py

Four steps timed interleaved in one process (lorakit LoRA, lorakit DoRA, PEFT LoRA, PEFT DoRA),
each on its own copy of the base. Goal: our DoRA overhead (DoRA step / LoRA step) ≤ PEFT's.
"""

from __future__ import annotations

import copy

from harness import emit, time_interleaved
from train_step import LORA, load_base, make_batch, train_step_fn


def main() -> None:
    base = load_base("lorakit")
    batch = make_batch(4, 128, base.config.vocab_size)
    steps = {f"{side}_{kind}": train_step_fn(side, copy.deepcopy(base), batch, use_dora=(kind == "dora"))
             for side in ("lorakit", "peft") for kind in ("lora", "dora")}
    times = time_interleaved(steps, reps=3, warmup=1)
    ratios = {
        "lorakit_dora_overhead": times["lorakit_dora"] / times["lorakit_lora"],
        "peft_dora_overhead": times["peft_dora"] / times["peft_lora"],
        "dora_speedup_vs_peft": times["peft_dora"] / times["lorakit_dora"],
    }
    emit("dora_step", "python bench/dora_step.py", {"model": "SmolLM2-135M-Instruct", **LORA, "batch": 4, "seq": 128},
         {"step_s": {k: round(v, 4) for k, v in times.items()}}, ratios)


if __name__ == "__main__":
    main()
