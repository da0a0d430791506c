"""`lorakit train` and `lorakit eval`: the config-driven job, readable top to bottom.

    1. config → output dir (fresh, or resume from the newest complete checkpoint)
    2. tokenizer → data (checked and encoded before the model loads: data errors come fast)
    3. base model (optionally 4/8-bit) → LoRA adapter
    4. HF Trainer (LoraTrainer) with a progress bar and metrics.jsonl
    5. adapter/ (PEFT format), config.yaml, loss.png, report.md with the before/after table

Output directory:  adapter/  checkpoint-N/  config.yaml  metrics.jsonl  loss.png  report.md  summary.json
(and adapter_init/ for PiSSA/OLoRA: the adapter before training, which `adapter/` was converted with)

Rules that keep work from being lost: a run in output_dir is never replaced without
--overwrite; --resume continues only the same config (more steps allowed); Ctrl-C raises
`TrainingInterrupted`, which names the step and what is left to resume from.
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
from transformers import PrinterCallback, TrainingArguments, set_seed

from lorakit.base_models import load_base, load_tokenizer
from lorakit.compile import compile_blocks
from lorakit.errors import ConfigError, TrainingInterrupted
from lorakit.files.format import write_text_atomic
from lorakit.methods.lora.init import is_weight_init
from lorakit.methods.lora.loraplus import create_loraplus_optimizer
from lorakit.model import PeftModel, get_peft_model
from lorakit.optim import make_optimizer, optimizer_class
from lorakit.quant import prepare_model_for_kbit_training
from lorakit.quiet import is_verbose
from lorakit.train.batching import Collator, pack
from lorakit.train.callbacks import MetricsFile, RankAllocation, RichProgress, StepTimer, read_metrics
from lorakit.train.config import DataConfig, EvalConfig, JobConfig, TrainConfig, flatten, load_job_config
from lorakit.train.data import Dataset, concat, load_dataset, split_eval
from lorakit.train.evaluate import compare
from lorakit.train.methods import optimizer_steps
from lorakit.train.ranks import SINGLE_PROCESS, Ranks, current_ranks
from lorakit.train.report import plot_losses, print_comparison, write_report
from lorakit.train.trainer import LoraTrainer, checkpoints

RUN_FILES = ("config.yaml", "metrics.jsonl", "report.md", "loss.png", "summary.json", "adapter", "adapter_init")
DEMO_MARK = "lorakit-demo.json"  # written by `lorakit demo` (and kept by it): only such a run may be replaced by a demo
DECAYING_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial")


def build_data(config: JobConfig, tokenizer) -> tuple[Dataset, Dataset]:
    """(train, eval) encoded; eval is `data.eval` or a seeded `eval_fraction` of train."""
    data = config.data
    options = {"fmt": data.format, "max_seq_len": data.max_seq_len, "train_on_prompt": data.train_on_prompt,
               "chat_template": data.chat_template, "prompt_style": data.prompt_style, "too_long": data.too_long}
    train = concat([load_dataset(path, tokenizer, split=data.train_split, **options)
                    for path in config.data_paths("train")])
    eval_paths = config.data_paths("eval")
    if eval_paths:
        evaluation = concat([load_dataset(path, tokenizer, split=data.eval_split, **options) for path in eval_paths])
    else:
        train, evaluation = split_eval(train, data.eval_count or data.eval_fraction, config.train.seed)
    if data.packing:
        train.rows = pack(train.examples, data.max_seq_len)
    return train, evaluation


def training_arguments(config: JobConfig, has_eval: bool) -> TrainingArguments:
    t = config.train
    return TrainingArguments(
        output_dir=config.output_dir, **schedule_arguments(t), per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=config.eval.batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, seed=t.seed, data_seed=t.seed,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon,
        logging_steps=t.logging_steps, save_strategy="steps", save_steps=t.save_steps,
        eval_strategy="steps" if has_eval else "no", eval_steps=t.eval_steps,
        **checkpointing_arguments(t.gradient_checkpointing),
        include_num_input_tokens_seen="non_padding", remove_unused_columns=False, report_to=[],
        ddp_find_unused_parameters=False,  # every adapter parameter is used in every forward
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        save_only_model=False, bf16=t.bf16_on, fp16=t.fp16, **sharding_arguments(t),
    )


def schedule_arguments(t: TrainConfig) -> dict:
    """Run length and warm-up for HF Trainer: max_steps, or epochs (Trainer derives the steps from
    the data); warm-up steps, or a ratio of the steps (transformers 5 reads a `warmup_steps` below
    1 as that ratio, rounded up, and dropped `warmup_ratio`: pyproject.toml requires 5)."""
    length = {"max_steps": t.max_steps} if t.epochs is None else {"max_steps": -1, "num_train_epochs": t.epochs}
    return length | {"warmup_steps": t.warmup_steps if t.warmup_steps is not None else t.warmup_ratio}


def sharding_arguments(t: TrainConfig) -> dict:
    """FSDP / DeepSpeed for HF Trainer. FSDP wraps with use_orig_params, so the frozen base is
    sharded while the adapter parameters keep requires_grad (a flat parameter mixing frozen and
    trainable ones needs it)."""
    if t.deepspeed:
        return {"deepspeed": t.deepspeed}
    if t.fsdp:
        return {"fsdp": True, "fsdp_config": {"use_orig_params": True, **(t.fsdp_config or {})}}
    return {}


def checkpointing_arguments(enabled: bool) -> dict:
    """Activation checkpointing under the name this transformers takes (5.x renamed it and warns
    on the old one), non-reentrant (the reentrant variant drops gradients of frozen-input blocks)."""
    name = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def prepare_output_dir(config: JobConfig, resume: bool, overwrite: bool,
                       ranks: Ranks = SINGLE_PROCESS) -> tuple[Path | None, str | None]:
    """(the checkpoint to resume from or None, a note for the user); never silently mixes or loses runs.
    Every rank checks (the same verdict everywhere); the main rank alone deletes, between barriers."""
    checkpoint, note, doomed = _plan_output_dir(config, resume, overwrite)
    ranks.barrier()  # every rank has looked before anything is deleted
    if ranks.is_main:
        for target in doomed:
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    ranks.barrier()
    return checkpoint, note


def _plan_output_dir(config: JobConfig, resume: bool, overwrite: bool) -> tuple[Path | None, str | None, list[Path]]:
    """(checkpoint, note, what to delete first): folders a killed save left incomplete when
    resuming; the previous run with --overwrite."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in output_dir and --overwrite deletes it; pass one of them.")
    out = Path(config.output_dir)
    complete, _ = checkpoints(out)
    previous = [name for name in RUN_FILES if (out / name).exists()] + [p.name for p in complete]
    if resume:
        if not complete and not previous:
            raise ConfigError(f"--resume: {out} holds no run to resume (no complete checkpoint); run without --resume.")
        if not complete:
            raise ConfigError(f"--resume: {out} has no complete checkpoint: the run stopped before its first save (at step "
                              f"train.save_steps={config.train.save_steps}), so there is nothing to resume; start it "
                              "again with --overwrite.")
        note = _check_resumable(config, out, complete[-1])
        return complete[-1], note, checkpoints(out)[1]
    if previous:
        if not overwrite:
            hint = "pass --resume to continue it, --overwrite to replace it" if complete else \
                "it has no checkpoint to resume from; pass --overwrite to replace it"
            raise ConfigError(f"{out} holds a previous run ({', '.join(previous[:4])}); {hint}, or set another "
                              "output_dir (e.g. --set output_dir=runs/new).")
        return None, None, [out / name for name in previous + [p.name for p in checkpoints(out)[1]]]
    return None, None, []


