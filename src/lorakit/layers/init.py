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

import torch


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
