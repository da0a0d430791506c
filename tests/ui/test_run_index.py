"""What the dashboard reads from run folders and the registry, without a browser: the runs found, their
rows against the summary.json `lorakit train` wrote, unfinished runs, the roots nothing escapes."""

from __future__ import annotations

import json

import pytest
from dashboard_fixtures import XSS_NAME, dashboard_files  # noqa: F401

from lorakit.ui.app import version_scores
from lorakit.ui.runs import RunIndex, RunNotFound, config_diff, method_label


def test_runs_are_found_with_rows_from_their_summary(dashboard_files):  # noqa: F811
    index = RunIndex(dashboard_files["runs"])
    assert index.ids() == sorted(["lr-5e-3", "sweep/lr-2e-2", "live", XSS_NAME])  # checkpoints, adapters: not runs
    run = index.get("lr-5e-3")
    summary = json.loads((dashboard_files["runs"] / "lr-5e-3" / "summary.json").read_text())
    row = run.row()
    assert row["status"] == "finished" and row["method"] == "LoRA" and row["r"] == 4
    assert row["steps"] == summary["run"]["steps"] == 4
    assert row["train_loss"] == summary["run"]["final_train_loss"]
    assert row["eval_loss"] == summary["run"]["final_eval_loss"]
    assert row["exact_after"] == summary["comparison"]["adapter"]["exact_match"]
    assert [m["step"] for m in run.metrics() if "loss" in m] == [1, 2, 3, 4]


def test_an_unfinished_run_is_read_from_its_metrics_and_followed(dashboard_files, tmp_path):  # noqa: F811
    index = RunIndex(dashboard_files["runs"])
    live = index.get("live")
    assert not live.finished and live.status == "running"
    first = live.metrics()
    assert len(first) == 2 and live.row()["steps"] == first[-1]["step"]
    assert live.row()["exact_after"] is None
    path = dashboard_files["live"] / "metrics.jsonl"
    before = path.read_text()
    try:
        path.write_text(before + dashboard_files["metrics_lines"][2] + "\n" + '{"step": 9, "lo')  # a half-written line
        assert live.metrics(after=2) == [json.loads(dashboard_files["metrics_lines"][2])]
    finally:
        path.write_text(before)


@pytest.mark.parametrize("bad", ["../base", "/etc", "lr-5e-3/../../base", "", "lr-5e-3/adapter", "nope", "escape"])
def test_nothing_outside_the_runs_root_is_read(dashboard_files, tmp_path, bad):  # noqa: F811
    root = tmp_path / "root"
    root.mkdir()
    (root / "escape").symlink_to(dashboard_files["runs"] / "lr-5e-3", target_is_directory=True)  # leads out
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.yaml").write_text("model: x\n")
    with pytest.raises(RunNotFound):
        RunIndex(root).get(bad)
    assert RunIndex(root).ids() == []


def test_config_diff_lists_only_what_differs(dashboard_files):  # noqa: F811
    index = RunIndex(dashboard_files["runs"])
    diff = {d["key"]: d["values"] for d in config_diff([index.get("lr-5e-3"), index.get("sweep/lr-2e-2")])}
    assert diff.pop("train.learning_rate") == [5e-3, 2e-2]
    assert set(diff) <= {"output_dir", "data.train", "data.eval"}  # each job has its own folder
    assert config_diff([index.get("lr-5e-3"), index.get("live")]) == []


def test_method_labels_and_registry_scores():
    assert method_label({"r": 8, "use_dora": True}, "nf4") == "QLoRA (nf4) + DoRA"
    assert method_label({"init_lora_weights": "pissa_niter_4", "use_rslora": True}, None) == "LoRA + rsLoRA + PiSSA"
    assert method_label({"peft_type": "IA3"}, None) == "IA3"
    metrics = {"job": {"base": {"exact_match": 0.0}, "adapter": {"exact_match": 0.5, "loss": 1.25, "perplexity": None},
                       "steps": 4}, "eval:eval.jsonl": {"loss": 2.0, "examples": 8}}
    assert version_scores(metrics) == [("job", "exact_match", 0.5), ("job", "loss", 1.25), ("eval:eval.jsonl", "loss", 2.0)]
