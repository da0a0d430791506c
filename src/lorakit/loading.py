"""What a model implies for an adapter's config, and how saved adapters are read for loading.

`resolve_config` fills in what the model says (its name, PEFT's classification-head rule);
`LoadOptions` is PEFT's loading keywords (`subfolder`, `config`, `autocast_adapter_dtype`,
`torch_device`, `low_cpu_mem_usage`) with the meaning each can have here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.files.fingerprint import verify_base_fingerprint
from lorakit.files.format import AdapterFiles, read_adapter
from lorakit.files.tensors import LoadPlan, plan_load
from lorakit.methods.lora.config import LoraConfig
from lorakit.methods.table import METHODS, method_of
from lorakit.targets import SEQ_CLS_HEADS, expand_all_linear


def name_or_path(model: nn.Module) -> str | None:
    """Where a transformers model was loaded from (its config's _name_or_path), if known."""
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def resolve_config(model: nn.Module, peft_config: Any, model_task: str | None = None) -> Any:
    """A private copy of the config with what the model implies filled in.

    - base_model_name_or_path from the model's config, when not set;
    - PEFT's classification rule: in a SEQ_CLS model every adapter trains the head
      ("classifier"/"score") as a saved copy; PEFT also writes both names into files, so the
      one the model does not have is dropped (as PEFT ignores it);
    - what the method fills in from the model (its `prepare_config`).
    """
    known = {method.config_class for method in METHODS.values()}
    if type(peft_config) not in known:
        raise ConfigError(f"Expected a lorakit adapter config ({', '.join(sorted(c.__name__ for c in known))}), "
                          f"got {type(peft_config).__name__}.")
    config = copy.deepcopy(peft_config)
    union = expand_all_linear(model, config) if hasattr(config, "target_modules") else None
    if union is not None:
        config.target_modules = union
    method_of(config).prepare_config(model, config)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = name_or_path(model)
    present = [h for h in SEQ_CLS_HEADS if isinstance(getattr(model, h, None), nn.Module)]
    wanted = [m for m in (config.modules_to_save or []) if m not in SEQ_CLS_HEADS or m in present]
    if "SEQ_CLS" in (config.task_type, model_task):
        wanted += present
    config.modules_to_save = list(dict.fromkeys(wanted)) or None
    return config


@dataclass
class LoadOptions:
    """PEFT's loading keywords, with the meaning each can have here.

    - `subfolder`: the adapter lies in `model_id/subfolder`.
    - `config`: a LoraConfig used instead of the file's (the file is still checked whole).
    - `autocast_adapter_dtype`: fp16/bf16 adapter weights become fp32 (default, as PEFT); False keeps them.
    - `torch_device`: accepted; adapter weights always go to their base layer's device (PEFT moves
      them there too after loading).
    - `low_cpu_mem_usage`: accepted; loading never allocates a throwaway initialisation anyway.
    """

    subfolder: str | None = None
    config: Any = None
    autocast_adapter_dtype: bool = True
    torch_device: str | torch.device | None = None
    low_cpu_mem_usage: bool = False

    @classmethod
    def of(cls, options: dict) -> LoadOptions:
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(f"Unknown loading option(s) {unknown}; lorakit takes {known} (PEFT's names).")
        return cls(**options)

    def read(self, model_id, is_trainable: bool, verify_integrity: bool) -> tuple[AdapterFiles, LoraConfig]:
        directory = Path(model_id) / self.subfolder if self.subfolder else model_id
        files = read_adapter(directory, verify_integrity=verify_integrity)
        config = copy.deepcopy(self.config if self.config is not None else files.config)
        config.inference_mode = not is_trainable  # PEFT's rule: loaded adapters are frozen unless asked
        return files, config


def checked_load(model: nn.Module, fingerprint: dict, model_id, is_trainable: bool, verify_base: bool,
                 verify_integrity: bool, peft_options: dict, model_task: str | None = None) -> tuple[Any, LoadPlan]:
    """(config, plan) for loading a saved adapter onto `model`: read and checked whole — integrity,
    the base fingerprint, every tensor against the model — before anything changes."""
    options = LoadOptions.of(peft_options)
    files, config = options.read(model_id, is_trainable, verify_integrity)
    config = resolve_config(model, config, model_task)
    verify_base_fingerprint(files, fingerprint, name_or_path(model), verify_base)
    return config, plan_load(model, config, files.tensors, files.directory, options.autocast_adapter_dtype)
