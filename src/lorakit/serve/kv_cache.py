"""A paged KV cache: fixed-size blocks handed out to sequences as they grow.

Per layer two tensors, K and V, of shape (num_blocks, block_size, kv_heads, head_dim),
preallocated once from a memory budget. Token-major inside a block, so a gather of a
sequence's blocks is already (tokens, heads, d) end to end: attention reads it as a view,
with no second copy (measured: the head-major layout cost a reshape copy per layer per step). A sequence owns a list of blocks (its block table);
token p of the sequence lives in block `table[p // block_size]` at offset `p % block_size`.
Blocks are allocated as a sequence grows and all freed when it finishes, is aborted or is
preempted — so memory follows the tokens actually held, not `max_model_len` per request
(vLLM's PagedAttention idea; the attention that reads these blocks is in attention.py).

Blocks are reference-counted so the choices of one request (`n`) share their prompt: `fork`
gives a new table the same full blocks (one more reference each) and a copy of the partly
filled last one, which the new sequence then writes on its own; a block is free again when its
last table lets go of it.
"""

from __future__ import annotations

import math

import torch


class PagedKVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low block ids first
        self._refs = [0] * num_blocks

    @staticmethod
    def bytes_per_block(num_layers: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * block_size * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def grow(self, table: list[int], tokens: int) -> bool:
        """Extend `table` to hold `tokens` tokens; False (and nothing taken) if there are not enough free blocks."""
        missing = self.blocks_for(tokens) - len(table)
        if missing > len(self._free):
            return False
        for _ in range(max(missing, 0)):
            block = self._free.pop()
            self._refs[block] = 1
            table.append(block)
        return True

    def release(self, table: list[int]) -> None:
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)
        table.clear()

    def fork(self, table: list[int], tokens: int) -> list[int] | None:
        """A table for a new sequence whose first `tokens` tokens are those of `table`: the full blocks
        shared, the partly filled last block copied (None, nothing taken, if no block is free for it)."""
        full, partial = divmod(tokens, self.block_size)
        if partial and not self._free:
            return None
        shared = table[:full]
        for block in shared:
            self._refs[block] += 1
        if not partial:
            return list(shared)
        copy = self._free.pop()
        self._refs[copy] = 1
        for layer in (*self.k, *self.v):
            layer[copy] = layer[table[full]]
        return [*shared, copy]
