"""`save_pretrained`'s work: each adapter in PEFT's layout, with lorakit's metadata."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any

from torch import nn

from lorakit import __version__
from lorakit.errors import AdapterError
from lorakit.files.format import FINGERPRINT_KEY, adapter_dir, read_adapter, write_adapter
from lorakit.files.tensors import adapter_tensors
from lorakit.methods.registry import method_of


def save_adapters(base: nn.Module, configs: dict[str, Any], fingerprint: dict, directory: str | os.PathLike,
                  safe_serialization: bool = True, initial_dir: str | os.PathLike | None = None) -> None:
    """Write adapters ("default" at the root, others in subdirectories), atomically each.

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
        tensors = adapter_tensors(base, name, config)
        if initial_dir is not None:
            initial = read_adapter(adapter_dir(initial_dir, name))
            tensors, config = method_of(config).convert_weight_init(tensors, config, initial.tensors, initial.directory)
        write_adapter(adapter_dir(directory, name), config, tensors, metadata)
