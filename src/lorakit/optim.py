"""Optimizers by name (torch's AdamW, bitsandbytes' variants) and LoRA+ parameter groups.

Paged optimizers (QLoRA §3) keep optimizer state in unified memory that CUDA pages to CPU
RAM when the GPU runs out — a GPU feature. Without CUDA there is nothing to page to, so
asking for one is an error that names the alternatives, never a silent substitute.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lorakit.errors import ConfigError, closest

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class for a name (see make_optimizer)."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"Unknown optimizer {name!r}; choose one of {OPTIMIZERS}.{closest(name, OPTIMIZERS)}")
    if name == "adamw":
        return torch.optim.AdamW
    import bitsandbytes as bnb

    if name == "adamw_8bit":
        return bnb.optim.AdamW8bit
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{name} pages optimizer state between GPU and CPU memory, and no CUDA device is present. "
            "On CPU use 'adamw' (or 'adamw_8bit' for 8-bit optimizer state)."
        )
    return bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.PagedAdamW32bit


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, **kwargs) -> torch.optim.Optimizer:
    """"adamw" (torch) | "adamw_8bit" (bitsandbytes) | "paged_adamw_8bit" / "paged_adamw_32bit" (CUDA only)."""
    return optimizer_class(name)(params, lr=lr, **kwargs)
