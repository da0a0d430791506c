"""Training meets the registry: a job's `register:` section pushes its adapter with its config, data
digest and eval (promote.py: gates measured by the job's eval, and `retrain`).

This lives beside the job, not in the registry: the registry never imports training code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from lorakit.registry.store import Registry, VersionInfo


def file_digest(path: str | Path | list | None) -> str | None:
    """sha256 of the data file (of the files, in order, for a data set given as a list)."""
    paths = [Path(p) for p in (path if isinstance(path, list) else [path] if path else [])]
    if not paths or not all(p.is_file() for p in paths):
        return None
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.read_bytes())
    return digest.hexdigest()


def push_run(registry: Registry, name: str, alias: str | None, summary: dict, config_yaml: str,
             parent: str | None = None) -> VersionInfo:
    """Push a finished `lorakit train` run (its summary.json contents) as the next version of `name`."""
    out = Path(summary["output_dir"])
    comparison = summary["comparison"]
    metrics = {"job": {"base": comparison["base"], "adapter": comparison["adapter"], "examples": comparison["examples"],
                       "steps": summary["run"]["steps"], "final_eval_loss": summary["run"]["final_eval_loss"],
                       "model": summary["model"]}}
    return registry.push(name, out / "adapter", alias=alias, source_run=str(out), metrics=metrics,
                         data_digest=file_digest(summary["paths"]["train"]), train_config=config_yaml, parent=parent)
