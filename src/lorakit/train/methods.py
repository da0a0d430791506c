"""`method:` in the job's YAML: which adapter method trains, and its section of config fields.

    method: adalora                 # lora (default) | ia3 | prompt_tuning | p_tuning | prefix_tuning | adalora | bottleneck
    adalora: {target_r: 4}          # that method's config fields, over the job's defaults for it

Each section takes the fields of the method's config class (PEFT's names); the keys given
override the job's defaults one by one, as `lora:` always did. The sections, their defaults and
what the job fills in itself (AdaLoRA's `total_step`, a TEXT-initialised soft prompt's tokenizer)
come from the method table (methods/table.py; each method's `job_name`, `job_defaults`,
`job_fields`). Why these defaults: docs/benchmarks.md, "which method when".
"""

from __future__ import annotations

import math
from typing import Any

from lorakit.errors import ConfigError
from lorakit.methods.table import JOB_NAMES, LORA, job_method

DEFAULT_LORA: dict[str, Any] = LORA.job_defaults
METHOD_NAMES = JOB_NAMES  # the method table's (methods/table.py): a new method appears here by itself


def section_values(method: str, given: dict[str, Any] | None) -> dict[str, Any]:
    """The method's section: the job's defaults with the given keys over them."""
    return {**job_method(method).job_defaults, **(given or {})}


def adapter_config(method: str, section: dict[str, Any], model: str, total_steps: int | None) -> Any:
    """The method's config object from its section (errors prefixed with the section name)."""
    spec = job_method(method)
    fields = {k: v for k, v in section.items() if k != "task_type"}
    fill = getattr(spec, "job_fields", None)  # what the job knows: AdaLoRA's total_step, a TEXT prompt's tokenizer
    if fill is not None:
        fill(fields, model, total_steps)
    try:
        return spec.config_class(task_type="CAUSAL_LM", **fields)
    except ConfigError as exc:
        raise ConfigError(f"{method}: {exc}") from None


def optimizer_steps(max_steps: int | None, epochs: float | None, examples: int, global_batch: int) -> int:
    """The run's optimizer steps (HF Trainer's count for an epochs run: ceil(examples / batch) per epoch)."""
    if epochs is None:
        return max_steps
    return max(1, math.ceil(math.ceil(examples / global_batch) * epochs))
