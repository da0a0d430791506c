"""Attention over the paged KV cache, plugged into transformers' attention interface.

The engine runs the model on one packed row `[1, T]`: the new tokens of every scheduled
sequence end to end (a prefill chunk, or one decode token), with per-token positions and
per-token adapter routing. transformers computes q, k, v and the rotary embedding as usual
and then calls the registered attention function; ours (`paged_attention`) writes this
step's k, v into each token's cache block, then attends:

- all decode tokens at once: their block tables gathered into (n, kv_heads, ctx, d), one SDPA
  call with a length mask;
- each prefill chunk on its own: its blocks up to its context, causal from its first position.

Outside an engine step (no `StepPlan` published) the same registered name behaves exactly as
"sdpa", mask included, so the model stays usable for `generate` and training in between.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lorakit.serve.kv_cache import PagedKVCache

NAME = "lorakit_paged"


@dataclass
class PrefillChunk:
    start: int  # first token of the chunk in the packed row
    length: int
    position: int  # the sequence position of its first token
    blocks: torch.Tensor  # block ids covering position + length tokens


@dataclass
class StepPlan:
    """Where every token of one packed step goes, built once per step and read by every layer."""

    cache: PagedKVCache
    write_blocks: torch.Tensor  # (T,) block of each new token
    write_offsets: torch.Tensor  # (T,) offset in that block
    decode_tokens: torch.Tensor  # (n,) packed indices of decode tokens
    decode_tables: torch.Tensor  # (n, max_blocks) block tables, padded with block 0
    decode_mask: torch.Tensor  # (n, 1, 1, max_blocks·block_size) True where a key is valid
    prefills: list[PrefillChunk]
    # cache slots whose keys and values are given, not computed (a prefix: serve/virtual.py):
    # (blocks, offsets, keys per layer, values per layer), written right after the step's own
    fixed: list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]] = field(default_factory=list)


_plan: ContextVar[StepPlan | None] = ContextVar("lorakit_step_plan", default=None)


@contextmanager
def step_plan(plan: StepPlan) -> Iterator[None]:
    token = _plan.set(plan)
    try:
        yield
    finally:
        _plan.reset(token)


def _gather(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """(…, kv_heads, blocks·block_size, d) from block ids of shape (…, nb): one index_select, then views."""
    *lead, nb = blocks.shape
    _, bs, heads, d = cache.shape
    gathered = cache.index_select(0, blocks.reshape(-1))  # (… · nb, bs, heads, d), token-major
    return gathered.view(*lead, nb * bs, heads, d).transpose(-2, -3)


def paged_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    plan = _plan.get()
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    k_cache, v_cache = plan.cache.k[module.layer_idx], plan.cache.v[module.layer_idx]
    k_cache[plan.write_blocks, plan.write_offsets] = key[0].transpose(0, 1).to(k_cache.dtype)
    v_cache[plan.write_blocks, plan.write_offsets] = value[0].transpose(0, 1).to(v_cache.dtype)
    for blocks, offsets, keys, values in plan.fixed:
        k_cache[blocks, offsets] = keys[module.layer_idx].to(k_cache.dtype)
        v_cache[blocks, offsets] = values[module.layer_idx].to(v_cache.dtype)
    q = query[0]  # (heads, T, d)
    out = q.new_empty(q.shape[1], q.shape[0], q.shape[2])  # (T, heads, d)
    if len(plan.decode_tokens):
        q_dec = q[:, plan.decode_tokens].transpose(0, 1).unsqueeze(2)  # (n, heads, 1, d)
        k = _gather(k_cache, plan.decode_tables).to(q.dtype)
        v = _gather(v_cache, plan.decode_tables).to(q.dtype)
        attended = F.scaled_dot_product_attention(q_dec, k, v, attn_mask=plan.decode_mask, scale=scaling,
                                                  enable_gqa=True)
        out[plan.decode_tokens] = attended[:, :, 0]
    for chunk in plan.prefills:
        context = chunk.position + chunk.length
        k = _gather(k_cache, chunk.blocks)[:, :context].unsqueeze(0).to(q.dtype)
        v = _gather(v_cache, chunk.blocks)[:, :context].unsqueeze(0).to(q.dtype)
        rows = torch.arange(chunk.position, context, device=q.device)
        mask = torch.arange(context, device=q.device)[None, :] <= rows[:, None]  # causal from its first position
        q_chunk = q[:, chunk.start:chunk.start + chunk.length].unsqueeze(0)
        attended = F.scaled_dot_product_attention(q_chunk, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
        out[chunk.start:chunk.start + chunk.length] = attended[0].transpose(0, 1)
    return out.unsqueeze(0), None


def paged_mask(*args, **kwargs):
    """No mask inside an engine step (the attention builds its own); sdpa's everywhere else."""
    return None if _plan.get() is not None else sdpa_mask(*args, **kwargs)


def register() -> str:
    """Register the attention under NAME with transformers (idempotent); returns NAME."""
    AttentionInterface.register(NAME, paged_attention)
    AttentionMaskInterface.register(NAME, paged_mask)
    return NAME
