"""Attention over the paged KV cache, plugged into transformers' attention interface.

The engine runs the model on one packed row `[1, T]`: the new tokens of every scheduled
sequence end to end (a prefill chunk, or one decode token), with per-token positions and
per-token adapter routing. transformers computes q, k, v and the rotary embedding as usual
and then calls the registered attention function; ours (`paged_attention`) writes this
step's k, v into each token's cache block, then attends:

- all decode tokens at once: their block tables gathered into (n, kv_heads, ctx, d), one SDPA
  call with a length mask;
- each prefill chunk on its own: its blocks up to its context, causal from its first position.

The backend is registered with transformers once (at import) and named on the model's config only for
the duration of an engine step (`paged`): between steps the config says what its owner chose. A forward
that reads the name during a step but is not part of it (another thread using the same model) is handed
to its owner's implementation, mask included.
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
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lorakit.serve.kv_cache import PagedKVCache

NAME = "lorakit_paged"


@dataclass
class PrefillChunk:
    start: int  # first token of the chunk in the packed row
    length: int
    position: int  # the sequence position of its first token
    blocks: torch.Tensor  # block ids covering position + length tokens


@dataclass
class KVPlan:
    """Where every token of one packed step goes in the paged cache and what it attends to; built once per
    step (serve/step.py) and read by every attention layer."""

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


_plan: ContextVar[KVPlan | None] = ContextVar("lorakit_kv_plan", default=None)
_owners_choice: dict[int, str] = {}  # id(config) → the implementation its owner chose, while a step runs


@contextmanager
def paged(config, plan: KVPlan) -> Iterator[None]:
    """One engine step's forward: this backend named on `config` and `plan` published, both undone after."""
    chosen = config._attn_implementation
    _owners_choice[id(config)] = chosen
    config._attn_implementation = NAME
    token = _plan.set(plan)
    try:
        yield
    finally:
        _plan.reset(token)
        config._attn_implementation = chosen
        _owners_choice.pop(id(config), None)


def _owners(config) -> str:
    return _owners_choice.get(id(config), "sdpa")


def _gather(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """(…, kv_heads, blocks·block_size, d) from block ids of shape (…, nb): one index_select, then views."""
    *lead, nb = blocks.shape
    _, bs, heads, d = cache.shape
    gathered = cache.index_select(0, blocks.reshape(-1))  # (… · nb, bs, heads, d), token-major
    return gathered.view(*lead, nb * bs, heads, d).transpose(-2, -3)


def paged_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    plan = _plan.get()
    if plan is None:  # not this step's forward: its owner's implementation (eager has no shared function: sdpa)
        forward = ALL_ATTENTION_FUNCTIONS.get(_owners(module.config), sdpa_attention_forward)
        return forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
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
    """No mask inside an engine step (the attention builds its own); the owner's everywhere else."""
    if _plan.get() is not None:
        return None
    config = kwargs.get("config")
    mask = ALL_MASK_ATTENTION_FUNCTIONS.get(_owners(config) if config is not None else "sdpa", sdpa_mask)
    return mask(*args, **kwargs)


AttentionInterface.register(NAME, paged_attention)  # once, at import
AttentionMaskInterface.register(NAME, paged_mask)
