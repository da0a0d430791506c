"""The `lorakit` command (also `python -m lorakit`). Subcommands arrive with their issues:
`train`, `eval`, `inspect`, `plan`, `merge`, `serve`."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import lorakit
from lorakit.base_models import DEFAULT_MODEL
from lorakit.errors import LorakitError, TrainingInterrupted
from lorakit.registry.cli import app as registry_app
from lorakit.train.config import DATA_FORMATS, QUANTIZE, DataConfig, EvalConfig
from lorakit.train.config_cli import app as config_app

app = typer.Typer(
    name="lorakit",
    help="Parameter-efficient fine-tuning (LoRA) with PEFT-compatible adapters.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(registry_app, name="registry")
app.add_typer(config_app, name="config")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lorakit {lorakit.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show every third-party log line and progress bar."),
) -> None:
    """lorakit: train, combine and serve LoRA adapters."""
    from lorakit.quiet import quiet_third_party

    quiet_third_party(verbose)


@app.command()
def inspect(
    directory: Path = typer.Argument(..., help="An adapter directory (adapter_config.json + adapter_model.safetensors)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Show what an adapter holds: config, base and fingerprint, targets, ranks, size, tensor stats."""
    from lorakit.files.inspect import config_line, describe, to_json

    info = _or_exit(describe, directory)
    if as_json:
        typer.echo(to_json(info))
        return
    console = Console()
    config = info["config"]
    summary = Table(show_header=False, title=f"adapter {info['path']}")
    for label, value in [
        ("made by", info["made_by"]), ("created", info["created"] or "-"), ("base model", info["base_model"] or "-"),
        ("base fingerprint", info["fingerprint"]), ("checksum", info["checksum"]),
        ("method", config_line(config)),
        ("ranks (modules)", ", ".join(f"r={r}: {n}" for r, n in info["ranks"].items()) or "-"),
        ("target modules", f"{len(info['target_modules'])} modules ({config.get('target_modules')})"
         if info["target_modules"] else "none (virtual tokens in front of the input)"),
        ("modules_to_save", str(config.get("modules_to_save") or "-")), ("bias", config.get("bias", "none")),
        ("parameters", f"{info['parameters']:,}"), ("size on disk", f"{info['size_bytes'] / 1e6:.2f} MB"),
        ("other adapters here", ", ".join(info["other_adapters"]) or "-"),
    ]:
        summary.add_row(label, str(value))
    console.print(summary)
    tensors = Table(title="tensors")
    tensors.add_column("tensor", overflow="fold")
    for column in ("shape", "dtype", "mean |x|", "std", "max |x|"):
        tensors.add_column(column)
    for name, t in info["tensors"].items():
        tensors.add_row(name, "x".join(map(str, t["shape"])), t["dtype"], f"{t['mean_abs']:.3g}", f"{t['std']:.3g}", f"{t['max_abs']:.3g}")
    console.print(tensors)


