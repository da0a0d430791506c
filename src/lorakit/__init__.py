"""lorakit: parameter-efficient fine-tuning with PEFT's names and files, on our own engine."""

from lorakit import errors
from lorakit.batching import BASE_ADAPTER
from lorakit.config import LoraConfig, TaskType
from lorakit.model import PeftModel, get_peft_model
from lorakit.tuner import LoraModel

__version__ = "0.1.0"

__all__ = [
    "BASE_ADAPTER",
    "LoraConfig",
    "LoraModel",
    "PeftModel",
    "TaskType",
    "errors",
    "get_peft_model",
    "__version__",
]
