"""Every adapter method on the demo task, lorakit's engine and PEFT's side by side.

    python bench/methods.py [--steps 30] [--methods lora ia3 ...]

One job per method and side, each in its own process (peak RSS is per process): the demo
config (src/lorakit/data/demo.yaml: SmolLM2-135M-Instruct, 12 made-up facts asked two ways +
9 replayed real facts, 30 steps, batch 6) with `method:` set and the learning rate below; the
same encoded data, TrainingArguments, seed and AdamW on both sides; lorakit's LoraTrainer on
ours, a plain transformers.Trainer on PEFT's (AdaLoRA's allocator runs on both as the same
Trainer callback). Scored on two sets: the training facts ("demo task") and demo_eval.jsonl
("held-out": the made-up facts asked a third way, and 7 real facts never trained).

Both sides' adapters are scored by lorakit's generate after loading the side's saved files:
PEFT 0.21.2's own generate() is wrong for prompt tuning, P-tuning and prefix tuning on
transformers 5.24 (tests/methods/test_virtual_tokens.py), which would score PEFT's training
below what it learned. Eval loss is computed the same way for both (lorakit's compare()).
Bottleneck adapters: lorakit only (PEFT has none). Step time = training seconds / steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import yaml

from harness import emit, peak_rss_mb, progress, reset_peak_rss, side_in_subprocess

SCRIPT = Path(__file__).resolve()
# method → (learning rate, section): short runs on a 135M model; why each: docs/benchmarks.md
METHODS = {
    "lora": (2e-3, {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}),
    "ia3": (2e-2, {}),
    "prompt_tuning": (3e-2, {"num_virtual_tokens": 20, "prompt_tuning_init": "SAMPLE_VOCAB"}),
    "p_tuning": (1e-2, {"num_virtual_tokens": 20, "encoder_hidden_size": 128}),
    "prefix_tuning": (1e-2, {"num_virtual_tokens": 20}),
    "adalora": (2e-3, {"init_r": 16, "target_r": 8, "lora_alpha": 32, "target_modules": "all-linear",
                       "tinit": 5, "tfinal": 5}),
    "bottleneck": (2e-3, {"architecture": "houlsby", "reduction_factor": 16}),
}
NO_PEFT = {"bottleneck"}


def job_config(method: str, steps: int, out: str, seed: int | None = None):
    from lorakit.train.config import load_job_config

    lr, section = METHODS[method]
    with resources.as_file(resources.files("lorakit") / "data" / "demo.yaml") as demo:
        raw = yaml.safe_load(demo.read_text())
        raw.pop("lora")
        raw["method"], raw[method] = method, section
        raw["data"] = {**raw["data"], "train": str(demo.parent / "demo.jsonl"), "eval": str(demo.parent / "demo_eval.jsonl")}
        path = Path(out) / "job.yaml"
        path.write_text(yaml.safe_dump(raw))
    return load_job_config(path, [f"train.max_steps={steps}", f"train.learning_rate={lr}", f"output_dir={out}",
                                  "train.save_steps=100000", *([f"train.seed={seed}"] if seed is not None else [])])


def peft_model(config, base, steps: int):
    import peft

    ours = config.adapter_config(steps).to_dict()
    kind = ours.pop("peft_type")
    cls = peft.PEFT_TYPE_TO_CONFIG_MAPPING[kind]
    fields = {k: v for k, v in ours.items() if k in cls.__dataclass_fields__ and v is not None}
    return peft.get_peft_model(base, cls(**fields))


def run_side(side: str, method: str, steps: int, seed: int | None = None) -> None:
    from transformers import Trainer, set_seed

    import lorakit
    from lorakit.base_models import load_base, load_tokenizer
    from lorakit.optim import make_optimizer
    from lorakit.train.batching import Collator
    from lorakit.train.callbacks import RankAllocation
    from lorakit.train.evaluate import compare
    from lorakit.train.job import build_data, build_model, training_arguments
    from lorakit.train.trainer import LoraTrainer

    reset_peak_rss()
    out = tempfile.mkdtemp(prefix=f"bench-methods-{method}-{side}-")
    config = job_config(method, steps, out, seed)
    tokenizer = load_tokenizer(config.model)
    train, held_out = build_data(config, tokenizer)
    set_seed(config.train.seed)
    if side == "lorakit":
        model, trainer_cls = build_model(config, steps), LoraTrainer
    else:
        base = load_base(config.model)
        base.config.use_cache = False
        model, trainer_cls = peft_model(config, base, steps), Trainer
    optimizer = make_optimizer("adamw", [p for p in model.parameters() if p.requires_grad],
                               lr=config.train.learning_rate, weight_decay=config.train.weight_decay)
    trainer = trainer_cls(model=model, args=training_arguments(config, has_eval=False), train_dataset=train,
                          data_collator=Collator(tokenizer.pad_token_id), optimizers=(optimizer, None),
                          callbacks=[RankAllocation(model)] if method == "adalora" else [])
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    trainable = model.get_nb_trainable_parameters()[0]
    model.save_pretrained(Path(out) / "adapter")
    scored = lorakit.PeftModel.from_pretrained(load_base(config.model), Path(out) / "adapter", verify_base=False).eval()
    settings = config.eval.model_copy(update={"samples": 0})
    result = {"seconds": seconds, "step_s": seconds / steps, "peak_rss_mb": peak, "trainable": trainable}
    for name, data in (("demo", train), ("held_out", held_out)):
        comparison = compare(scored, tokenizer, data.examples, settings)
        result[name] = {"contains": comparison["adapter"]["contains_match"], "exact": comparison["adapter"]["exact_match"],
                        "loss": comparison["adapter"]["loss"], "base_contains": comparison["base"]["contains_match"]}
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", choices=["lorakit", "peft"])
    parser.add_argument("--method", choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seed", type=int, default=None, help="train.seed (default: the demo's, 0)")
    args = parser.parse_args(argv)
    if args.side:
        return run_side(args.side, args.method, args.steps, args.seed)
    results, ratios = {}, {}
    for method in args.methods:
        for side in ("lorakit", *(() if method in NO_PEFT else ("peft",))):
            progress(f"{method} / {side}")
            seed = () if args.seed is None else ("--seed", str(args.seed))
            r = side_in_subprocess(SCRIPT, side, "--method", method, "--steps", str(args.steps), *seed)
            results[f"{method}/{side}"] = {
                "demo_contains": round(r["demo"]["contains"], 3), "held_out_contains": round(r["held_out"]["contains"], 3),
                "demo_loss": round(r["demo"]["loss"], 4), "held_out_loss": round(r["held_out"]["loss"], 4),
                "step_s": round(r["step_s"], 3), "peak_rss_mb": round(r["peak_rss_mb"]), "trainable": r["trainable"],
                "base_held_out_contains": round(r["held_out"]["base_contains"], 3)}
        if method not in NO_PEFT:
            ours, theirs = results[f"{method}/lorakit"], results[f"{method}/peft"]
            ratios[f"{method}_step_time_vs_peft"] = ours["step_s"] / theirs["step_s"]
            ratios[f"{method}_held_out_contains_minus_peft"] = ours["held_out_contains"] - theirs["held_out_contains"]
            ratios[f"{method}_demo_contains_minus_peft"] = ours["demo_contains"] - theirs["demo_contains"]
            ratios[f"{method}_rss_vs_peft"] = ours["peak_rss_mb"] / theirs["peak_rss_mb"]
    command = "python bench/methods.py " + " ".join(sys.argv[1:])
    emit("methods" if args.seed is None and args.methods == list(METHODS) else "methods_subset", command.strip(), {"task": "demo.yaml; demo = its training facts, held_out = demo_eval.jsonl",
                                      "steps": args.steps, "seed": args.seed or 0, "learning_rates": {m: METHODS[m][0] for m in args.methods}},
         results, ratios)


if __name__ == "__main__":
    main()
