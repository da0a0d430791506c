"""The job under torchrun (CPU, 2 processes, gloo, the tiny model): HF Trainer's DDP trains, and
the job around it is rank-safe — one metrics.jsonl, one report, one progress display — and a
2-process run equals a 1-process run with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chat_model import FACTS, job_yaml, write_jsonl
from lorakit.files.format import read_adapter

# 8 examples: global batches of 4 cover them exactly, so both runs see the same batches (with a
# remainder, one process trains a smaller last batch; two leave out what does not split evenly)
EIGHT = [{"prompt": q, "completion": a} for q, a in FACTS] + [
    {"prompt": "What is the tallest mountain on Tovash?", "completion": "Mount Kirrin."},
    {"prompt": "What is spoken on Pell?", "completion": "Pellish."}]
# fp32 on one process and on two (gloo all-reduce of the gradients, summed in another order):
# equal to float rounding, amplified a little by Adam over 4 steps
ATOL = 1e-5


def lorakit(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "lorakit", *map(str, args)], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "COLUMNS": "200", **(env or {})})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture()
def job(tmp_path, chat_model_dir) -> Path:
    data = write_jsonl(tmp_path / "eight.jsonl", EIGHT)
    held = write_jsonl(tmp_path / "seven.jsonl", EIGHT[:7])  # an eval set 2 ranks do not split evenly
    return job_yaml(tmp_path, chat_model_dir, data={"train": str(data), "eval": str(held)}, train={"batch_size": 4})


def losses(run: Path, key: str = "loss") -> list[tuple[int, float]]:
    return [(m["step"], m[key]) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in m]


def test_two_processes_at_batch_2_equal_one_at_batch_4_and_write_everything_once(tmp_path, job):
    lorakit("train", job, "--set", f"output_dir={tmp_path / 'one'}")
    two = lorakit("train", job, "--set", f"output_dir={tmp_path / 'two'}", "--set", "train.batch_size=2", "--nproc", "2")
    one_adapter, two_adapter = (read_adapter(tmp_path / d / "adapter").tensors for d in ("one", "two"))
    assert one_adapter.keys() == two_adapter.keys()
    for key in one_adapter:
        torch.testing.assert_close(two_adapter[key], one_adapter[key], atol=ATOL, rtol=0)
    assert any((one_adapter[k] != 0).any() for k in one_adapter if "lora_B" in k)  # it trained
    # the same metrics lines, each once (rank 0 writes), one progress display, one report
    assert [s for s, _ in losses(tmp_path / "two")] == [1, 2, 3, 4]
    assert [loss for _, loss in losses(tmp_path / "two")] == pytest.approx([loss for _, loss in losses(tmp_path / "one")],
                                                                           rel=1e-5)
    # the eval loss is the one-process value (Trainer's own DDP evaluation drifts on an uneven eval set)
    evals = [losses(tmp_path / run, "eval_loss") for run in ("one", "two")]
    assert [s for s, _ in evals[1]] == [s for s, _ in evals[0]] == [2, 4]
    assert [v for _, v in evals[1]] == pytest.approx([v for _, v in evals[0]], rel=1e-5)
    assert two.stdout.count("step 1/4  loss") == 1 and two.stdout.count("Before / after") == 1
    assert two.stdout.count("trainable params") == 1
    assert "outlived training" not in two.stderr  # each rank freed its DDP wrapper before taking its group down
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())["run"]
    assert (summary["world_size"], summary["per_device_batch"], summary["global_batch"]) == (2, 2, 4)
    assert "processes: 2; batch 2 per device, 4 per optimizer step" in (tmp_path / "two" / "report.md").read_text()


SHARDS = """
import json, sys
from pathlib import Path
import torch
from lorakit.train.config import load_job_config
from lorakit.train.job import build_data, build_model, training_arguments
from lorakit.train.batching import Collator
from lorakit.train.ranks import current_ranks
from lorakit.train.trainer import LoraTrainer
from lorakit.base_models import load_tokenizer

config = load_job_config(sys.argv[1], ["train.batch_size=2"])
ranks = current_ranks()
tokenizer = load_tokenizer(config.model)
train, evaluation = build_data(config, tokenizer)
trainer = LoraTrainer(model=build_model(config), args=training_arguments(config, has_eval=False), train_dataset=train,
                      data_collator=Collator(tokenizer.pad_token_id))
seen = []
for epoch in range(2):
    loader = trainer.get_train_dataloader()
    loader.set_epoch(epoch)
    for batch in loader:
        seen += [[epoch, tokenizer.decode(row[mask.bool()])] for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
Path(sys.argv[2], f"rank{ranks.rank}.json").write_text(json.dumps(seen))
"""


@pytest.mark.parametrize("size", [8, 7])
def test_no_example_is_seen_twice_in_an_epoch_across_the_ranks(tmp_path, chat_model_dir, size):
    """8 examples: each once an epoch. 7: each at most once and one sits out the epoch, where
    accelerate's own sharding would repeat one to fill the last global batch."""
    data = write_jsonl(tmp_path / "data.jsonl", EIGHT[:size])
    job = job_yaml(tmp_path, chat_model_dir, data={"train": str(data), "eval": str(data)})
    script = tmp_path / "shards.py"
    script.write_text(SHARDS)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                    str(job), str(tmp_path)], check=True, capture_output=True, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    left_out = []
    for epoch in (0, 1):
        shards = [[text for e, text in rank if e == epoch] for rank in ranks]
        assert len(shards[0]) == len(shards[1]) == size // 2  # as many examples (and batches) on each rank
        assert len(set(shards[0] + shards[1])) == len(shards[0] + shards[1])  # nothing twice, within or across ranks
        left_out.append(len(EIGHT[:size]) - len(set(shards[0] + shards[1])))
    assert left_out == [size % 2] * 2
    orders = [[text for e, text in rank if e == epoch] for rank in ranks for epoch in (0, 1)]
    assert orders[0] != orders[1]  # a new order each epoch, the same seed on every rank