@app.command()
def convert(
    directory: Path = typer.Argument(..., help="An adapter directory holding adapter_model.bin."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Confirm you trust this pickle file."),
) -> None:
    """Convert a pickled adapter (adapter_model.bin) to safetensors, once, if you trust it."""
    if not allow_pickle:
        raise typer.BadParameter("pass --allow-pickle to confirm you trust this file (it is read with weights_only=True)")
    from lorakit.files.convert import convert_pickle

    written = _or_exit(convert_pickle, directory)
    typer.echo(f"wrote {written}")


RECIPES = ("12-byte (no master copy)", "16-byte (fp32 master copy)")  # `lorakit plan --method full`, by --master-copy


def _default(section, key: str):
    """A config key's default, from the schema (the CLI restates none by hand)."""
    return section.model_fields[key].get_default(call_default_factory=True)


def _config_keys_help() -> str:
    """The job's keys for `lorakit train --help`, from the schema."""
    from lorakit.train.config import documented_keys

    rows = [f"{key} ({kind}, default {default!r}){': ' + text if text else ''}"
            for key, kind, default, text in documented_keys() if key != "lora"]
    return ("Config keys (YAML, or --set KEY=VALUE; lora: takes every LoraConfig field; `lorakit schema` prints "
            "them all as JSON Schema):\n\n" + "\n\n".join(rows))


def _or_exit(function, *args):
    """Run; an error we raise on purpose becomes a one-line message and exit code 2."""
    try:
        return function(*args)
    except TrainingInterrupted:
        raise  # the caller knows the command to print
    except (LorakitError, FileNotFoundError, FileExistsError, ValueError) as exc:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None


@app.command()
def merge(
    base: str = typer.Option(..., help="The full-precision base model (alias or local directory)."),
    adapter: Path = typer.Option(..., help="The saved adapter directory."),
    out: Path = typer.Option(..., help="Where to write the merged transformers model directory."),
    dtype: str = typer.Option("fp32", help="Output dtype: fp32 | bf16 | fp16 (the merge itself runs in fp32)."),
    requantize: str | None = typer.Option(None, help="Quantize the merged model: nf4 | fp4 | int8."),
    verify_base: bool = typer.Option(True, help="Refuse an adapter trained on another base."),
    overwrite: bool = typer.Option(False, help="Replace an existing model directory at --out."),
) -> None:
    """Merge an adapter into a full-precision base and save a standard model (optionally requantized)."""
    from lorakit.files.merge_to_dir import merge_to_dir

    info = _or_exit(merge_to_dir, base, adapter, out, dtype, requantize, verify_base, overwrite)
    typer.echo(f"merged {adapter} into {base}: {info['parameters']:,} parameters, {dtype}"
               + (f", requantized to {requantize}" if requantize else "") + f" -> {out}")


@app.command()
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

    result = _or_exit(build)
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


@app.command(epilog=_config_keys_help())
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

    job = _or_exit(load_job_config, config, set_)
    if print_config:
        typer.echo(job.to_yaml(), nl=False)
        return
    if nproc > 1:
        from lorakit.train.job import preflight
        from lorakit.train.launch import torchrun

        _or_exit(preflight, job, resume, overwrite)
        raise typer.Exit(torchrun(nproc, ["train", str(config), *(f"--set={s}" for s in set_),
                                          *(["--resume"] if resume else []), *(["--overwrite"] if overwrite else [])]))
    from lorakit.train.job import run_train

    try:
        _or_exit(run_train, job, resume, overwrite)
    except TrainingInterrupted as stop:
        again = " ".join(["lorakit", "train", shlex.quote(str(config)), *(f"--set {shlex.quote(s)}" for s in set_)])
        command = f"{again} --resume" if stop.checkpoint is not None else f"{again} --overwrite"
        Console(stderr=True, soft_wrap=True).print(f"[yellow]{escape(str(stop))}[/yellow]\nTo continue: {escape(command)}",
                                                   highlight=False)
        raise typer.Exit(130) from None


@app.command()
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


@app.command(name="eval")
def evaluate(
    adapter: Path = typer.Option(..., help="A saved adapter directory."),
    data: Path = typer.Option(..., help="Eval data: JSONL, JSON or CSV (any format `lorakit train` reads)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Built-in alias or local transformers directory."),
    data_format: str = typer.Option("auto", "--format", help=" | ".join(DATA_FORMATS)),
    quantize: str | None = typer.Option(None, help="Load the base in nf4 | fp4 | int8."),
    max_examples: int = typer.Option(_default(EvalConfig, "max_examples"), min=1),
    max_new_tokens: int = typer.Option(_default(EvalConfig, "max_new_tokens"), min=1),
    max_seq_len: int = typer.Option(_default(DataConfig, "max_seq_len"), min=1),
    samples: int = typer.Option(_default(EvalConfig, "samples"), min=0),
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

    result = _or_exit(checked)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        print_comparison(result)


@app.command()
def demo(
    model: str = typer.Option(DEFAULT_MODEL, help="Built-in alias or local transformers directory."),
    output_dir: str = typer.Option("runs/demo", help="Where the run goes (only a previous demo run there is replaced)."),
    set_: list[str] = typer.Option([], "--set", help="Override a value of the demo config, e.g. train.max_steps=10."),
) -> None:
    """The main job on the default model: made-up facts the base gets wrong, learned in ~1 minute."""
    from lorakit.train.job import run_demo

    _or_exit(run_demo, model, output_dir, set_)


@app.command()
def serve(
    model: str = typer.Option(DEFAULT_MODEL, help="Built-in alias or local transformers directory."),
    adapter: list[str] = typer.Option([], "--adapter", help="NAME=PATH: an adapter loaded at start (repeatable)."),
    adapter_dir: list[Path] = typer.Option([], "--adapter-dir", help="Serve every adapter folder inside (loaded on "
                                                                        "first use); the admin API loads only from these."),
    host: str = typer.Option("127.0.0.1", help="Bind address (loopback unless you say otherwise)."),
    port: int = typer.Option(8000),
    quantize: str | None = typer.Option(None, help="Quantize the base on load: nf4 | int8."),
    dtype: str = typer.Option("auto", help="Base dtype: auto | fp32 | bf16 | fp16."),
    served_model_name: str | None = typer.Option(None, help="The base model's name in the API (default: its id)."),
    max_loras: int = typer.Option(8, help="Adapters usable in one engine step."),
    max_cpu_loras: int = typer.Option(32, help="Adapters resident at once (LRU beyond that)."),
    max_num_seqs: int = typer.Option(16, help="Requests running at once."),
    max_model_len: int = typer.Option(2048, help="Prompt + output tokens per request."),
    max_num_batched_tokens: int = typer.Option(512, help="Tokens per engine step (prefill chunk budget)."),
    kv_cache_memory_mb: int = typer.Option(1024, "--kv-cache-memory", help="KV cache budget in MiB."),
    max_queue: int = typer.Option(256, help="Requests waiting at most; more get 429 with Retry-After."),
    api_key: str | None = typer.Option(None, envvar="LORAKIT_API_KEY", help="Inference key (Bearer)."),
    admin_key: str | None = typer.Option(None, envvar="LORAKIT_ADMIN_KEY", help="Admin key: turns the admin API on."),
    shutdown_timeout: float = typer.Option(30.0, help="On SIGTERM, seconds in-flight requests get to finish."),
    max_adapter_size: int = typer.Option(1024, help="Largest adapter the admin API loads, in MiB."),
    registry: str | None = typer.Option(None, help="Serve from a registry (folder or database URL): models NAME, "
                                                   "NAME:alias, NAME@N; alias moves are followed."),
    registry_blobs: str | None = typer.Option(None, help="The registry's blob store (a folder or an fsspec URL)."),
    registry_alias: str = typer.Option("prod", help="The alias a bare NAME means."),
    registry_poll: float = typer.Option(2.0, help="Seconds between checks for promotions and rollbacks."),
    ui: bool = typer.Option(False, "--ui", help="Also serve the dashboard at /ui (this server, its registry)."),
    ui_runs: Path | None = typer.Option(None, help="With --ui: the folder of training runs the dashboard shows."),
    allowed_host: list[str] = typer.Option([], "--allowed-host", help="With --ui: a Host name the dashboard answers "
                                                                      "besides loopback and --host (repeatable)."),
    max_request_mb: float = typer.Option(4.0, help="Largest request body in MiB; larger ones get 413."),
) -> None:
    """Serve the base model and many adapters over an OpenAI-compatible API, hot-swapped under load."""
    from lorakit.serve.server import ServeSettings, run

    def parse_adapters() -> dict[str, Path]:
        pairs = {}
        for item in adapter:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise LorakitError(f"--adapter {item!r}: use NAME=PATH.")
            pairs[name] = Path(path)
        return pairs

    settings = ServeSettings(
        model=model, served_model_name=served_model_name, adapters=_or_exit(parse_adapters), adapter_dirs=adapter_dir,
        host=host, port=port, quantize=quantize, dtype=dtype, max_loras=max_loras, max_cpu_loras=max_cpu_loras,
        max_num_seqs=max_num_seqs, max_model_len=max_model_len, max_num_batched_tokens=max_num_batched_tokens,
        kv_cache_memory_mb=kv_cache_memory_mb, max_queue=max_queue, api_key=api_key or None,
        admin_key=admin_key or None, shutdown_timeout=shutdown_timeout, max_adapter_size_mb=max_adapter_size,
        registry=registry, registry_blobs=registry_blobs, registry_alias=registry_alias, registry_poll=registry_poll,
        ui=ui, ui_runs=ui_runs, allowed_hosts=allowed_host, max_request_mb=max_request_mb)

    def ready(state) -> None:
        adapters = len(state.engine.adapters.names())
        typer.echo(f"lorakit serve: {state.base_name} and {adapters} adapter(s) on http://{host}:{port}/v1 "
                   f"(admin API {'on' if admin_key else 'off'})" + (f", dashboard http://{host}:{port}/ui" if ui else ""),
                   err=True)

    _or_exit(run, settings, ready)


@app.command(name="ui")
def dashboard(
    runs: Path = typer.Option(Path("runs"), help="The folder of `lorakit train` runs to show."),
    registry: str | None = typer.Option(None, envvar="LORAKIT_REGISTRY", help="A registry (folder or database URL)."),
    registry_blobs: str | None = typer.Option(None, envvar="LORAKIT_REGISTRY_BLOBS",
                                              help="The registry's blob store, with a database URL."),
    server: str | None = typer.Option(None, help="A running `lorakit serve`, e.g. http://127.0.0.1:8000."),
    server_api_key: str | None = typer.Option(None, envvar="LORAKIT_API_KEY", help="That server's inference key."),
    api_key: str | None = typer.Option(None, envvar="LORAKIT_UI_KEY",
                                       help="The dashboard's key (default: --server-api-key); pages ask for it once."),
    allowed_host: list[str] = typer.Option([], "--allowed-host", help="A Host name to answer besides loopback and "
                                                                      "--host (repeatable)."),
    admin_key: str | None = typer.Option(None, envvar="LORAKIT_ADMIN_KEY",
                                         help="Turns promote / rollback on; the page must send it."),
    data: Path | None = typer.Option(None, help="The folder eval files for promotion gates are taken from."),
    host: str = typer.Option("127.0.0.1", help="Bind address (loopback unless you say otherwise)."),
    port: int = typer.Option(7860),
) -> None:
    """A web dashboard: runs and their curves, registry versions with promote / rollback, the live server."""
    from lorakit.ui.app import UISettings, run

    settings = UISettings(runs=runs, registry=registry, registry_blobs=registry_blobs, server=server,
                          server_api_key=server_api_key or None, api_key=api_key or None, admin_key=admin_key or None,
                          data=data, host=host, port=port, allowed_hosts=allowed_host)
    _or_exit(run, settings, lambda: typer.echo(f"lorakit ui: http://{host}:{port}/ (runs in {runs})", err=True))
