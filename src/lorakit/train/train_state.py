"""What a checkpoint holds beside the PEFT files, so every method resumes bit-exactly.

PEFT's adapter file is what a user loads, not always what training holds: P-tuning and a
projected prefix save their encoder's *output* (the virtual tokens), not the MLP / LSTM that
trains; AdaLoRA saves the kept triplets only, and neither the masks nor the allocator's
smoothed importance scores. A run resumed from the PEFT file alone would train something else.
So each checkpoint also gets `lorakit-train-state.safetensors`: every trainable parameter under
its model name, and what a method keeps across steps (its optional `resume_state` hook: AdaLoRA's
masks, rank pattern and scores). Safetensors only — a checkpoint is never unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorakit.errors import AdapterWeightsError
from lorakit.files.format import atomic_path
from lorakit.methods.table import method_of

STATE_FILE = "lorakit-train-state.safetensors"
_PARAM, _METHOD = "param/", "method/"


def save_train_state(model, folder: Path) -> None:
    """Write the trainable parameters and the methods' step state of `model` (a PeftModel) into `folder`."""
    tensors = {f"{_PARAM}{n}": p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    meta = {}
    for name, config in model.peft_config.items():
        hook = getattr(method_of(config), "resume_state", None)
        if hook is None:
            continue
        extra, meta[name] = hook(model.base_model.layers_holding(name), name, config, model.base_model.method_state)
        tensors.update({f"{_METHOD}{name}/{key}": t.detach().clone().contiguous() for key, t in extra.items()})
    with atomic_path(Path(folder) / STATE_FILE) as staged:
        save_file(tensors, staged, metadata={"lorakit.method_state": json.dumps(meta)})


def restore_train_state(model, folder: Path) -> bool:
    """Restore what `save_train_state` wrote (False: the checkpoint has none — an older run). Every key
    and shape is checked before the first copy."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads((handle.metadata() or {}).get("lorakit.method_state", "{}"))
        saved = {key: handle.get_tensor(key) for key in handle.keys()}
    live = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = {k.removeprefix(_PARAM): t for k, t in saved.items() if k.startswith(_PARAM)}
    if params.keys() != live.keys():
        difference = sorted(params.keys() ^ live.keys())[:4]
        raise AdapterWeightsError(f"{path}: the checkpoint's trainable parameters do not match the model ({difference}).")
    wrong = [k for k in live if params[k].shape != live[k].shape]
    if wrong:
        raise AdapterWeightsError(f"{path}: {wrong[0]} has shape {tuple(params[wrong[0]].shape)}, the model "
                                  f"{tuple(live[wrong[0]].shape)}.")
    with torch.no_grad():
        for key, param in live.items():
            param.copy_(params[key])
    for name, config in model.peft_config.items():
        hook = getattr(method_of(config), "restore_resume_state", None)
        if hook is not None and name in meta:
            prefix = f"{_METHOD}{name}/"
            extra = {k.removeprefix(prefix): t for k, t in saved.items() if k.startswith(prefix)}
            hook(model, model.base_model.layers_holding(name), name, config, model.base_model.method_state, extra,
                 meta[name])
    return True
