"""`lorakit train` and `lorakit eval`: the config-driven job, readable top to bottom.

    1. config → output dir (fresh, or resume from the newest complete checkpoint)
    2. tokenizer → data (checked and encoded before the model loads: data errors come fast)
    3. base model (optionally 4/8-bit) → LoRA adapter
    4. HF Trainer (LoraTrainer) with a progress bar and metrics.jsonl
    5. adapter/ (PEFT format), config.yaml, loss.png, report.md with the before/after table

Output directory:  adapter/  checkpoint-N/  config.yaml  metrics.jsonl  loss.png  report.md  summary.json
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from transformers import TrainingArguments, set_seed

from lorakit.compile import compile_blocks
from lorakit.errors import ConfigError
from lorakit.io import write_text_atomic
from lorakit.model import PeftModel, get_peft_model
from lorakit.models import load_base, load_tokenizer
from lorakit.optim import create_loraplus_optimizer, make_optimizer, optimizer_class
from lorakit.quant import prepare_model_for_kbit_training
from lorakit.train.callbacks import MetricsFile, RichProgress, StepTimer, read_metrics
from lorakit.train.config import JobConfig, load_job_config
from lorakit.train.data import Collator, Dataset, load_dataset, pack, split_eval
from lorakit.train.evaluate import compare
from lorakit.train.report import plot_losses, print_comparison, write_report
from lorakit.train.trainer import LoraTrainer, checkpoints, prune_checkpoints

RUN_FILES = ("config.yaml", "metrics.jsonl", "report.md", "loss.png", "summary.json", "adapter")


def build_data(config: JobConfig, tokenizer) -> tuple[Dataset, Dataset]:
    """(train, eval) encoded; eval is `data.eval` or a seeded `eval_fraction` of train."""
    data = config.data
    options = {"fmt": data.format, "max_seq_len": data.max_seq_len, "train_on_prompt": data.train_on_prompt,
               "chat_template": data.chat_template}
    train = load_dataset(config.data_path("train"), tokenizer, **options)
    eval_path = config.data_path("eval")
    if eval_path is not None:
        evaluation = load_dataset(eval_path, tokenizer, **options)
    else:
        train, evaluation = split_eval(train, data.eval_fraction, config.train.seed)
    if data.packing:
        train.rows = pack(train.examples, data.max_seq_len)
    return train, evaluation


def training_arguments(config: JobConfig, has_eval: bool) -> TrainingArguments:
    t = config.train
    return TrainingArguments(
        output_dir=config.output_dir, max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=config.eval.batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, seed=t.seed, data_seed=t.seed,
        logging_steps=t.logging_steps, save_strategy="steps", save_steps=t.save_steps,
        eval_strategy="steps" if has_eval else "no", eval_steps=t.eval_steps,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        include_num_input_tokens_seen="non_padding", remove_unused_columns=False, report_to=[],
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        save_only_model=False,
    )


def prepare_output_dir(config: JobConfig, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); never silently mixes two runs."""
    out = Path(config.output_dir)
    complete, _ = checkpoints(out)
    previous = [name for name in RUN_FILES if (out / name).exists()] + [p.name for p in complete]
    if resume:
        if not complete:
            raise ConfigError(f"--resume: {out} has no complete checkpoint to resume from; run without --resume.")
        _check_same_run(config, out / "config.yaml")
        prune_checkpoints(out, keep=len(complete))  # removes folders a killed save left incomplete
        return complete[-1]
    if previous:
        if not overwrite:
            raise ConfigError(
                f"{out} holds a previous run ({', '.join(previous[:4])}); pass --resume to continue it, --overwrite "
                "to replace it, or set another output_dir (e.g. --set output_dir=runs/new)."
            )
        for name in previous + [p.name for p in checkpoints(out)[1]]:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    return None


def _check_same_run(config: JobConfig, saved_path: Path) -> None:
    """Resuming with other settings would silently train a different model; only more steps are allowed."""
    if not saved_path.is_file():
        return
    saved = load_job_config(saved_path).to_dict()
    current = config.to_dict()
    for section in (saved, current):
        section["train"].pop("max_steps")
        section.pop("output_dir")
    if saved != current:
        changed = [k for k in current if current[k] != saved.get(k)]
        raise ConfigError(f"--resume: the config differs from the run's config.yaml in {changed}; only "
                          "train.max_steps may change on resume. Start a new run for other settings.")


def peak_memory() -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "CUDA max allocated"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (kib / 1024 if sys.platform != "darwin" else kib / 2**20), "process peak RSS"


def build_model(config: JobConfig) -> PeftModel:
    base = load_base(config.model, quantize=config.quantize)
    base.config.use_cache = False  # a training forward would fill a KV cache nobody reads (generate turns it on)
    if config.quantize:
        prepare_model_for_kbit_training(base, use_gradient_checkpointing=config.train.gradient_checkpointing)
    return get_peft_model(base, config.lora_config())


