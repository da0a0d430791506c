"""`Step`: one engine step as one explicit object — the new tokens of every scheduled sequence end to end in
one packed row `[1, T]`, with everything the forward needs, built once (`build_step`):

- token ids and positions, and each token's adapter version (a per-token `Routing`);
- the KV plan: where each token's K/V goes in the paged cache, the decode tokens' block tables and
  length mask, the prefill chunks' blocks (attention.KVPlan), and the prefix slots whose keys and values
  an adapter supplies;
- the soft-prompt slots that take an adapter's embeddings instead of their placeholder ids';
- which positions reach the LM head: the last token of each chunk that ends at the sequence's last known
  token, and every prompt position of a chunk whose request asked for prompt logprobs (echo), with each
  chunk's rows among them (`spans`).

The runner (runner.py) runs it; nothing else about a step travels by side routes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.routing import Routing
from lorakit.serve.attention import KVPlan, PrefillChunk
from lorakit.serve.kv_cache import PagedKVCache
from lorakit.serve.scheduler import Plan, Scheduled
from lorakit.serve.virtual import VirtualTokens, place


@dataclass
class Step:
    plan: Plan
    input_ids: torch.Tensor  # (1, T)
    positions: torch.Tensor  # (1, T)
    routing: Routing  # one adapter version per token
    kv: KVPlan
    embed_rows: torch.Tensor | None  # (k,) packed indices that take a soft prompt's embedding
    embeds: torch.Tensor | None  # (k, hidden)
    keep: torch.Tensor  # packed positions whose logits are computed
    spans: list[tuple[int, int]]  # per scheduled chunk: (its first row among the kept logits, how many rows)


def build_step(plan: Plan, cache: PagedKVCache, virtual: VirtualTokens) -> Step:
    device = cache.k[0].device
    ids, positions, names, keep, prefills, spans = [], [], [], [], [], []
    blocks, offsets, decode_tokens, decode_tables, decode_lengths = [], [], [], [], []
    size = cache.block_size
    for item in plan:
        seq, start = item.seq, len(ids)
        span = range(item.start, item.start + item.count)
        ids += seq.tokens[item.start:item.start + item.count]
        positions += span
        names += [seq.version] * item.count
        blocks += [seq.blocks[p // size] for p in span]
        offsets += [p % size for p in span]
        if item.count == 1:
            decode_tokens.append(start)
            decode_tables.append(seq.blocks[: cache.blocks_for(item.start + 1)])
            decode_lengths.append(item.start + 1)
        else:
            table = seq.blocks[: cache.blocks_for(item.start + item.count)]
            prefills.append(PrefillChunk(start, item.count, item.start, torch.tensor(table, dtype=torch.long,
                                                                                     device=device)))
        first = len(keep)
        if wants_prompt_logprobs(item):
            keep += range(start, start + item.count)
        elif item.samples:
            keep.append(len(ids) - 1)
        spans.append((first, len(keep) - first))
    width = max((len(t) for t in decode_tables), default=0)
    tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], dtype=torch.long, device=device)
    lengths = torch.tensor(decode_lengths, dtype=torch.long, device=device)
    mask = (torch.arange(width * size, device=device)[None, :] < lengths[:, None])[:, None, None, :]
    placed = place(virtual, plan, size, device)
    kv = KVPlan(cache, torch.tensor(blocks, device=device), torch.tensor(offsets, device=device),
                torch.tensor(decode_tokens, dtype=torch.long, device=device), tables.view(len(decode_tables), width),
                mask, prefills, fixed=placed.fixed)
    embed_rows = torch.tensor(placed.embed_rows, device=device) if placed.embed_rows else None
    embeds = torch.stack(placed.embeds) if placed.embeds else None
    return Step(plan, torch.tensor([ids], device=device), torch.tensor([positions], device=device),
                Routing(names, per_token=True), kv, embed_rows, embeds,
                torch.tensor(keep, dtype=torch.long, device=device), spans)


def wants_prompt_logprobs(item: Scheduled) -> bool:
    """Whether this chunk computes prompt positions whose logprobs its request still needs."""
    seq = item.seq
    if seq.prompt_logprobs is None or len(seq.prompt_logprobs) >= len(seq.prompt_ids):
        return False
    return item.start < seq.adapter_slots + len(seq.prompt_ids)
