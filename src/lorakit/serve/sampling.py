"""Sampling parameters per request, and the sampler.

Each request samples with its own `torch.Generator` (seeded by `seed`, or from the OS), so a
seeded request draws the same tokens whatever else shares its batch (tested). Greedy when
`temperature` is below 1e-5 (0 is the default, as in vLLM's offline API; vLLM also treats a
temperature that small as greedy: dividing by it overflows), else temperature → top-k → top-p
→ multinomial, in float32. top-p always keeps the most likely token, however small `top_p` is.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a torch.long, as vLLM bounds `seed`


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0: off
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: list[str] = Field(default_factory=list)  # stop strings (the text is cut before them)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False


def greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_BELOW


def generator_for(params: SamplingParams) -> torch.Generator | None:
    if greedy(params):
        return None
    gen = torch.Generator()
    gen.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return gen


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from one row of logits (vocab,)."""
    if greedy(params):
        return int(torch.argmax(logits).item())
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p  # the smallest set reaching top_p
        keep[0] = True  # a top_p that rounds to 0 in float32 still keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator).item())
