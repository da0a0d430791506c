"""lorakit: parameter-efficient fine-tuning with PEFT's names and files, on our own engine."""

from lorakit import errors  # noqa: E402
from lorakit.base_models import load_base  # noqa: E402
from lorakit.footprint import footprint  # noqa: E402
from lorakit.methods.adalora.config import AdaLoraConfig  # noqa: E402
from lorakit.methods.bottleneck.config import BottleneckConfig  # noqa: E402
from lorakit.methods.config_fields import TaskType  # noqa: E402
from lorakit.methods.ia3.config import IA3Config  # noqa: E402
from lorakit.methods.lora.config import LoraConfig  # noqa: E402
from lorakit.methods.lora.loraplus import create_loraplus_optimizer  # noqa: E402
from lorakit.methods.p_tuning.config import PromptEncoderConfig  # noqa: E402
from lorakit.methods.prefix_tuning.config import PrefixTuningConfig  # noqa: E402
from lorakit.methods.prompt_tuning.config import PromptTuningConfig  # noqa: E402
from lorakit.model import PeftModel, get_peft_model  # noqa: E402
from lorakit.quant import prepare_model_for_kbit_training  # noqa: E402
from lorakit.routing import BASE_ADAPTER  # noqa: E402
from lorakit.tuner import LoraModel  # noqa: E402
from lorakit.version import __version__  # noqa: E402

__all__ = [
    "AdaLoraConfig",
    "BASE_ADAPTER",
    "BottleneckConfig",
    "IA3Config",
    "LoraConfig",
    "LoraModel",
    "PeftModel",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "TaskType",
    "create_loraplus_optimizer",
    "errors",
    "footprint",
    "get_peft_model",
    "load_base",
    "prepare_model_for_kbit_training",
    "__version__",
]
