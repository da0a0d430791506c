"""The per-row hook: one call's inputs extended with each row's virtual tokens.

A batch may mix rows of several virtual-token adapters (of different lengths), rows of
layer adapters (LoRA, IA3: those act inside the layers, routing.py) and base rows. Every row
gets the same extended length, so the layers' per-row routing still sees one block per row:

    cache (P slots)      │ embeddings (N slots)     │ the row's own tokens (L)
    prefix rows: their   │ prompt rows: their soft  │
    keys/values, right-  │ prompt, right-aligned;   │
    aligned; else masked │ else masked              │

P and N are the longest prefix and soft prompt in the batch; a shorter one leaves masked
slots on its left. Positions are explicit: a row's own tokens start at its virtual-token count
(as when the row runs alone: PEFT's arange over prompt + input, or past the prefix in the
cache), its prompt at 0, masked slots at 0. Labels get -100 over the N slots (virtual
tokens have no label). So each row computes exactly what it computes alone (tests).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.errors import AdapterStateError
from lorakit.fused_loss import IGNORE_INDEX


@dataclass(frozen=True)
class RowTokens:
    """One row's virtual-token adapter: its encoder (`places`, `virtual_tokens()`) and config."""

    encoder: nn.Module
    config: Any


def cache_keyword(model: nn.Module) -> str:
    """transformers 5 renamed forward's `past_key_values` to `cache` (the old name warns)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _groups(rows: Sequence[RowTokens | None], places: str) -> list[tuple[RowTokens, list[int]]]:
    groups: dict[int, tuple[RowTokens, list[int]]] = {}
    for i, row in enumerate(rows):
        if row is not None and row.encoder.places == places:
            groups.setdefault(id(row.encoder), (row, []))[1].append(i)
    return list(groups.values())


def _dtype(model: nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", torch.float32)
    return dtype if dtype.is_floating_point else torch.float32


def extend_call(model: nn.Module, rows: Sequence[RowTokens | None], input_ids: torch.Tensor | None,
                labels: torch.Tensor | None, kwargs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None, dict]:
    """(input_ids, labels, kwargs) for `model` with every row's virtual tokens in place."""
    embeds = kwargs.pop("inputs_embeds", None)
    source = input_ids if input_ids is not None else embeds
    batch, length, device = source.shape[0], source.shape[1], source.device
    prompts, prefixes = _groups(rows, "inputs"), _groups(rows, "cache")
    offsets = torch.zeros(batch, dtype=torch.long, device=device)  # each row's virtual-token count
    masks = []
    if prefixes:
        cache, cache_mask = _prefix_cache(model, prefixes, batch, device, offsets)
        kwargs[cache_keyword(model)] = cache
        masks.append(cache_mask)
    width = max((row.encoder.virtual_tokens().shape[0] for row, _ in prompts), default=0)
    virtual_positions = None
    if prompts:
        if embeds is None:
            embeds = model.get_input_embeddings()(input_ids)
        virtual = embeds.new_zeros(batch, width, embeds.shape[-1])
        virtual_mask = torch.zeros(batch, width, dtype=torch.long, device=device)
        for row, idx in prompts:
            tokens = row.encoder.virtual_tokens().to(embeds.dtype)
            n = tokens.shape[0]
            index = torch.tensor(idx, device=device)
            virtual = virtual.index_put((index[:, None], torch.arange(width - n, width, device=device)[None]),
                                        tokens.expand(len(idx), -1, -1))
            virtual_mask[index, width - n:] = 1
            offsets[index] = n
        embeds, input_ids = torch.cat([virtual, embeds], dim=1), None
        masks.append(virtual_mask)
        virtual_positions = (torch.arange(width, device=device)[None] - (width - offsets)[:, None]).clamp_min(0)
        if labels is not None:
            labels = torch.cat([labels.new_full((batch, width), IGNORE_INDEX), labels], dim=1)
    if embeds is not None:
        kwargs["inputs_embeds"] = embeds
    mask = kwargs.get("attention_mask")
    mask = torch.ones(batch, length, dtype=torch.long, device=device) if mask is None else mask.long()
    kwargs["attention_mask"] = torch.cat([*masks, mask], dim=1)
    given = kwargs.get("position_ids")
    positions = (given if given is not None else torch.arange(length, device=device)[None]) + offsets[:, None]
    if virtual_positions is not None:
        positions = torch.cat([virtual_positions, positions], dim=1)
    kwargs["position_ids"] = positions
    return input_ids, labels, kwargs


