"""Virtual-token adapters (prompt tuning, P-tuning, prefix tuning) in the engine's packed steps.

A sequence whose adapter adds n virtual tokens holds n leading slots (`Sequence.adapter_slots`)
at positions 0..n-1, before its prompt — the positions PEFT gives them (its prompt starts
at n). The slots go through the scheduler, the paged cache and preemption like any token;
what differs is what fills them, placed here for each step (step.py puts it in the `Step`):

- a soft prompt's slots take its embeddings in place of the placeholder ids' (`embed_rows`);
- a prefix's slots take its keys and values in every layer's cache, written by the attention
  right after the step's own (`KVPlan.fixed`), so the placeholders' keys never count.

So soft-prompted, prefixed, LoRA, IA3 and base requests share one packed forward, each as
it runs alone (tests/serve/test_engine_methods.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.methods.virtual_tokens.inputs import prefix_layers
from lorakit.serve.scheduler import Plan


@dataclass
class Placed:
    embed_rows: list[int] = field(default_factory=list)  # packed indices that take a soft prompt's embedding
    embeds: list[torch.Tensor] = field(default_factory=list)  # (hidden,) each
    fixed: list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]] = field(default_factory=list)


class VirtualTokens:
    """The model's virtual-token adapters as the engine needs them, computed once per adapter version."""

    def __init__(self, model) -> None:
        self.model = model
        self._by_version: dict[str, tuple[str, torch.Tensor, Any] | None] = {}

    def lookup(self, version: str) -> tuple[str, torch.Tensor, Any] | None:
        if version not in self._by_version:
            self._by_version = {v: x for v, x in self._by_version.items() if v in self.model.peft_config}
            self._by_version[version] = self.model.virtual_tokens(version)
        return self._by_version[version]

    def count(self, version: str) -> int:
        found = self.lookup(version)
        return 0 if found is None else found[1].shape[0]


def place(virtual: VirtualTokens, plan: Plan, block_size: int, device: torch.device) -> Placed:
    """What fills the adapter slots computed in this step: soft-prompt embeddings by packed index, prefix keys
    and values by cache slot."""
    placed, packed = Placed(), 0
    for item in plan:
        seq = item.seq
        first, last = item.start, min(item.start + item.count, seq.adapter_slots)
        if first < last:
            places, tokens, config = virtual.lookup(seq.version)
            positions = list(range(first, last))
            if places == "inputs":
                placed.embed_rows += [packed + p - item.start for p in positions]
                placed.embeds += [tokens[p] for p in positions]
            else:
                kv = prefix_layers(tokens, config)[:, positions]  # (2L, k, heads, hd), token-major
                blocks = torch.tensor([seq.blocks[p // block_size] for p in positions], device=device)
                offsets = torch.tensor([p % block_size for p in positions], device=device)
                placed.fixed.append((blocks, offsets, list(kv[0::2]), list(kv[1::2])))
        packed += item.count
    return placed
