"""A paged KV cache: fixed-size blocks handed out to sequences as they grow.

Per layer two tensors, K and V, of shape (num_blocks, block_size, kv_heads, head_dim),
preallocated once from a memory budget. Token-major inside a block, so a gather of a
sequence's blocks is already (tokens, heads, d) end to end: attention reads it as a view,
with no second copy (measured: the head-major layout cost a reshape copy per layer per step). A sequence owns a list of blocks (its block table);
token p of the sequence lives in block `table[p // block_size]` at offset `p % block_size`.
Blocks are allocated as a sequence grows and all freed when it finishes, is aborted or is
preempted — so memory follows the tokens actually held, not `max_model_len` per request
(vLLM's PagedAttention idea; the attention that reads these blocks is in attention.py).
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
        table.extend(self._free.pop() for _ in range(max(missing, 0)))
        return True

    def release(self, table: list[int]) -> None:
        self._free.extend(reversed(table))
        table.clear()
