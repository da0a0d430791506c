"""`method:` in the job's YAML: which adapter method trains, and its section of config fields.

    method: adalora                 # lora (default) | ia3 | prompt_tuning | p_tuning | prefix_tuning | adalora | bottleneck
    adalora: {target_r: 4}          # that method's config fields, over the job's defaults for it

Each section takes the fields of the method's config class (PEFT's names); the keys given
override the job's defaults one by one, as `lora:` always did. What the job fills in itself:
AdaLoRA's `total_step` (the run's optimizer steps), and a TEXT-initialised soft prompt's
tokenizer (the model's own). Why these defaults: docs/benchmarks.md, "which method when".
"""

from __future__ import annotations

import math
from typing import Any

from lorakit.errors import ConfigError
from lorakit.methods.adalora.config import AdaLoraConfig
from lorakit.methods.bottleneck.config import BottleneckConfig
from lorakit.methods.ia3.config import IA3Config
from lorakit.methods.lora.config import LoraConfig
from lorakit.methods.p_tuning.config import PromptEncoderConfig
from lorakit.methods.prefix_tuning.config import PrefixTuningConfig
from lorakit.methods.prompt_tuning.config import PromptTuningConfig

DEFAULT_LORA: dict[str, Any] = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
# method → (config class, the job's defaults for its section)
METHODS: dict[str, tuple[type, dict[str, Any]]] = {
    "lora": (LoraConfig, DEFAULT_LORA),
    "ia3": (IA3Config, {}),  # PEFT's per-model targets (Llama: k_proj, v_proj, down_proj)
    # SAMPLE_VOCAB: real embeddings' scale (RANDOM draws N(0, 1), far above a trained embedding's)
    "prompt_tuning": (PromptTuningConfig, {"num_virtual_tokens": 20, "prompt_tuning_init": "SAMPLE_VOCAB"}),
    "p_tuning": (PromptEncoderConfig, {"num_virtual_tokens": 20, "encoder_hidden_size": 128}),
    "prefix_tuning": (PrefixTuningConfig, {"num_virtual_tokens": 20}),
    "adalora": (AdaLoraConfig, {"init_r": 12, "target_r": 8, "lora_alpha": 32, "target_modules": "all-linear"}),
    "bottleneck": (BottleneckConfig, {"architecture": "houlsby", "reduction_factor": 16}),
}
METHOD_NAMES = tuple(METHODS)


def section_values(method: str, given: dict[str, Any] | None) -> dict[str, Any]:
    """The method's section: the job's defaults with the given keys over them."""
    return {**METHODS[method][1], **(given or {})}


def adapter_config(method: str, section: dict[str, Any], model: str, total_steps: int | None) -> Any:
    """The method's config object from its section (errors prefixed with the section name)."""
    cls, _ = METHODS[method]
    fields = {k: v for k, v in section.items() if k != "task_type"}
    if method == "adalora" and fields.get("total_step") is None and total_steps is not None:
        fields["total_step"] = total_steps
    if method == "prompt_tuning" and fields.get("prompt_tuning_init") == "TEXT":
        fields.setdefault("tokenizer_name_or_path", model)
    try:
        return cls(task_type="CAUSAL_LM", **fields)
    except ConfigError as exc:
        raise ConfigError(f"{method}: {exc}") from None


def optimizer_steps(max_steps: int | None, epochs: float | None, examples: int, global_batch: int) -> int:
    """The run's optimizer steps (HF Trainer's count for an epochs run: ceil(examples / batch) per epoch)."""
    if epochs is None:
        return max_steps
    return max(1, math.ceil(math.ceil(examples / global_batch) * epochs))
