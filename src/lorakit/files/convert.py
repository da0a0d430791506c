"""`lorakit convert --allow-pickle`: a pickled adapter (adapter_model.bin) to safetensors, once.

lorakit never unpickles a file it is handed; this is the one explicit, opt-in exception, and
it reads with `torch.load(weights_only=True)`, which runs no code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lorakit.errors import AdapterWeightsError
from lorakit.files.format import CONFIG_NAME, WEIGHTS_NAME, read_config, write_adapter


def convert_pickle(directory: str | os.PathLike) -> Path:
    """adapter_model.bin -> adapter_model.safetensors, with torch.load(weights_only=True) (no code runs)."""
    root = Path(directory)
    source = root / "adapter_model.bin"
    state = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterWeightsError(f"{source} does not hold a flat dict of tensors; it is not an adapter.")
    config = read_config(root / CONFIG_NAME)
    write_adapter(root, config, state, {"lorakit.converted_from": "adapter_model.bin"})
    return root / WEIGHTS_NAME
