"""lorakit: parameter-efficient fine-tuning with PEFT's names and files, on our own engine.

Every method's config class (LoraConfig, IA3Config, AdaLoraConfig, …) is exported from the method
table (methods/table.py), so a new method's config is public the moment the table names it.
"""

from lorakit import errors
from lorakit.base_models import load_base
from lorakit.footprint import footprint
from lorakit.methods.config_fields import TaskType
from lorakit.methods.lora.loraplus import create_loraplus_optimizer
from lorakit.methods.table import METHODS
from lorakit.model import PeftModel, get_peft_model
from lorakit.quant import prepare_model_for_kbit_training
from lorakit.routing import BASE_ADAPTER
from lorakit.tuner import AdapterModel, LoraModel
from lorakit.version import __version__

_CONFIGS = {method.config_class.__name__: method.config_class for method in METHODS.values()}
globals().update(_CONFIGS)  # lorakit.LoraConfig, lorakit.IA3Config, …

__all__ = [
    *sorted(_CONFIGS),
    "AdapterModel",
    "BASE_ADAPTER",
    "LoraModel",
    "PeftModel",
    "TaskType",
    "create_loraplus_optimizer",
    "errors",
    "footprint",
    "get_peft_model",
    "load_base",
    "prepare_model_for_kbit_training",
    "__version__",
]
