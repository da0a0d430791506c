"""Training meets the registry: a job's `register:` section pushes its adapter with its config, data
digest and eval; `retrain` re-runs a version's recorded config on another base (the seeds' base-
update lock-in: adapters trained on the old base must be re-adapted) and pushes the result with
its lineage."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from lorakit.errors import RegistryError
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


def gated_promote(registry: Registry, ref: str, alias: str, gates: list[str], eval_data: Path | None = None,
                  model: str | None = None, max_examples: int | None = None, allow_regression: bool = False) -> dict:
    """`promote` as the CLI and the dashboard run it: gates parsed from text ('exact_match>=0.9'), measured
    by `lorakit eval` on `eval_data` against `model` (default: the base the adapter records)."""
    from lorakit.registry.gates import Gate

    parsed = [Gate.parse(g) for g in gates]
    evaluate = None
    if eval_data is not None:
        evaluate = _evaluator(model or registry.resolve(ref).base_model, eval_data, max_examples)
    return registry.promote(ref, alias, parsed, eval_data, evaluate, allow_regression)


def _evaluator(model: str, data: Path, max_examples: int | None):
    def evaluate(folder: Path) -> dict:
        from lorakit.train.config import EvalConfig
        from lorakit.train.job import run_eval

        scores = run_eval(model, folder, data, settings=EvalConfig(samples=0, **({"max_examples": max_examples} if max_examples else {})))["adapter"]
        return {k: v for k, v in scores.items() if k in ("exact_match", "contains_match", "loss", "perplexity")}

    return evaluate


def retrain(registry: Registry, ref: str, base: str, output_dir: Path | None = None,
            alias: str | None = None) -> VersionInfo:
    from lorakit.train.config import load_job_config
    from lorakit.train.job import run_train

    info = registry.resolve(ref)
    recorded = registry.train_config(info.ref)
    if recorded is None:
        raise RegistryError(f"{info.ref} was not pushed by `lorakit train` (no training config recorded), so it "
                            "cannot be retrained; train it on the new base yourself and push that.")
    out = str(output_dir or Path("runs") / f"{info.name}-retrain")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(recorded)
        job = load_job_config(path, [f"model={base}", f"output_dir={out}", "register.name=null"])
    summary = run_train(job, overwrite=True)
    return push_run(registry, info.name, alias, summary, job.to_yaml(), parent=info.ref)
