"""Peak RSS of real LoRA / QLoRA training steps on SmolLM2-135M, one configuration per process.

    python bench/measure_step_memory.py --method lora --batch 4 --seq 128 [--grad-ckpt]

Prints JSON: RSS after import, the peak while loading, and the peak over 3 full training steps
(forward, loss, backward, AdamW) measured on its own: the kernel's high-water mark (VmHWM) is
reset after loading (`/proc/self/clear_refs` <- 5), so a loading spike does not hide the step.
`tests/test_plan.py` compares `lorakit plan` with these measurements.
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch

import lorakit
from lorakit.base_models import load_base
from lorakit.quant import prepare_model_for_kbit_training


def status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) from /proc/self/status, in MiB."""
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=["lora", "qlora"], default="lora")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--grad-ckpt", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    reset_peak()  # a child inherits its parent's high-water mark; count from here
    after_import = status_mb("VmRSS")
    model = load_base(quantize="nf4" if args.method == "qlora" else None)
    if args.method == "qlora" or args.grad_ckpt:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.grad_ckpt)
    model = lorakit.get_peft_model(model, lorakit.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear"))
    load_peak, after_load = status_mb("VmHWM"), status_mb("VmRSS")
    reset_peak()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(json.dumps({**vars(args), "rss_after_import_mb": after_import, "load_peak_mb": load_peak,
                      "rss_after_load_mb": after_load, "step_peak_mb": status_mb("VmHWM")}))


if __name__ == "__main__":
    main()