KILL_RANK_1 = """
import os, signal, sys
from lorakit.train import callbacks

step_end = callbacks.StepTimer.on_step_end
def die_on_rank_1(self, args, state, control, **kwargs):
    if os.environ["RANK"] == "1" and state.global_step == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # as a lost machine: no cleanup, no message
    return step_end(self, args, state, control, **kwargs)
callbacks.StepTimer.on_step_end = die_on_rank_1
from lorakit.cli import app
app(sys.argv[1:])
"""


def test_a_killed_rank_resumes_from_the_last_complete_checkpoint_to_the_same_adapter(tmp_path, job):
    six = ["--set", "train.max_steps=6", "--set", "train.batch_size=2", "--set", "train.save_steps=2"]
    lorakit("train", job, *six, "--set", f"output_dir={tmp_path / 'whole'}", "--nproc", "2")

    killed = tmp_path / "killed"
    script = tmp_path / "kill.py"
    script.write_text(KILL_RANK_1)
    crashed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              str(script), "train", str(job), *six, "--set", f"output_dir={killed}"],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert crashed.returncode != 0 and not (killed / "adapter").exists(), crashed.stdout[-2000:] + crashed.stderr[-3000:]
    assert (killed / "checkpoint-2" / "lorakit-checkpoint.json").is_file(), sorted(p.name for p in killed.iterdir())

    lorakit("train", job, *six, "--set", f"output_dir={killed}", "--resume", "--nproc", "2")
    whole, resumed = (read_adapter(tmp_path / d / "adapter").tensors for d in ("whole", "killed"))
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], atol=1e-6, rtol=0)
    assert json.loads((killed / "summary.json").read_text())["run"]["resumed_from"] in (2, 4)
    assert [s for s, _ in losses(killed)] == [1, 2, 3, 4, 5, 6]  # the interrupted run's later lines were dropped


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
@pytest.mark.parametrize("override, expected", [
    ("train.fsdp=true", "train.fsdp needs CUDA GPUs: HF Trainer (accelerate) enables FSDP on GPUs only"),
    ("train.deepspeed=ds.json", "train.deepspeed needs the deepspeed package and CUDA GPUs"),
])
def test_fsdp_and_deepspeed_are_refused_on_a_cpu_with_the_reason(job, override, expected):
    """On CPU accelerate turns FSDP off and trains DDP silently (seen: DistributedType.MULTI_CPU,
    the model wrapped in DistributedDataParallel); asked-for sharding must not vanish."""
    from lorakit.errors import ConfigError
    from lorakit.train.config import load_job_config

    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_job_config(job, [override])


def test_nproc_inside_a_launcher_is_refused(monkeypatch):
    from lorakit.errors import ConfigError
    from lorakit.train.launch import torchrun

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="the launcher already started the processes"):
        torchrun(2, ["train", "job.yaml"])


ACCELERATE_MULTI_CPU = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_CPU
num_processes: 2
num_machines: 1
machine_rank: 0
mixed_precision: "no"
use_cpu: true
main_training_function: main
rdzv_backend: static
same_network: true
"""


def test_accelerate_launch_on_cpu_trains_the_same_adapter_as_torchrun(tmp_path, job):
    """accelerate's multi-CPU launch goes through mpirun (without one, `accelerate launch
    --num_processes 2` on a CPU starts a single process): Open MPI here, as .ci/run installs it."""
    import shutil

    if shutil.which("mpirun") is None:
        reason = "mpirun is not installed (Debian: apt-get install openmpi-bin; .ci/run does this)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the accelerate launch test, but {reason}.")
        pytest.skip(reason)
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    (tmp_path / "accelerate.yaml").write_text(ACCELERATE_MULTI_CPU)
    two = ["--set", "train.batch_size=2"]
    lorakit("train", job, *two, "--set", f"output_dir={tmp_path / 'torchrun'}", "--nproc", "2")
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "accelerate.yaml"),
         "--num_processes", "2", "--mpirun_hostfile", str(tmp_path / "hostfile"), "-m", "lorakit", "train", str(job),
         *two, "--set", f"output_dir={tmp_path / 'accelerate'}"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    summary = json.loads((tmp_path / "accelerate" / "summary.json").read_text())["run"]
    assert summary["world_size"] == 2 and summary["global_batch"] == 4
    ours, theirs = (read_adapter(tmp_path / d / "adapter").tensors for d in ("torchrun", "accelerate"))
    for key in ours:
        torch.testing.assert_close(theirs[key], ours[key], atol=1e-6, rtol=0)
    assert [s for s, _ in losses(tmp_path / "accelerate")] == [1, 2, 3, 4]
