"""The training job (`lorakit train` / `lorakit eval`) and what it is built from; see job.py."""

from lorakit.train.trainer import AdapterCheckpoints, LoraTrainer

__all__ = ["AdapterCheckpoints", "LoraTrainer"]
