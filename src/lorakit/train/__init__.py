"""The training job (`lorakit train` / `lorakit eval`) and what it is built from; see job.py.

`LoraTrainer` and `AdapterCheckpoints` load HF Trainer (seconds), so they are imported on
first use: reading a config (`lorakit train --print-config`, `lorakit schema`) stays fast."""

__all__ = ["AdapterCheckpoints", "LoraTrainer"]


def __getattr__(name: str):
    if name in __all__:
        from lorakit.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'lorakit.train' has no attribute {name!r}")
