"""The runs the dashboard shows: `lorakit train` output folders under one root, read safely.

A run is a folder holding the job's `config.yaml` and its `metrics.jsonl` or `summary.json`
(what `train/job.py` writes). A run without `summary.json` is unfinished: still training, or
stopped; its page follows `metrics.jsonl` as lines are appended.

Nothing outside the root is ever read: a run id is the folder's path relative to the root,
and an id that resolves elsewhere (`..`, a symlink leading out) is refused like a missing one.
Files are parsed as YAML/JSON only (`yaml.safe_load`), never unpickled.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from lorakit.errors import LorakitError
from lorakit.train.config import flatten

SKIPPED = ("adapter", "adapter_init", "blobs")  # folders a run holds that are not runs
MAX_DEPTH = 4
LIVE_SECONDS = 120.0  # an unfinished run whose metrics changed this recently is "running"


class RunNotFound(LorakitError):
    """No run with this id under the dashboard's runs root."""


@dataclass
class Run:
    id: str  # the folder relative to the root, with '/'
    folder: Path
    config: dict
    summary: dict | None

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def status(self) -> str:
        if self.finished:
            return "finished"
        touched = max((p.stat().st_mtime for p in (self.folder / "metrics.jsonl", self.folder / "config.yaml")
                       if p.is_file()), default=0.0)
        return "running" if time.time() - touched < LIVE_SECONDS else "stopped"

    def metrics(self, after: int = 0) -> list[dict]:
        """metrics.jsonl's records from line `after` on (a half-written last line is left for the next read)."""
        return read_metrics_lines(self.folder / "metrics.jsonl")[after:]

    def row(self) -> dict:
        """One line of the runs table: what `summary.json` says, or what the metrics so far say. Sections
        of the wrong type (a hand-edited or foreign file) read as absent."""
        summary = self.summary or {}
        run = _section(summary, "run")
        method = self.config.get("method") if isinstance(self.config.get("method"), str) else "lora"
        lora = _section(summary, "adapter") or _section(self.config, method)
        metrics = self.metrics()
        comparison = _section(summary, "comparison")
        return {
            "id": self.id, "status": self.status, "model": summary.get("model") or self.config.get("model"),
            "method": method_label(lora, summary.get("quantize", self.config.get("quantize"))), "r": lora.get("r"),
            "steps": run.get("steps", _last(metrics, "step")),
            "max_steps": _section(self.config, "train").get("max_steps"),
            "seconds": run.get("seconds"), "tokens_per_second": run.get("tokens_per_second",
                                                                        _last(metrics, "tokens_per_second")),
            "peak_memory_mb": run.get("peak_memory_mb"),
            "train_loss": run.get("final_train_loss", _last(metrics, "loss")),
            "eval_loss": run.get("final_eval_loss", _last(metrics, "eval_loss")),
            "exact_before": _section(comparison, "base").get("exact_match"),
            "exact_after": _section(comparison, "adapter").get("exact_match"),
            "modified": self.folder.stat().st_mtime,
        }


def _section(mapping: dict, key: str) -> dict:
    value = mapping.get(key)
    return value if isinstance(value, dict) else {}


def method_label(lora: dict, quantize: str | None) -> str:
    """"QLoRA (nf4) + DoRA" and the like: what a user calls the recipe, from the saved adapter config."""
    kind = str(lora.get("peft_type") or "LORA").upper()
    if kind != "LORA":
        return kind
    label = f"QLoRA ({quantize})" if quantize else "LoRA"
    init = str(lora.get("init_lora_weights", True)).lower()
    extras = [name for flag, name in ((lora.get("use_dora"), "DoRA"), (lora.get("use_rslora"), "rsLoRA"),
                                      (init.startswith("pissa"), "PiSSA"), (init.startswith("olora"), "OLoRA"))
              if flag]
    return " + ".join([label, *extras])


def read_metrics_lines(path: Path) -> list[dict]:
    """The records of a metrics.jsonl: JSON objects with a numeric step (anything else is not ours: skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # the line a running job is writing now
        if isinstance(record, dict) and isinstance(record.get("step"), int | float):
            records.append(record)
    return records


def _last(records: list[dict], key: str):
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None


class RunIndex:
    """The runs under `root`, re-read on every call (runs come and go while the dashboard is open)."""

    def __init__(self, root: Path | None):
        self.root = Path(root).resolve() if root is not None else None

    def ids(self) -> list[str]:
        if self.root is None or not self.root.is_dir():
            return []
        found = []
        for folder, dirs, files in os.walk(self.root):  # followlinks=False: a linked folder is not walked
            relative = Path(folder).relative_to(self.root)
            if "config.yaml" in files and ("metrics.jsonl" in files or "summary.json" in files):
                found.append(relative.as_posix())
                dirs.clear()  # a run's own folders (checkpoints, adapter) hold no runs
                continue
            dirs[:] = sorted(d for d in dirs if d not in SKIPPED and not d.startswith((".", "checkpoint-"))
                             and len(relative.parts) < MAX_DEPTH)
        return sorted(found)

    def get(self, run_id: str) -> Run:
        folder = self._folder(run_id)
        summary_path = folder / "summary.json"
        try:
            config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) or {}
            summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
        except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RunNotFound(f"Run {run_id!r}: its config.yaml or summary.json cannot be read ({error}).") from None
        if summary is not None and not isinstance(summary, dict):  # not written by `lorakit train`
            raise RunNotFound(f"Run {run_id!r}: its summary.json holds a {type(summary).__name__}, not a run summary.")
        return Run(run_id, folder, config if isinstance(config, dict) else {}, summary)

    def all(self) -> tuple[list[Run], list[str]]:
        """(the runs, what could not be read): one broken folder never hides the others."""
        runs, problems = [], []
        for run_id in self.ids():
            try:
                run = self.get(run_id)
                run.row()  # a file of the wrong shape shows up here, not as a 500 of the whole page
                runs.append(run)
            except (RunNotFound, TypeError, ValueError, AttributeError) as error:  # being written, or not ours
                problems.append(str(error) if isinstance(error, RunNotFound) else f"Run {run_id!r}: {error}")
        return runs, problems

    def _folder(self, run_id: str) -> Path:
        missing = RunNotFound(f"No run {run_id!r} under {self.root}.")
        if self.root is None or not run_id or "\x00" in run_id:
            raise missing
        folder = (self.root / run_id).resolve()
        if not folder.is_relative_to(self.root) or not (folder / "config.yaml").is_file():
            raise missing
        return folder


def config_diff(runs: list[Run]) -> list[dict]:
    """The config keys whose values differ between the runs: [{"key", "values": [one per run]}]."""
    flat = [flatten(run.config) for run in runs]
    keys = dict.fromkeys(key for config in flat for key in config)
    rows = []
    for key in keys:
        values = [config.get(key) for config in flat]
        if any(value != values[0] for value in values[1:]):
            rows.append({"key": key, "values": values})
    return rows
