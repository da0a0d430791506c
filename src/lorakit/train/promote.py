"""Promotion measured by the job: `gated_promote` runs the promotion gates with `lorakit eval` (the
registry takes `evaluate` as a callable and never imports training code), and `retrain` re-runs a
version's recorded config on another base (the seeds' base-update lock-in: adapters trained on the old
base must be re-adapted) and pushes the result with its lineage."""

from __future__ import annotations

import tempfile
from pathlib import Path

from lorakit.errors import RegistryError
from lorakit.registry.gates import METRICS, Gate
from lorakit.registry.store import Registry, VersionInfo
from lorakit.train import job
from lorakit.train.config import EvalConfig, load_job_config
from lorakit.train.register import push_run


def gated_promote(registry: Registry, ref: str, alias: str, gates: list[str], eval_data: Path | None = None,
                  model: str | None = None, max_examples: int | None = None, allow_regression: bool = False,
                  new_base: bool = False) -> dict:
    """`promote` as the CLI and the dashboard run it: gates parsed from text ('exact_match>=0.9'), measured
    by `lorakit eval` on `eval_data`. The candidate is evaluated on `model` (default: the base it records);
    the version the alias holds now on the same model if it shares the candidate's base (fingerprint),
    else on its own recorded base — a regression check across a base update compares each version on
    the base it serves."""
    parsed = [Gate.parse(g) for g in gates]
    evaluate = None
    if eval_data is not None:
        candidate = registry.resolve(ref)
        evaluate = _evaluator(candidate, model or candidate.base_model, eval_data, max_examples)
    return registry.promote(ref, alias, parsed, eval_data, evaluate, allow_regression, new_base)


def _evaluator(candidate: VersionInfo, model: str, data: Path, max_examples: int | None):
    def evaluate(info: VersionInfo, folder: Path) -> dict:
        same_base = info.ref == candidate.ref or info.fingerprint == candidate.fingerprint
        settings = EvalConfig(samples=0, **({"max_examples": max_examples} if max_examples else {}))
        scores = job.run_eval(model if same_base else info.base_model, folder, data, settings=settings)["adapter"]
        return {k: v for k, v in scores.items() if k in METRICS}

    return evaluate


def retrain(registry: Registry, ref: str, base: str, output_dir: Path | None = None,
            alias: str | None = None, overwrite: bool = False) -> VersionInfo:
    """Re-run `ref`'s recorded job on `base` into `output_dir` and push the result (parent: `ref`).

    An existing output folder is refused unless `overwrite`; one that is the source run of a registered
    version is refused always (its files are that version's record)."""
    info = registry.resolve(ref)
    recorded = registry.train_config(info.ref)
    if recorded is None:
        raise RegistryError(f"{info.ref} was not pushed by `lorakit train` (no training config recorded), so it "
                            "cannot be retrained; train it on the new base yourself and push that.")
    out = Path(output_dir or Path("runs") / f"{info.name}-retrain")
    owner = registry.source_run_of(out)
    if owner is not None:
        raise RegistryError(f"{out} is the training run of {owner}; retraining into it would replace that version's "
                            "record. Choose another --output-dir.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RegistryError(f"{out} exists and is not empty; choose another --output-dir or pass --overwrite.")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(recorded)
        config = load_job_config(path, [f"model={base}", f"output_dir={out}", "register.name=null"])
    summary = job.run_train(config, overwrite=True)
    return push_run(registry, info.name, alias, summary, config.to_yaml(), parent=info.ref)
