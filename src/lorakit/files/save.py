"""`save_pretrained`'s work: each adapter in PEFT's layout, with lorakit's metadata."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import torch

from lorakit.errors import AdapterError
from lorakit.files.format import FINGERPRINT_KEY, adapter_dir, read_adapter, write_adapter
from lorakit.methods.table import method_of
from lorakit.version import __version__


def save_adapters(tensors_of: Callable[[str], dict[str, torch.Tensor]], configs: dict[str, Any], fingerprint: dict,
                  directory: str | os.PathLike, safe_serialization: bool = True,
                  initial_dir: str | os.PathLike | None = None) -> None:
    """Write adapters ("default" at the root, others in subdirectories), atomically each; `tensors_of(name)`
    gives an adapter's tensors under PEFT's names (the tuner's `saved_tensors`).

    `initial_dir`: where the adapters were saved right after initialisation; adapters that took
    part of the base weight (PiSSA/OLoRA) are then written for the original, untouched base
    (the method's `convert_weight_init`, PEFT's conversion).
    """
    if not safe_serialization:
        raise AdapterError("lorakit writes safetensors only (a pickle file can run code when loaded).")
    for name, config in configs.items():
        metadata = {
            "lorakit.version": __version__,
            "lorakit.created": datetime.now(UTC).isoformat(timespec="seconds"),
            "lorakit.base_model": config.base_model_name_or_path or "",
            FINGERPRINT_KEY: json.dumps(fingerprint),
        }
        tensors = tensors_of(name)
        if initial_dir is not None:
            initial = read_adapter(adapter_dir(initial_dir, name))
            tensors, config = method_of(config).convert_weight_init(tensors, config, initial.tensors, initial.directory)
        write_adapter(adapter_dir(directory, name), config, tensors, metadata)
