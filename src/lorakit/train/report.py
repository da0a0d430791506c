"""The end of a job: loss.png, report.md and the before/after table on the terminal."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from lorakit.files.format import atomic_path, write_text_atomic
from lorakit.files.inspect import config_line

METRIC_ROWS = (("loss", "eval loss (answer tokens)", "{:.4f}"), ("perplexity", "perplexity", "{:.2f}"),
               ("exact_match", "exact match", "{:.0%}"), ("contains_match", "contains match", "{:.0%}"))


def _fmt(value, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def plot_losses(metrics: list[dict], path: Path) -> Path:
    """Train loss (every log) and eval loss (every eval) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    figure, axes = plt.subplots(figsize=(7, 4))
    for points, label, style in ((train, "train loss", "-"), (evals, "eval loss", "o--")):
        if points:
            axes.plot(*zip(*points, strict=True), style, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as staged:
        figure.savefig(staged, format="png", dpi=110)
    plt.close(figure)
    return path


def comparison_table(comparison: dict, title: str = "Before / after") -> Table:
    table = Table(title=f"{title} ({comparison['examples']} {comparison.get('on', 'eval')} examples)")
    for column in ("metric", "base model", "with adapter"):
        table.add_column(column)
    for key, label, pattern in METRIC_ROWS:
        table.add_row(label, _fmt(comparison["base"][key], pattern), _fmt(comparison["adapter"][key], pattern))
    return table


def samples_table(comparison: dict) -> Table:
    table = Table(title="Samples (greedy)")
    for column in ("prompt", "expected", "base model", "with adapter"):
        table.add_column(column, overflow="fold")
    for s in comparison["samples"]:
        table.add_row(s["prompt"] or "", s["expected"], s["base"], s["adapter"])
    return table


def groups_table(comparison: dict) -> Table:
    table = Table(title="Contains match by group")
    for column in ("group", "examples", "base model", "with adapter"):
        table.add_column(column)
    for g in comparison["groups"]:
        table.add_row(g["group"], str(g["examples"]), f"{g['base_contains_match']:.0%}", f"{g['adapter_contains_match']:.0%}")
    return table


def print_comparison(comparison: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(comparison_table(comparison))
    if comparison.get("groups"):
        console.print(groups_table(comparison))
    if comparison["samples"]:
        console.print(samples_table(comparison))


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_report(path: Path, summary: dict) -> Path:
    """report.md: data, adapter, cost, final losses, before/after and samples."""
    data, run, comparison, adapter, paths = (summary[k] for k in ("data", "run", "comparison", "adapter", "paths"))
    lines = [f"# lorakit run: {summary['output_dir']}", "",
             f"Model `{summary['model']}`" + (f", quantized {summary['quantize']}" if summary["quantize"] else "")
             + f"; {config_line(adapter)}; {summary['precision']}.", "",
             f"Paths (relative ones in the config resolve against its folder, `{paths['config_dir']}`; --set values "
             f"against the working directory): train `{paths['train']}`, eval `{paths['eval']}`, output "
             f"`{paths['output_dir']}`.", "",
             "## Data", "", "| | train | eval |", "|---|---|---|"]
    for key in ("examples", "tokens", "loss_tokens", "truncated", "dropped", "longest"):
        lines.append(f"| {key.replace('_', ' ')} | {data['train'][key]:,} | {data['eval'][key]:,} |")
    lines += ["", f"Format `{data['format']}`, max_seq_len {data['max_seq_len']}"
              + (f", packed into {data['packed_rows']} rows" if data.get("packed_rows") else "") + ".", "",
              "## Training", "",
              f"- trainable parameters: {run['trainable']:,} of {run['total']:,} ({100 * run['trainable'] / run['total']:.3f}%)",
              f"- steps: {run['steps']} (resumed from step {run['resumed_from']})" if run["resumed_from"] else f"- steps: {run['steps']}",
              f"- time: {run['seconds']:.0f} s training, {run['eval_seconds']:.0f} s before/after evaluation",
              f"- processes: {run.get('world_size', 1)}; batch {run.get('per_device_batch', '-')} per device, "
              f"{run.get('global_batch', '-')} per optimizer step (all processes, with gradient accumulation)",
              f"- tokens/s: {run['tokens_per_second']:,.0f} (non-padding tokens, this session, all processes)",
              f"- step time: first {_fmt(run['first_step_seconds'], '{:.2f}')} s"
              + (" (includes torch.compile)" if run["torch_compile"] else "")
              + f", median of the rest {_fmt(run['median_step_seconds'], '{:.2f}')} s",
              f"- peak memory: {run['peak_memory_mb']:,.0f} MB ({run['memory_kind']})",
              f"- final train loss: {_fmt(run['final_train_loss'], '{:.4f}')}; final eval loss: "
              f"{_fmt(run['final_eval_loss'], '{:.4f}')}",
              "", "![loss](loss.png)", "",
              f"## Before / after ({comparison['examples']} {comparison.get('on', 'eval')} examples)", "",
              "| metric | base model | with adapter |", "|---|---|---|"]
    for key, label, pattern in METRIC_ROWS:
        lines.append(f"| {label} | {_fmt(comparison['base'][key], pattern)} | {_fmt(comparison['adapter'][key], pattern)} |")
    lines += ["", "Exact match: equal after collapsing whitespace. Contains match: the expected answer appears "
              "in the generation, ignoring case. Generations are greedy.", ""]
    if comparison.get("groups"):
        lines += ["| group | examples | base contains | adapter contains |", "|---|---|---|---|"]
        lines += [f"| {_cell(g['group'])} | {g['examples']} | {g['base_contains_match']:.0%} | "
                  f"{g['adapter_contains_match']:.0%} |" for g in comparison["groups"]]
        lines.append("")
    if comparison["samples"]:
        lines += ["## Samples", "", "| prompt | expected | base model | with adapter |", "|---|---|---|---|"]
        lines += [f"| {_cell(s['prompt'])} | {_cell(s['expected'])} | {_cell(s['base'])} | {_cell(s['adapter'])} |"
                  for s in comparison["samples"]]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