def _check_resumable(config: JobConfig, out: Path, checkpoint: Path) -> str | None:
    """Resuming with other settings would silently train a different model; only the run's length
    (train.max_steps, or train.epochs) may grow (returns what a decaying schedule then does)."""
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        return None
    saved = load_job_config(saved_path)
    key = "train.max_steps" if config.train.epochs is None else "train.epochs"
    changes = [f"{name}: {old!r} → {new!r}" for name, old, new in _differences(saved.to_dict(), config.to_dict())
               if name not in (key, "output_dir")]
    if changes:
        raise ConfigError("--resume: the config differs from the run's config.yaml in " + "; ".join(changes)
                          + f". Only {key} may grow on resume; start a new run for other settings.")
    field = key.split(".")[1]
    now, was = getattr(config.train, field), getattr(saved.train, field)
    if now < was:
        raise ConfigError(f"--resume: {key} {was} → {now}: shortening the run is not a resume (the learning-rate "
                          f"schedule was built for {saved.train.length()}). Use "
                          f"{checkpoint / 'adapter_model.safetensors'} as it is, or start a new run.")
    if now == was and (out / "summary.json").is_file():
        raise ConfigError(f"--resume: {out} is finished ({saved.train.length()}; see its report.md). To train "
                          f"further, make it longer: --set {key}={2 * now:g} --resume.")
    return schedule_note(config.train.lr_scheduler, key, was, now)


