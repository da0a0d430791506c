"""Adapter files and merging: lorakit vs PEFT, SmolLM2-135M, r16 all-linear (4.9 M parameters).

- save:        save_pretrained of one adapter (ours adds a checksum and the base fingerprint)
- hot load:    load_adapter into an already-wrapped live model (each side its own file format;
               also lorakit loading PEFT's file), then delete_adapter (untimed)
- from_pretrained onto a bare base (ours includes fingerprinting the base)
- merge:       merge_and_unload of a freshly wrapped model (wrapping untimed)
- fingerprint: base_fingerprint alone, and its share of our from_pretrained

    python bench/adapter_io.py
"""

from __future__ import annotations

import argparse
import copy
import itertools
import shutil
import tempfile
from pathlib import Path

import peft
import torch

import lorakit
from harness import emit, time_interleaved
from lorakit.base_models import load_model
from lorakit.files.fingerprint import base_fingerprint

LORA = dict(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    base, _ = load_model()
    work = Path(tempfile.mkdtemp(prefix="lorakit-bench-"))
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**LORA))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**LORA))
    ours.load_state_dict(theirs.state_dict())
    ours.save_pretrained(work / "ours")
    theirs.save_pretrained(work / "peft")
    names = itertools.count()
    current = {}

    def load(side: str, model, path: Path):
        def run():
            current[side] = f"a{next(names)}"
            model.load_adapter(path, adapter_name=current[side])
        return run

    times = time_interleaved(
        {
            "save_lorakit": lambda: ours.save_pretrained(work / "s_ours"),
            "save_peft": lambda: theirs.save_pretrained(work / "s_peft"),
            "load_lorakit": load("load_lorakit", ours, work / "ours"),
            "load_lorakit_peft_file": load("load_lorakit_peft_file", ours, work / "peft"),
            "load_peft": load("load_peft", theirs, work / "peft"),
        },
        reps=args.reps,
        after={
            "load_lorakit": lambda: ours.delete_adapter(current["load_lorakit"]),
            "load_lorakit_peft_file": lambda: ours.delete_adapter(current["load_lorakit_peft_file"]),
            "load_peft": lambda: theirs.delete_adapter(current["load_peft"]),
        },
    )

    fresh = {}
    times |= time_interleaved(
        {
            "from_pretrained_lorakit": lambda: lorakit.PeftModel.from_pretrained(fresh["ours"], work / "ours"),
            "from_pretrained_peft": lambda: peft.PeftModel.from_pretrained(fresh["peft"], work / "peft"),
            "merge_lorakit": lambda: fresh["m_ours"].merge_and_unload(),
            "merge_peft": lambda: fresh["m_peft"].merge_and_unload(),
            "fingerprint": lambda: base_fingerprint(fresh["ours"]),
        },
        reps=args.reps,
        before={
            "from_pretrained_lorakit": lambda: fresh.update(ours=copy.deepcopy(base)),
            "from_pretrained_peft": lambda: fresh.update(peft=copy.deepcopy(base)),
            "merge_lorakit": lambda: fresh.update(m_ours=lorakit.PeftModel.from_pretrained(copy.deepcopy(base), work / "ours")),
            "merge_peft": lambda: fresh.update(m_peft=peft.PeftModel.from_pretrained(copy.deepcopy(base), work / "peft")),
        },
    )
    shutil.rmtree(work, ignore_errors=True)

    results = {"seconds": {k: round(v, 4) for k, v in times.items()},
               "adapter_mb": round(sum(p.numel() for n, p in ours.named_parameters() if "lora_" in n and ".default." in n) * 4 / 1e6, 1)}
    ratios = {
        "hot_load_vs_peft": times["load_lorakit"] / times["load_peft"],
        "hot_load_peft_file_vs_peft": times["load_lorakit_peft_file"] / times["load_peft"],
        "from_pretrained_vs_peft": times["from_pretrained_lorakit"] / times["from_pretrained_peft"],
        "save_vs_peft": times["save_lorakit"] / times["save_peft"],
        "merge_vs_peft": times["merge_lorakit"] / times["merge_peft"],
        "fingerprint_share_of_from_pretrained": times["fingerprint"] / times["from_pretrained_lorakit"],
    }
    setup = {"model": "SmolLM2-135M-Instruct", **{k: v for k, v in LORA.items() if k != "init_lora_weights"},
             "reps": args.reps, "threads": torch.get_num_threads()}
    emit("adapter_io", "python bench/adapter_io.py", setup, results, ratios)


if __name__ == "__main__":
    main()