def generate_extended(model: nn.Module, rows: Sequence[RowTokens | None], input_ids: torch.Tensor | None, args: tuple,
                      kwargs: dict) -> torch.Tensor:
    """generate() from the extended inputs: the embeddings go in as `inputs_embeds` behind one masked
    slot per cache slot (so generate's cache bookkeeping counts them), the prefix as the cache; the
    positions come from the attention mask (generate's rule). Returns input_ids + new tokens, as PEFT."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    if (kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1) > 1 or \
            (kwargs.get("num_return_sequences") or 1) > 1:
        raise AdapterStateError("generate with virtual-token adapters runs one sequence per row (num_beams=1, "
                                "num_return_sequences=1); repeat the rows instead.")
    _, _, call = extend_call(model, rows, input_ids, None, dict(kwargs))
    call.pop("position_ids")
    embeds = call.pop("inputs_embeds", None)
    if embeds is None:
        embeds = model.get_input_embeddings()(input_ids)
    cache = call.pop(cache_keyword(model), None)
    if cache is not None:
        embeds = torch.cat([embeds.new_zeros(embeds.shape[0], cache.get_seq_length(), embeds.shape[-1]), embeds], 1)
        generate_params = inspect.signature(model.prepare_inputs_for_generation).parameters
        call["cache" if "cache" in generate_params else "past_key_values"] = cache
    new_tokens = model.generate(*args, inputs_embeds=embeds, **call)
    return torch.cat([input_ids, new_tokens], dim=1) if input_ids is not None else new_tokens


def prefix_layers(tokens: torch.Tensor, config: Any) -> torch.Tensor:
    """A prefix's (n, layers·2·dim) table as (layers·2, n, heads, head_dim), token-major: layer l's keys at
    2l, its values at 2l + 1 (PEFT's order)."""
    heads = config.num_attention_heads
    return tokens.view(tokens.shape[0], config.num_layers * 2, heads, config.token_dim // heads).transpose(0, 1)


def _prefix_cache(model: nn.Module, prefixes: list[tuple[RowTokens, list[int]]], batch: int, device: torch.device,
                  offsets: torch.Tensor):
    """A transformers DynamicCache holding each prefix row's keys and values, right-aligned in P slots."""
    from transformers import DynamicCache

    config = prefixes[0][0].config
    layers, heads, head_dim = config.num_layers, config.num_attention_heads, config.token_dim // config.num_attention_heads
    slots = max(row.config.num_virtual_tokens for row, _ in prefixes)
    dtype = _dtype(model)
    keys = [torch.zeros(batch, heads, slots, head_dim, dtype=dtype, device=device) for _ in range(layers)]
    values = [torch.zeros_like(k) for k in keys]
    cache_mask = torch.zeros(batch, slots, dtype=torch.long, device=device)
    for row, idx in prefixes:
        n = row.config.num_virtual_tokens
        kv = prefix_layers(row.encoder.virtual_tokens().to(dtype), row.config).transpose(1, 2)  # (2L, heads, n, hd)
        index = torch.tensor(idx, device=device)
        where = (index[:, None, None], torch.arange(heads, device=device)[None, :, None],
                 torch.arange(slots - n, slots, device=device)[None, None, :])
        for layer in range(layers):
            keys[layer] = keys[layer].index_put(where, kv[2 * layer].expand(len(idx), -1, -1, -1))
            values[layer] = values[layer].index_put(where, kv[2 * layer + 1].expand(len(idx), -1, -1, -1))
        cache_mask[index, slots - n:] = 1
        offsets[index] = n
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cache = DynamicCache(config=text_config)
    for layer in range(layers):
        cache.update(keys[layer], values[layer], layer)
    return cache, cache_mask
