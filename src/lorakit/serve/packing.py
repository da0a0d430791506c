"""One engine step as one packed row: the new tokens of every scheduled sequence end to end.

For each scheduled chunk (a decode token, or a prefill chunk) this lays out its token ids,
positions and adapter version (one name per token: per-token routing), where each token's
K/V goes in the paged cache, the decode tokens' block tables and length mask, the prefill
chunks' blocks, and which positions reach the LM head: the last token of each chunk that
ends at the sequence's last known token, and every prompt position of a chunk whose request
asked for prompt logprobs (echo). Built in Python once per step and read by every layer
(attention.StepPlan, routing.Routing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.serve.attention import PrefillChunk, StepPlan
from lorakit.serve.kv_cache import PagedKVCache
from lorakit.serve.scheduler import Scheduled


@dataclass
class PackedStep:
    ids: list[int]
    positions: list[int]
    names: list[str]  # each token's adapter version
    keep: list[int]  # packed positions whose logits are computed
    spans: list[tuple[int, int]]  # per scheduled chunk: (its first row in `keep`, how many rows)
    plan: StepPlan


def pack(batch: list[Scheduled], cache: PagedKVCache) -> PackedStep:
    device = cache.k[0].device
    ids, positions, names, keep, prefills, spans = [], [], [], [], [], []
    blocks, offsets, decode_tokens, decode_tables, decode_lengths = [], [], [], [], []
    size = cache.block_size
    for item in batch:
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
    plan = StepPlan(cache, torch.tensor(blocks, device=device), torch.tensor(offsets, device=device),
                    torch.tensor(decode_tokens, dtype=torch.long, device=device),
                    tables.view(len(decode_tables), width), mask, prefills)
    return PackedStep(ids, positions, names, keep, spans, plan)


def wants_prompt_logprobs(item: Scheduled) -> bool:
    """Whether this chunk computes prompt positions whose logprobs its request still needs."""
    seq = item.seq
    if seq.prompt_logprobs is None or len(seq.prompt_logprobs) >= len(seq.prompt_ids):
        return False
    return item.start < seq.virtual + len(seq.prompt_ids)
