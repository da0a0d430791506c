"""`LoraTrainer`: HF Trainer, checkpointing adapters only, complete-or-ignored, resumable.

HF Trainer saves a model it does not know (ours is not a transformers `PreTrainedModel`)
as its full state dict — the frozen base included — and cannot resume from an adapter
file. `AdapterCheckpoints` changes three things and nothing else, for any Trainer subclass
(`LoraTrainer` = it + `transformers.Trainer`; `lorakit.train.trl.LoraSFTTrainer` = it + TRL's):

- a checkpoint holds the adapters in PEFT's format (plus Trainer's optimizer, scheduler,
  RNG and trainer state), so `checkpoint-N/` is also a loadable adapter;
- a checkpoint counts only once `lorakit-checkpoint.json` is written, last and atomically.
  A run killed mid-save leaves a folder without it, which `--resume` deletes and skips;
  older checkpoints are pruned only after the new one is complete;
- a checkpoint also holds every trainable parameter and the methods' step state
  (train_state.py: P-tuning's encoder, AdaLoRA's masks and scores — more than PEFT's file);
  resuming copies them into the live model (checked key by key and shape by shape; an older
  checkpoint without them: the PEFT files), then Trainer restores optimizer, scheduler, RNG
  and data order.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from transformers import Trainer

from lorakit.errors import AdapterWeightsError, ConfigError
from lorakit.files.format import adapter_dir, read_adapter, write_text_atomic
from lorakit.train.train_state import restore_train_state, save_train_state

COMPLETE_MARK = "lorakit-checkpoint.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class AdapterCheckpoints:
    """Mixin for a transformers Trainer whose `model` is a lorakit PeftModel."""

    def __init__(self, *args, keep_checkpoints: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.save_total_limit:
            raise ConfigError("lorakit prunes checkpoints itself (keep_checkpoints=K); leave save_total_limit unset.")
        self.keep_checkpoints = keep_checkpoints

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save the adapters (PEFT format, atomic per file), not the frozen base."""
        if self.args.should_save:
            self.model.save_pretrained(output_dir or self.args.output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)  # save_total_limit is unset: Trainer deletes nothing
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            save_train_state(self.model, folder)
            write_text_atomic(folder / COMPLETE_MARK, json.dumps({"step": self.state.global_step}) + "\n")
            prune_checkpoints(folder.parent, self.keep_checkpoints)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not restore_train_state(self.model, Path(resume_from_checkpoint)):
            restore_adapters(self.model, Path(resume_from_checkpoint))  # a checkpoint of an older lorakit

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Trainer restores the optimizer's saved learning rate, which is the schedule's value for the
        *old* step count; with more steps the first resumed step would run at it (≈0 after a decay)
        and the next jump. Set each group's rate from the restored schedule instead (the same value
        when the step count is unchanged)."""
        super()._load_optimizer_and_scheduler(checkpoint)
        scheduler = self.lr_scheduler
        if checkpoint is None or not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            return
        rates = [base * rule(scheduler.last_epoch) for base, rule in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
        for group, rate in zip(self.optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
        scheduler._last_lr = rates


class LoraTrainer(AdapterCheckpoints, Trainer):
    """`transformers.Trainer` with adapter-only, complete-or-ignored checkpoints; under DDP each
    rank trains on its own shard of the data, no example twice in an epoch (sharding.py)."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        """Packed rows (position_ids) carry an attention mask for Trainer's token count only: with it the model
        would attend across the examples of a row, so the forward gets the rows without it (batching.py)."""
        if "position_ids" in inputs:
            inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
        return super().compute_loss(model, inputs, *args, **kwargs)

    def get_train_dataloader(self):
        if self.args.world_size == 1:
            return super().get_train_dataloader()
        from lorakit.train.sharding import sharded_train_dataloader

        return sharded_train_dataloader(self)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Under DDP the main rank computes the one-process eval loss alone (sharding.py says why)."""
        if self.args.world_size == 1 or eval_dataset is not None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        from lorakit.train.sharding import main_rank_eval_loss

        metrics = {f"{metric_key_prefix}_loss": main_rank_eval_loss(self)} if self.args.process_index == 0 else {}
        if metrics:
            self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def checkpoints(run_dir: Path) -> tuple[list[Path], list[Path]]:
    """(complete, incomplete) checkpoint folders of a run, each sorted by step."""
    found = sorted((int(m.group(1)), p) for p in Path(run_dir).glob("checkpoint-*")
                   if p.is_dir() and (m := _CHECKPOINT.match(p.name)))
    complete = [p for _, p in found if (p / COMPLETE_MARK).is_file()]
    return complete, [p for _, p in found if not (p / COMPLETE_MARK).is_file()]


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete incomplete checkpoints and all but the newest `keep` complete ones."""
    complete, incomplete = checkpoints(run_dir)
    for folder in incomplete + complete[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)


def restore_adapters(model, folder: Path) -> None:
    """Copy every adapter saved in a checkpoint into the model's live adapter tensors."""
    for name in model.peft_config:
        files = read_adapter(adapter_dir(folder, name))
        live = model.base_model.live_tensors(name)
        if set(files.tensors) != set(live):
            difference = sorted(set(files.tensors) ^ set(live))[:4]
            raise AdapterWeightsError(f"{folder}: checkpoint of adapter {name!r} does not match the model ({difference}).")
        for key, tensor in live.items():  # every check before the first copy
            if files.tensors[key].shape != tensor.shape:
                raise AdapterWeightsError(
                    f"{folder}: {key} has shape {tuple(files.tensors[key].shape)}, the model {tuple(tensor.shape)}."
                )
        with torch.no_grad():
            for key, tensor in live.items():
                tensor.copy_(files.tensors[key])
