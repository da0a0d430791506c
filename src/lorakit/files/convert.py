"""`lorakit convert --allow-pickle`: a pickled adapter (adapter_model.bin, .pt, pytorch_model.bin) to
safetensors, once.

lorakit never unpickles a file it is handed; this is the one explicit, opt-in exception, and
it reads with `torch.load(weights_only=True)`, which runs no code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lorakit.errors import AdapterFileNotFoundError, AdapterWeightsError
from lorakit.files.format import CONFIG_NAME, PICKLE_NAMES, WEIGHTS_NAME, read_config, write_adapter


def convert_pickle(directory: str | os.PathLike) -> Path:
    """The pickle file `read_adapter` refused (any of PICKLE_NAMES) -> adapter_model.safetensors, with
    torch.load(weights_only=True) (no code runs)."""
    root = Path(directory)
    found = [root / name for name in PICKLE_NAMES if (root / name).is_file()]
    if not found:
        raise AdapterFileNotFoundError(f"{root} holds no pickled adapter ({', '.join(PICKLE_NAMES)}); nothing to convert.")
    if len(found) > 1:
        raise AdapterWeightsError(f"{root} holds {', '.join(p.name for p in found)}: which one is the adapter is "
                                  "ambiguous; move the others away and convert again.")
    source = found[0]
    state = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterWeightsError(f"{source} does not hold a flat dict of tensors; it is not an adapter.")
    config = read_config(root / CONFIG_NAME)
    write_adapter(root, config, state, {"lorakit.converted_from": source.name})
    return root / WEIGHTS_NAME
