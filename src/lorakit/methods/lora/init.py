"""Initialisations that take A and B from the base weight, and move that part out of it.

PiSSA (Meng et al. 2024): the top-r singular triplets of W, W ≈ U_r S_r V_rᵀ, become the
adapter, A = √(S_r/s) V_rᵀ and B = U_r √(S_r/s), so s·BA is W's principal part; the base
keeps the residual W − s·BA. `pissa_niter_K` takes the triplets from K iterations of
randomized SVD (torch.svd_lowrank: fast, seeded by torch's RNG). OLoRA (Büyükakyüz 2024):
W = QR; B = Q[:, :r], A = R[:r]; the base keeps W − s·BA. Either way the wrapped model
starts exactly at the base model (up to float rounding), as with zero-initialised B.

Numbers and conventions are PEFT's (pissa_init / olora_init), so adapters match.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from lorakit.errors import AdapterWeightsError, ConfigError
from lorakit.methods.lora.config import LoraConfig


def is_weight_init(init) -> bool:
    """Whether an `init_lora_weights` value takes the adapter out of the base weight."""
    return isinstance(init, str) and (init.startswith("pissa") or init == "olora")


def weight_init_factors(weight: torch.Tensor, init: str, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) for `weight` (out, in), fp32."""
    weight = weight.float()
    if init == "olora":
        q, upper = torch.linalg.qr(weight)
        return upper[:r].contiguous(), q[:, :r].contiguous()
    if init == "pissa":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:  # pissa_niter_K
        u, s, v = torch.svd_lowrank(weight, r, niter=int(init.split("_niter_")[-1]))
        vh = v.t()
    root = torch.sqrt(s / scaling)
    return torch.diag(root) @ vh, u @ torch.diag(root)


def convert_weight_init(tensors: dict[str, torch.Tensor], config: LoraConfig, initial: dict[str, torch.Tensor],
                        source: Path) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """A PiSSA/OLoRA adapter as a plain LoRA adapter for the *original* base (PEFT's conversion).

    The trained model is W_res + s·BA and W = W_res + s·B0A0, so the update to W is
    s·(BA − B0A0) = s·[B | −B0][A ; A0]: rank 2r, with alpha doubled (×√2 under rsLoRA) to keep s.
    `initial` holds A0, B0: the adapter as saved right after initialisation.
    """
    if config.use_dora:
        raise ConfigError("A DoRA adapter cannot be converted this way: its magnitude was learned against W_res.")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ConfigError("Conversion with use_rslora=True and rank_pattern/alpha_pattern is not supported (as in PEFT).")
    out = dict(tensors)
    for key, tensor in tensors.items():
        if key.endswith((".lora_A.weight", ".lora_B.weight")):
            start = initial.get(key)
            if start is None or start.shape != tensor.shape:
                raise AdapterWeightsError(f"{source}: the initial adapter has no {key} of shape {tuple(tensor.shape)}; "
                                          "give the adapter saved right after initialisation, before training.")
            out[key] = torch.cat([tensor, start.to(tensor)], 0) if ".lora_A." in key else torch.cat([tensor, -start.to(tensor)], 1)
    converted = copy.deepcopy(config)
    converted.init_lora_weights = True
    converted.r *= 2
    converted.lora_alpha *= 2**0.5 if config.use_rslora else 2
    converted.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    converted.alpha_pattern = {k: 2 * v for k, v in config.alpha_pattern.items()}
    return out, converted
