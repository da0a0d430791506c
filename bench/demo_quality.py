"""Quality on the demo task: lorakit's job vs PEFT, same data, hyper-parameters, steps and Trainer.

    python bench/demo_quality.py [--steps 4 10 30]
    python bench/demo_quality.py --variants [--steps 4 10]     LoRA vs DoRA vs PiSSA vs LoRA+ (lorakit only)

Both sides use the demo config (src/lorakit/data/demo.yaml), the same encoded data, the same
HF TrainingArguments, the same seed and AdamW, and are scored by the same before/after code
(lorakit.train.evaluate.compare, which only needs `disable_adapter()` and `generate`). The
only difference is the adapter engine: lorakit's `get_peft_model` + LoraTrainer, or
`peft.get_peft_model` + a plain `transformers.Trainer` (which knows how to save PEFT models).
Each side runs in its own process. Prints exact/contains match and eval loss per side and steps.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from harness import emit, side_in_subprocess

SCRIPT = Path(__file__).resolve()


VARIANTS = {"lora": [], "dora": ["lora.use_dora=true"], "pissa": ["lora.init_lora_weights=pissa"],
            "loraplus": ["train.loraplus_lr_ratio=16"]}


def run_side(side: str, steps: int, variant: str = "lora") -> dict:
    import json

    from transformers import Trainer, set_seed

    from lorakit.base_models import load_tokenizer
    from lorakit.optim import make_optimizer
    from lorakit.train.batching import Collator
    from lorakit.train.config import load_job_config
    from lorakit.train.evaluate import compare
    from lorakit.train.job import build_data, build_model, build_optimizer, training_arguments
    from lorakit.train.trainer import LoraTrainer

    out = tempfile.mkdtemp(prefix=f"demo-quality-{side}-")
    with resources.as_file(resources.files("lorakit") / "data" / "demo.yaml") as path:
        config = load_job_config(path, [f"train.max_steps={steps}", f"output_dir={out}", "train.save_steps=1000",
                                        *VARIANTS[variant]])
    tokenizer = load_tokenizer(config.model)
    train, evaluation = build_data(config, tokenizer)
    set_seed(config.train.seed)
    if side == "lorakit":
        model = build_model(config)
        trainer_cls = LoraTrainer
    else:
        import peft

        from lorakit.base_models import load_base

        base = load_base(config.model)
        base.config.use_cache = False
        model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", **config.lora))
        trainer_cls = Trainer
    if side == "lorakit":
        optimizer = build_optimizer(config, model)
    else:
        optimizer = make_optimizer("adamw", [p for p in model.parameters() if p.requires_grad],
                                   lr=config.train.learning_rate, weight_decay=config.train.weight_decay)
    trainer = trainer_cls(model=model, args=training_arguments(config, has_eval=False), train_dataset=train,
                          data_collator=Collator(tokenizer.pad_token_id), optimizers=(optimizer, None))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    result = compare(model, tokenizer, evaluation.examples, config.eval.model_copy(update={"samples": 0}))
    print(json.dumps({"seconds": seconds, "base": result["base"], "adapter": result["adapter"]}))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", choices=["lorakit", "peft"])
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 10, 30])
    parser.add_argument("--variant", choices=list(VARIANTS), default="lora", help="internal: one side's variant")
    parser.add_argument("--variants", action="store_true", help="compare LoRA, DoRA, PiSSA, LoRA+ (lorakit)")
    args = parser.parse_args(argv)
    if args.side:
        run_side(args.side, args.steps[0], args.variant)
        return
    if args.variants:
        return compare_variants(args.steps)
    results, ratios = {}, {}
    for steps in args.steps:
        for side in ("lorakit", "peft"):
            results[f"{side}@{steps}"] = summarize(side_in_subprocess(SCRIPT, side, "--steps", str(steps)))
        ours, theirs = results[f"lorakit@{steps}"], results[f"peft@{steps}"]
        ratios[f"exact_minus_peft@{steps}"] = ours["exact"] - theirs["exact"]
        ratios[f"contains_minus_peft@{steps}"] = ours["contains"] - theirs["contains"]
    command = "python bench/demo_quality.py " + " ".join(sys.argv[1:])
    emit("demo_quality", command.strip(), {"task": "demo.yaml (12 made-up facts, eval = the same facts)",
                                           "steps": args.steps}, results, ratios)


def summarize(r: dict) -> dict:
    return {"exact": round(r["adapter"]["exact_match"], 3), "contains": round(r["adapter"]["contains_match"], 3),
            "eval_loss": round(r["adapter"]["loss"], 4), "base_exact": round(r["base"]["exact_match"], 3),
            "train_s": round(r["seconds"], 1)}


def compare_variants(steps_list: list[int]) -> None:
    results, ratios = {}, {}
    for steps in steps_list:
        for variant in VARIANTS:
            results[f"{variant}@{steps}"] = summarize(
                side_in_subprocess(SCRIPT, "lorakit", "--steps", str(steps), "--variant", variant))
            ratios[f"{variant}_time_vs_lora@{steps}"] = results[f"{variant}@{steps}"]["train_s"] / results[f"lora@{steps}"]["train_s"]
    command = "python bench/demo_quality.py --variants --steps " + " ".join(map(str, steps_list))
    emit("demo_variants", command, {"task": "demo.yaml", "variants": VARIANTS}, results, ratios)


if __name__ == "__main__":
    main()
