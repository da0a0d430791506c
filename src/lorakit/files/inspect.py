"""What an adapter directory holds, for `lorakit inspect` (humans) and `--json` (machines)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorakit.files.fingerprint import short_id
from lorakit.files.format import (
    CHECKSUM_KEY,
    CONFIG_NAME,
    WEIGHTS_NAME,
    read_adapter,
)
from lorakit.files.tensors import PREFIX
from lorakit.methods.table import method_of


def describe(directory: str | os.PathLike) -> dict:
    """Config, base, fingerprint, targets, ranks, sizes and per-tensor statistics (after all checks)."""
    files = read_adapter(directory)
    config = files.config
    summary = method_of(config).summarize({k.removeprefix(PREFIX): t for k, t in files.tensors.items()})
    stats = {
        key.removeprefix(PREFIX): {
            "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
            "mean_abs": float(t.float().abs().mean()) if t.numel() else 0.0,
            "std": float(t.float().std()) if t.numel() > 1 else 0.0,
            "max_abs": float(t.float().abs().max()) if t.numel() else 0.0,
        }
        for key, t in sorted(files.tensors.items())
    }
    root = Path(directory)
    return {
        "path": str(root),
        "config": config.to_dict(),
        "base_model": files.metadata.get("lorakit.base_model") or config.base_model_name_or_path,
        "fingerprint": short_id(files.fingerprint),
        "made_by": f"lorakit {files.metadata['lorakit.version']}" if "lorakit.version" in files.metadata else "not lorakit (PEFT?)",
        "created": files.metadata.get("lorakit.created"),
        "checksum": "verified" if CHECKSUM_KEY in files.metadata else "none recorded",
        "target_modules": summary["target_modules"],
        "ranks": summary["ranks"],
        "parameters": sum(t.numel() for t in files.tensors.values()),
        "size_bytes": sum(p.stat().st_size for p in (root / WEIGHTS_NAME, root / CONFIG_NAME)),
        "other_adapters": sorted(p.name for p in root.iterdir() if (p / CONFIG_NAME).is_file()),
        "tensors": stats,
    }


def config_line(adapter: dict) -> str:
    """One line for `lorakit inspect` and report.md: the method and the fields that say most about it."""
    kind = adapter.get("peft_type", "LORA")
    if kind == "LORA":
        return (f"LoRA r={adapter['r']}, alpha={adapter['lora_alpha']}, dropout {adapter['lora_dropout']}, targets "
                f"{adapter['target_modules']}, init {adapter['init_lora_weights']}"
                + (", DoRA" if adapter.get("use_dora") else "") + (", rsLoRA" if adapter.get("use_rslora") else ""))
    keys = {"IA3": ("target_modules", "feedforward_modules"),
            "ADALORA": ("init_r", "target_r", "lora_alpha", "total_step", "tinit", "tfinal", "target_modules"),
            "BOTTLENECK": ("architecture", "reduction_factor", "non_linearity", "residual"),
            "P_TUNING": ("num_virtual_tokens", "encoder_reparameterization_type", "encoder_hidden_size"),
            "PREFIX_TUNING": ("num_virtual_tokens", "prefix_projection"),
            }.get(kind, ("num_virtual_tokens", "prompt_tuning_init"))
    return f"{kind} " + ", ".join(f"{key}={adapter.get(key)}" for key in keys)


def to_json(info: dict) -> str:
    return json.dumps(info, indent=2)
