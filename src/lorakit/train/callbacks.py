"""What the user sees while a job runs: a rich progress bar and metrics.jsonl.

Both are ordinary `TrainerCallback`s, so they work with any HF Trainer. Tokens/s counts
the non-padding tokens Trainer has seen in this session (`include_num_input_tokens_seen`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import TrainerCallback

from lorakit.files.format import write_text_atomic


class Throughput:
    """Tokens per second since training (re)started."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.tokens_at_start = 0

    def start(self, state) -> None:
        self.started = time.perf_counter()
        self.tokens_at_start = state.num_input_tokens_seen

    def rate(self, state) -> float:
        seconds = time.perf_counter() - self.started
        return (state.num_input_tokens_seen - self.tokens_at_start) / seconds if seconds > 0 else 0.0


class RichProgress(TrainerCallback):
    """step / total, loss, learning rate, tokens/s, elapsed and ETA: a live bar in a terminal,
    one plain line per log when the output is a file or a pipe (CI logs, `| tee`), where a
    live display would leave nothing or control codes."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.throughput = Throughput()
        self.progress: Progress | None = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.throughput.start(state)
        if not self.console.is_terminal:
            return
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                           loss="-", lr="-", tps="-")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step,
                                 tps=f"{self.throughput.rate(state):,.0f}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        fields = {}
        if "loss" in logs:
            fields["loss"] = f"{logs['loss']:.4f}"
        if "learning_rate" in logs:
            fields["lr"] = f"{logs['learning_rate']:.2e}"
        if "eval_loss" in logs:
            self.console.print(f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}")
        if self.progress is not None:
            self.progress.update(self.task, **fields)
        elif "loss" in fields:
            self.console.print(f"step {state.global_step}/{state.max_steps}  loss {fields['loss']}  "
                               f"lr {fields.get('lr', '-')}  {self.throughput.rate(state):,.0f} tok/s", highlight=False)

    def on_train_end(self, args, state, control, **kwargs):
        self.stop()

    def stop(self) -> None:
        """End the live display (also when training stops by an interrupt, which skips on_train_end)."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class MetricsFile(TrainerCallback):
    """Appends every log (train loss, lr, eval loss, …) to metrics.jsonl with step and tokens/s
    (the main rank only, in a multi-process run).

    On resume, lines written after the checkpoint by the interrupted run are dropped first,
    so the file describes the run that produced the final adapter.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.throughput = Throughput()

    def on_train_begin(self, args, state, control, **kwargs):
        self.throughput.start(state)
        if state.is_world_process_zero and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= state.global_step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:  # every rank logs the same (gathered) numbers
            return
        record = {"step": state.global_step, **logs}
        if "loss" in logs:
            record["tokens_per_second"] = round(self.throughput.rate(state), 1)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class StepTimer(TrainerCallback):
    """Wall time of the first step (which includes any compilation) and the median of the rest."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.durations.append(time.perf_counter() - self._started)

    def summary(self) -> dict:
        rest = sorted(self.durations[1:])
        median = rest[len(rest) // 2] if rest else None
        return {"first_step_seconds": self.durations[0] if self.durations else None, "median_step_seconds": median}


class RankAllocation(TrainerCallback):
    """PEFT's AdaLoRA step, run where PEFT's docs put it: after optimizer.step(), before zero_grad()
    (HF Trainer's on_optimizer_step), with the steps done so far. A no-op for methods without one."""

    def __init__(self, model) -> None:
        self.model = model  # the PeftModel itself: under DDP, Trainer's `model` argument is the wrapper

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.model.base_model.update_and_allocate(state.global_step)
