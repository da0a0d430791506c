"""`lorakit plan`, `train`, `schema`, `eval`, `demo`: memory planning and the training job."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lorakit.base_models import DEFAULT_MODEL
from lorakit.cli.common import default_of, or_exit
from lorakit.errors import LorakitError, TrainingInterrupted
from lorakit.train.config import DATA_FORMATS, QUANTIZE, DataConfig, EvalConfig

RECIPES = ("12-byte (no master copy)", "16-byte (fp32 master copy)")  # `lorakit plan --method full`, by --master-copy


def _config_keys_help() -> str:
    """The job's keys for `lorakit train --help`, from the schema."""
    from lorakit.train.config import documented_keys

    rows = [f"{key} ({kind}, default {default!r}){': ' + text if text else ''}"
            for key, kind, default, text in documented_keys() if key != "lora"]
    return ("Config keys (YAML, or --set KEY=VALUE; lora: takes every LoraConfig field; `lorakit schema` prints "
            "them all as JSON Schema):\n\n" + "\n\n".join(rows))


def plan(
    params: str | None = typer.Option(None, help="Parameter count, e.g. 70B or 135M (or give --model)."),
    model: str | None = typer.Option(None, help="Read sizes from a model (alias or local directory)."),
    method: str = typer.Option("lora", help="full | lora | qlora"),
    r: int = typer.Option(16, help="LoRA rank (all-linear adapters)."),
    batch: int | None = typer.Option(None), seq: int | None = typer.Option(None),
    layers: int | None = typer.Option(None), hidden: int | None = typer.Option(None),
    intermediate: int | None = typer.Option(None, help="MLP width (default 8/3 of --hidden, as in Llama)."),
    grad_ckpt: bool = typer.Option(False, "--grad-ckpt", help="Gradient checkpointing."),
    master_copy: bool = typer.Option(False, "--master-copy", help="Full fine-tune keeps an fp32 master copy."),
    dtype: str = typer.Option("bf16", help="Weight and activation dtype: bf16 | fp16 | fp32."),
    runtime_gb: float = typer.Option(0.0, help="Framework's own memory to add (e.g. ~0.22 for torch on CPU)."),
    tenants: int | None = typer.Option(None, help="Serving: number of tenants (adapters)."),
    adapter_mb: float | None = typer.Option(None, help="Serving: size of one adapter in MB."),
    base_gb: float | None = typer.Option(None, help="Serving: base checkpoint size in GB (default: its weights)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Plan memory: weights, gradients, optimizer, master copy, activations, adapters; and tenants."""
    from lorakit import plan as planner
    from lorakit.base_models import resolve_model_path

    def build():
        assumed = None
        if model:
            shape = planner.Shape.from_model_dir(resolve_model_path(model))
        elif params:
            count = planner.parse_count(params)
            standard = planner.standard_shape(count) if layers is hidden is intermediate is None else None
            width = intermediate or (hidden and int(hidden * 8 / 3))
            shape, assumed = standard or (planner.Shape(count, layers, hidden, width), None)
        else:
            raise LorakitError("Give --params (e.g. 70B) or --model.")
        size = {"bf16": 2, "fp16": 2, "fp32": 4}.get(dtype)
        if size is None:
            raise LorakitError(f"--dtype must be bf16, fp16 or fp32, got {dtype!r}.")
        result = planner.plan(shape, method, r, batch, seq, grad_ckpt, master_copy, size, runtime_gb=runtime_gb)
        if assumed:
            result.notes.insert(0, assumed)
        if method == "full":  # the seed's two recipes side by side: 12 bytes a parameter, or 16 with a master copy
            totals = [planner.plan(shape, method, r, batch, seq, grad_ckpt, copy, size, runtime_gb=runtime_gb).total_gb
                      for copy in (False, True)]
            result.recipes = dict(zip(RECIPES, totals, strict=True))
        if tenants:
            if adapter_mb is None:
                raise LorakitError("--tenants needs --adapter-mb.")
            base = base_gb if base_gb is not None else shape.params * size / planner.GB
            result.tenants = planner.tenants(tenants, base, adapter_mb)
        return result

    result = or_exit(build)
    if as_json:
        typer.echo(result.to_json())
        return
    table = Table(title=f"memory plan: {method}")
    table.add_column("part")
    table.add_column("GB", justify="right")
    for part, gb in result.parts_gb.items():
        table.add_row(part, f"{gb:,.2f}")
    table.add_row("[bold]total[/bold]", f"[bold]{result.total_gb:,.2f}[/bold]")
    console = Console()
    console.print(table)
    for recipe, total in (result.recipes or {}).items():
        console.print(f"{recipe}: {total:,.2f} GB" + ("  ← this plan" if recipe == RECIPES[master_copy] else ""))
    if result.tenants:
        t = result.tenants
        console.print(f"{t['tenants']} tenants: {t['merged_gb']:,.2f} GB as merged copies vs "
                      f"{t['shared_gb']:,.2f} GB shared base + adapters ({t['saving_x']:.1f}x less)")
    for note in result.notes:
        console.print(f"note: {note}")


def train(
    config: Path = typer.Argument(..., help="The job's YAML file: lorakit's, or an Axolotl / LLaMA-Factory config."),
    set_: list[str] = typer.Option([], "--set", help="Override one value, e.g. --set train.max_steps=10 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint in output_dir."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous run in output_dir."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config as YAML; train nothing."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes on this machine (launches torchrun: DDP, gloo on "
                                                        "CPU, nccl on GPU)."),
) -> None:
    """Train a LoRA adapter from a YAML config: checkpoints, progress, loss plot and a before/after report."""
    from lorakit.train.config import load_job_config

    job = or_exit(load_job_config, config, set_)
    if print_config:
        typer.echo(job.to_yaml(), nl=False)
        return
    if nproc > 1:
        from lorakit.train.job import preflight
        from lorakit.train.launch import torchrun

        or_exit(preflight, job, resume, overwrite)
        raise typer.Exit(torchrun(nproc, ["train", str(config), *(f"--set={s}" for s in set_),
                                          *(["--resume"] if resume else []), *(["--overwrite"] if overwrite else [])]))
    from lorakit.train.job import run_train

    try:
        or_exit(run_train, job, resume, overwrite)
    except TrainingInterrupted as stop:
        again = " ".join(["lorakit", "train", shlex.quote(str(config)), *(f"--set {shlex.quote(s)}" for s in set_)])
        command = f"{again} --resume" if stop.checkpoint is not None else f"{again} --overwrite"
        Console(stderr=True, soft_wrap=True).print(f"[yellow]{escape(str(stop))}[/yellow]\nTo continue: {escape(command)}",
                                                   highlight=False)
        raise typer.Exit(130) from None


def schema(
    out: Path | None = typer.Option(None, "--out", "-o", help="Write to this file (default: print)."),
) -> None:
    """Print the job config's JSON Schema, for editor completion of the YAML (e.g. yaml-language-server)."""
    from lorakit.files.format import write_text_atomic
    from lorakit.train.config import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if out is None:
        typer.echo(text, nl=False)
    else:
        write_text_atomic(out, text)
        typer.echo(f"wrote {out}: add `# yaml-language-server: $schema={out}` to the top of a job YAML", err=True)


def evaluate(
    adapter: Path = typer.Option(..., help="A saved adapter directory."),
    data: Path = typer.Option(..., help="Eval data: JSONL, JSON or CSV (any format `lorakit train` reads)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Built-in alias or local transformers directory."),
    data_format: str = typer.Option("auto", "--format", help=" | ".join(DATA_FORMATS)),
    quantize: str | None = typer.Option(None, help="Load the base in nf4 | fp4 | int8."),
    max_examples: int = typer.Option(default_of(EvalConfig, "max_examples"), min=1),
    max_new_tokens: int = typer.Option(default_of(EvalConfig, "max_new_tokens"), min=1),
    max_seq_len: int = typer.Option(default_of(DataConfig, "max_seq_len"), min=1),
    samples: int = typer.Option(default_of(EvalConfig, "samples"), min=0),
    as_json: bool = typer.Option(False, "--json", help='Print {"base": {...}, "adapter": {...}}.'),
) -> None:
    """Compare the base model with base + adapter on a data set: loss, perplexity, exact/contains match."""
    from lorakit.train.job import run_eval
    from lorakit.train.report import print_comparison

    def checked():
        if data_format not in DATA_FORMATS or quantize not in QUANTIZE:
            raise LorakitError(f"--format must be one of {DATA_FORMATS}; --quantize one of nf4, fp4, int8.")
        settings = EvalConfig(max_examples=max_examples, max_new_tokens=max_new_tokens, samples=samples)
        return run_eval(model, adapter, data, data_format, max_seq_len, quantize, settings)

    result = or_exit(checked)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        print_comparison(result)


def demo(
    model: str = typer.Option(DEFAULT_MODEL, help="Built-in alias or local transformers directory."),
    output_dir: str = typer.Option("runs/demo", help="Where the run goes (only a previous demo run there is replaced)."),
    set_: list[str] = typer.Option([], "--set", help="Override a value of the demo config, e.g. train.max_steps=10."),
) -> None:
    """The main job on the default model: made-up facts the base gets wrong, learned in ~1 minute."""
    from lorakit.train.job import run_demo

    or_exit(run_demo, model, output_dir, set_)



def register(app: typer.Typer) -> None:
    app.command()(plan)
    app.command(epilog=_config_keys_help())(train)
    app.command()(schema)
    app.command(name="eval")(evaluate)
    app.command()(demo)