def _differences(saved: dict, current: dict):
    """(dotted key, saved value, current value) for every leaf that differs."""
    old, new = flatten(saved), flatten(current)
    for key in dict.fromkeys([*old, *new]):
        if old.get(key) != new.get(key):
            yield key, old.get(key), new.get(key)


def schedule_note(schedule: str, key: str, was: float, now: float) -> str | None:
    """What a decaying schedule does when a resumed run is made longer."""
    if now <= was or schedule not in DECAYING_SCHEDULES:
        return None
    return (f"{key} grew from {was:g} to {now:g} under the '{schedule}' schedule: the schedule is recomputed "
            f"for the longer run, so the learning rate continues from where that run would have it at the "
            f"resumed step (higher than at the end of the first run), then decays to 0 at its end. For a "
            "fresh decay, start a new run; for a flat continuation use lr_scheduler: constant.")


def is_demo_run(out: Path) -> bool:
    return (out / DEMO_MARK).is_file()


def peak_memory() -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "CUDA max allocated"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (kib / 1024 if sys.platform != "darwin" else kib / 2**20), "process peak RSS"


def build_model(config: JobConfig, total_steps: int | None = None) -> PeftModel:
    # QLoRA + FSDP: the 4-bit values stored as bf16, so FSDP can flatten them with the layer's other parameters
    storage = torch.bfloat16 if config.train.fsdp and config.quantize in ("nf4", "fp4") else torch.uint8
    base = load_base(config.model, quantize=config.quantize, double_quant=config.double_quant, quant_storage=storage)
    base.config.use_cache = False  # a training forward would fill a KV cache nobody reads (generate turns it on)
    if config.quantize:
        prepare_model_for_kbit_training(base, use_gradient_checkpointing=config.train.gradient_checkpointing)
    return get_peft_model(base, config.adapter_config(total_steps))


def converts_on_save(config: JobConfig) -> bool:
    """PiSSA/OLoRA adapters train against a residual base (W − their initial part), so adapter/ is
    PEFT's conversion to a plain rank-2r LoRA for the untouched base, made against adapter_init/
    (saved before training); pissa_niter_K could not even rebuild its residual on load (the
    randomized SVD differs each time). DoRA cannot be converted: with exact PiSSA/OLoRA its file
    stays as trained (the deterministic init rebuilds the residual on load; pissa_niter_K with
    DoRA is refused by the config check)."""
    lora = config.lora_config()
    return lora is not None and is_weight_init(lora.init_lora_weights) and not lora.use_dora


def save_adapter(model: PeftModel, config: JobConfig, out: Path) -> None:
    initial = out / "adapter_init" if converts_on_save(config) else None
    model.save_pretrained(out / "adapter", path_initial_model_for_weight_conversion=initial)


def build_optimizer(config: JobConfig, model) -> torch.optim.Optimizer:
    """The configured optimizer; with train.loraplus_lr_ratio, LoRA+ parameter groups."""
    t = config.train
    if t.loraplus_lr_ratio is not None:
        return create_loraplus_optimizer(model, optimizer_class(t.optimizer), lr=t.learning_rate,
                                         loraplus_lr_ratio=t.loraplus_lr_ratio, loraplus_lr_embedding=t.loraplus_lr_embedding,
                                         loraplus_weight_decay=t.weight_decay, betas=(t.adam_beta1, t.adam_beta2),
                                         eps=t.adam_epsilon)
    return make_optimizer(t.optimizer, [p for p in model.parameters() if p.requires_grad], lr=t.learning_rate,
                          weight_decay=t.weight_decay, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)


