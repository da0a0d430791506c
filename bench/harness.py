"""Shared benchmark runner: lorakit and the peer (PEFT) side by side, in one run.

- Timings: both sides live in one process and are timed *interleaved* (A B A B …, the
  starting side rotating each round) after warm-up, and the median is kept, so drift on a
  shared machine and cache effects of the previous call hit both alike.
- Memory: peak RSS cannot be shared, so each side runs alone in its own subprocess
  (`python bench/X.py --side NAME`), which resets its peak at start (a child inherits its
  parent's high-water mark) and reports its own VmHWM.
- Output: one JSON object (setup, machine, numbers, ratios) on stdout, also written to
  bench/results/<name>.json, from which `bench/run_all.py` rebuilds docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def machine_info() -> dict:
    import torch
    import transformers

    def version(package: str) -> str | None:
        try:
            from importlib.metadata import version as v

            return v(package)
        except Exception:
            return None

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {
        "commit": commit or None, "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": version("peft"), "lorakit": version("lorakit"),
    }


def time_interleaved(
    candidates: dict[str, Callable[[], object]], reps: int = 5, warmup: int = 1,
    before: dict[str, Callable[[], object]] | None = None, after: dict[str, Callable[[], object]] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each candidate, calls interleaved round by round.

    `before[name]` / `after[name]` run untimed around every call (e.g. build a fresh model
    to merge, delete the adapter just loaded).
    """
    before, after = before or {}, after or {}
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for round_ in range(warmup + reps):
        start = round_ % len(names)  # rotate who goes first: whoever follows a heavy call pays for it
        for name in names[start:] + names[:start]:
            fn = candidates[name]
            if name in before:
                before[name]()
            started = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - started
            if name in after:
                after[name]()
            if round_ >= warmup:
                samples[name].append(elapsed)
    return {name: statistics.median(values) for name, values in samples.items()}


def reset_peak_rss() -> None:
    """Start this process's peak-RSS count from its current RSS.

    Needed in every measuring child: Linux copies the RSS high-water mark from the parent on
    fork and keeps it across exec, so without a reset a child's ru_maxrss starts at the
    (large) RSS of the benchmark process that spawned it.
    """
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss_mb() -> float:
    """Peak RSS since the last reset_peak_rss() (VmHWM), in MiB."""
    line = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def side_in_subprocess(script: Path, side: str, *args: str) -> dict:
    """Run `script --side side` alone and return the JSON it prints last."""
    done = subprocess.run([sys.executable, str(script), "--side", side, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{script.name} --side {side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def progress(message: str) -> None:
    """One line on stderr (stdout carries the JSON): long benchmarks say where they are."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def emit(name: str, command: str, setup: dict, results: dict, ratios: dict) -> dict:
    report = {"benchmark": name, "command": command, "setup": setup, "machine": machine_info(),
              "results": results, "ratios": {k: round(v, 3) for k, v in ratios.items()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / f".{name}.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, RESULTS / f"{name}.json")
    print(json.dumps(report))
    return report