def build_optimizer(config: JobConfig, model) -> torch.optim.Optimizer:
    """The configured optimizer; with train.loraplus_lr_ratio, LoRA+ parameter groups."""
    t = config.train
    if t.loraplus_lr_ratio is not None:
        return create_loraplus_optimizer(model, optimizer_class(t.optimizer), lr=t.learning_rate,
                                         loraplus_lr_ratio=t.loraplus_lr_ratio, loraplus_lr_embedding=t.loraplus_lr_embedding,
                                         loraplus_weight_decay=t.weight_decay)
    return make_optimizer(t.optimizer, [p for p in model.parameters() if p.requires_grad], lr=t.learning_rate,
                          weight_decay=t.weight_decay)


def run_train(config: JobConfig, resume: bool = False, overwrite: bool = False, console: Console | None = None) -> dict:
    console = console or Console()
    out = Path(config.output_dir)
    checkpoint = prepare_output_dir(config, resume, overwrite)
    tokenizer = load_tokenizer(config.model)
    train, evaluation = build_data(config, tokenizer)
    s = train.stats
    console.print(f"data: {s.examples} train / {evaluation.stats.examples} eval examples ({train.format}), "
                  f"{s.truncated} truncated, {s.dropped} dropped" + (f", {len(train.rows)} packed rows" if train.rows else ""))
    set_seed(config.train.seed)  # the adapter's initial weights, too, come from the seed
    with console.status(f"Loading {config.model}" + (f" ({config.quantize})" if config.quantize else "") + "…"):
        model = build_model(config)
    trainable, total = model.get_nb_trainable_parameters()
    console.print(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", config.to_yaml())

    args = training_arguments(config, has_eval=len(evaluation) > 0)
    optimizer = build_optimizer(config, model)
    if config.train.torch_compile:
        console.print(f"torch.compile: {compile_blocks(model.get_base_model())} blocks (the first step compiles them)")
    progress, timer = RichProgress(console), StepTimer()
    trainer = LoraTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=evaluation,
        data_collator=Collator(tokenizer.pad_token_id), optimizers=(optimizer, None),
        callbacks=[progress, timer, MetricsFile(out / "metrics.jsonl")], keep_checkpoints=config.train.keep_checkpoints,
    )
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - started
    model.save_pretrained(out / "adapter")

    started_eval = time.perf_counter()
    examples = evaluation.examples[: config.eval.max_examples]
    with console.status(f"Comparing base and adapter on {len(examples)} eval examples…"):
        comparison = compare(model, tokenizer, examples, config.eval.max_new_tokens, config.eval.samples,
                             config.eval.batch_size)
    metrics = read_metrics(out / "metrics.jsonl")
    memory, memory_kind = peak_memory()
    summary = {
        "output_dir": str(out), "model": config.model, "quantize": config.quantize, "lora": config.lora,
        "data": {"format": train.format, "max_seq_len": config.data.max_seq_len,
                 "packed_rows": len(train.rows) if train.rows else None,
                 "train": vars(train.stats), "eval": vars(evaluation.stats)},
        "run": {"trainable": trainable, "total": total, "steps": trainer.state.global_step,
                "resumed_from": _step_of(checkpoint), "seconds": seconds,
                "eval_seconds": time.perf_counter() - started_eval,
                "tokens_per_second": progress.throughput.rate(trainer.state),
                "peak_memory_mb": memory, "memory_kind": memory_kind, "torch_compile": config.train.torch_compile,
                **timer.summary(),
                "final_train_loss": _last(metrics, "loss"), "final_eval_loss": _last(metrics, "eval_loss")},
        "comparison": comparison,
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    plot_losses(metrics, out / "loss.png")
    write_report(out / "report.md", summary)
    print_comparison(comparison, console)
    console.print(f"adapter: {out / 'adapter'}\nreport:  {out / 'report.md'}\nplot:    {out / 'loss.png'}")
    return summary


def _last(metrics: list[dict], key: str) -> float | None:
    values = [m[key] for m in metrics if key in m]
    return values[-1] if values else None


def _step_of(checkpoint: Path | None) -> int | None:
    return int(checkpoint.name.split("-")[1]) if checkpoint else None


def run_eval(model_name: str, adapter: Path, data: Path, fmt: str = "auto", max_seq_len: int = 512,
             quantize: str | None = None, max_examples: int = 64, max_new_tokens: int = 48, samples: int = 3,
             batch_size: int = 8) -> dict:
    """The before/after comparison of a saved adapter on a data file (what `lorakit eval` prints)."""
    tokenizer = load_tokenizer(model_name)
    examples = load_dataset(Path(data), tokenizer, fmt, max_seq_len).examples[:max_examples]
    model = PeftModel.from_pretrained(load_base(model_name, quantize=quantize), adapter)
    return compare(model, tokenizer, examples, max_new_tokens, samples, batch_size)