def preflight(config: JobConfig, resume: bool, overwrite: bool) -> None:
    """What every rank would refuse, checked once before `--nproc` starts the ranks: the output folder (looked at,
    nothing deleted) and the data. Refused here, the error is printed once, with no launcher traceback."""
    _plan_output_dir(config, resume, overwrite)
    build_data(config, load_tokenizer(config.model))


def run_train(config: JobConfig, resume: bool = False, overwrite: bool = False, console: Console | None = None) -> dict:
    ranks = current_ranks()  # under torchrun / accelerate launch: the main rank prints, writes and evaluates
    console = (console or Console()) if ranks.is_main else Console(quiet=True)
    out = Path(config.output_dir)
    checkpoint, note = prepare_output_dir(config, resume, overwrite, ranks)
    if note:
        console.print(f"[yellow]note:[/yellow] {note}")
    tokenizer = load_tokenizer(config.model)
    train, evaluation = build_data(config, tokenizer)
    s = train.stats
    console.print(f"data: {s.examples} train / {evaluation.stats.examples} eval examples ({train.format}), "
                  f"{s.truncated} truncated, {s.dropped} dropped" + (f", {len(train.rows)} packed rows" if train.rows else ""))
    set_seed(config.train.seed)  # the adapter's initial weights, too, come from the seed
    with console.status(f"Loading {config.model}" + (f" ({config.quantize})" if config.quantize else "") + "…"):
        model = build_model(config, optimizer_steps(config.train.max_steps, config.train.epochs, len(train),
                                                    config.train.batch_size * config.train.grad_accum * ranks.world_size))
    trainable, total = model.get_nb_trainable_parameters()
    console.print(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", config.to_yaml())
        if converts_on_save(config) and not checkpoint:
            model.save_pretrained(out / "adapter_init")  # the PiSSA/OLoRA start, for the conversion at the end

    args = training_arguments(config, has_eval=len(evaluation) > 0)
    optimizer = build_optimizer(config, model)
    if config.train.torch_compile:
        console.print(f"torch.compile: {compile_blocks(model.get_base_model())} blocks (the first step compiles them)")
    progress, timer = RichProgress(console), StepTimer()
    trainer = LoraTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=evaluation if len(evaluation) else None,
        data_collator=Collator(tokenizer.pad_token_id), optimizers=(optimizer, None),
        callbacks=[progress, timer, MetricsFile(out / "metrics.jsonl"), RankAllocation(model)], keep_checkpoints=config.train.keep_checkpoints,
    )
    if not is_verbose():
        trainer.remove_callback(PrinterCallback)  # its raw {'loss': ...} dicts repeat what the progress display shows
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except KeyboardInterrupt:
        progress.stop()
        complete, _ = checkpoints(out)
        raise TrainingInterrupted(out, trainer.state.global_step, trainer.state.max_steps,
                                  complete[-1] if complete else None, config.train.save_steps) from None
    seconds = time.perf_counter() - started
    ranks.finish(trainer)  # the ranks are done together; what follows is the main rank's alone
    if not ranks.is_main:
        return {"rank": ranks.rank, "world_size": ranks.world_size}  # rank 0 saves, evaluates and reports
    save_adapter(model, config, out)

    started_eval = time.perf_counter()
    compared, kind = (evaluation.examples, "eval") if evaluation.examples else (train.examples, "training")
    with console.status(f"Comparing base and adapter on {min(len(compared), config.eval.max_examples)} {kind} examples…"):
        comparison = compare(model, tokenizer, compared, config.eval)
    comparison["on"] = kind  # no held-out set (data.eval_fraction 0): the table shows what was learned, not general
    metrics = read_metrics(out / "metrics.jsonl")
    memory, memory_kind = peak_memory()
    summary = {
        "output_dir": str(out), "model": config.model, "quantize": config.quantize,
        "method": config.method,
        "adapter": model.peft_config["default"].to_dict(),  # resolved: defaults, the YAML's keys, what training set
        "paths": {"config_dir": str(config.base_dir), "train": config.data.train, "eval": config.data.eval,
                  "output_dir": str(out)},
        "precision": "bf16 autocast" if config.train.bf16_on else "fp16 autocast" if config.train.fp16 else "fp32",
        "data": {"format": train.format, "max_seq_len": config.data.max_seq_len,
                 "packed_rows": len(train.rows) if train.rows else None,
                 "train": vars(train.stats), "eval": vars(evaluation.stats)},
        "run": {"trainable": trainable, "total": total, "steps": trainer.state.global_step,
                "world_size": ranks.world_size, "per_device_batch": config.train.batch_size,
                "global_batch": config.train.batch_size * config.train.grad_accum * ranks.world_size,
                "resumed_from": _step_of(checkpoint), "seconds": seconds,
                "eval_seconds": time.perf_counter() - started_eval,
                "tokens_per_second": progress.throughput.rate(trainer.state),  # Trainer sums the ranks' tokens
                "peak_memory_mb": memory, "memory_kind": memory_kind, "torch_compile": config.train.torch_compile,
                **timer.summary(),
                "final_train_loss": _last(metrics, "loss"), "final_eval_loss": _last(metrics, "eval_loss")},
        "comparison": comparison,
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    plot_losses(metrics, out / "loss.png")
    write_report(out / "report.md", summary)
    print_comparison(comparison, console)
    if config.register.name:
        summary["registered"] = register_run(config, summary).ref
        console.print(f"registry: {summary['registered']}"
                      + (f" ({config.register.name}:{config.register.alias})" if config.register.alias else ""))
    console.print(f"adapter: {out / 'adapter'}\nreport:  {out / 'report.md'}\nplot:    {out / 'loss.png'}")
    return summary


def register_run(config: JobConfig, summary: dict):
    """The job's `register:` section: push the adapter with its config, data digest and eval."""
    from lorakit.registry.store import Registry
    from lorakit.train.register import push_run

    registry = Registry.open(config.register.registry, config.register.blobs)
    return push_run(registry, config.register.name, config.register.alias, summary, config.to_yaml())


def run_demo(model: str, output_dir: str, overrides: list[str]) -> dict:
    """`lorakit demo`: the packaged job. It replaces a previous demo run in output_dir, and
    refuses anything else there (a user's own run must not be lost to a demo)."""
    from importlib import resources

    with resources.as_file(resources.files("lorakit") / "data" / "demo.yaml") as path:
        job = load_job_config(path, [f"model={model}", f"output_dir={output_dir}", *overrides])
    out = Path(job.output_dir)
    if out.is_dir() and any(out.iterdir()) and not is_demo_run(out):
        raise ConfigError(f"{out} holds something that is not a lorakit demo run; the demo replaces only its own runs. "
                          "Choose another --output-dir, or move that folder away.")
    write_text_atomic(out / DEMO_MARK, json.dumps({"demo": True}) + "\n")
    return run_train(job, resume=False, overwrite=True)


def _last(metrics: list[dict], key: str) -> float | None:
    values = [m[key] for m in metrics if key in m]
    return values[-1] if values else None


def _step_of(checkpoint: Path | None) -> int | None:
    return int(checkpoint.name.split("-")[1]) if checkpoint else None


def run_eval(model_name: str, adapter: Path, data: Path, fmt: str = "auto", max_seq_len: int | None = None,
             quantize: str | None = None, settings: EvalConfig | None = None) -> dict:
    """The before/after comparison of a saved adapter on a data file (what `lorakit eval` prints);
    defaults are the job's (`data.max_seq_len`, the `eval:` section)."""
    tokenizer = load_tokenizer(model_name)
    examples = load_dataset(Path(data), tokenizer, fmt, max_seq_len or DataConfig().max_seq_len).examples
    model = PeftModel.from_pretrained(load_base(model_name, quantize=quantize), adapter)
    return compare(model, tokenizer, examples, settings)
