"""Rows into batches: greedy packing of examples into rows (attention kept within each example)
and the collator that pads rows into tensors (packed rows keep their position_ids)."""

from __future__ import annotations

import torch

from lorakit.train.data import IGNORE_INDEX, Example


def pack(examples: list[Example], max_len: int) -> list[dict[str, list[int]]]:
    """Greedy first-fit packing into rows of at most `max_len` tokens.

    Each row carries position_ids that restart at 0 for every example. Given position_ids,
    no attention mask and no KV cache, transformers builds a block-diagonal causal mask from
    them (`find_packed_sequence_indices`), so no example attends to another (tested on Llama;
    a model whose attention ignores position_ids would leak). The first
    label of each example is -100: the shifted loss would otherwise predict it from the
    previous example's last token.
    """
    rows: list[dict[str, list[int]]] = []
    for example in sorted(examples, key=lambda e: -len(e.input_ids)):
        n = len(example.input_ids)
        row = next((r for r in rows if len(r["input_ids"]) + n <= max_len), None)
        if row is None:
            row = {"input_ids": [], "labels": [], "position_ids": []}
            rows.append(row)
        row["input_ids"] += example.input_ids
        row["labels"] += [IGNORE_INDEX] + example.labels[1:]
        row["position_ids"] += list(range(n))
    return rows


class Collator:
    """Right-pads a batch into tensors. Packed rows keep position_ids (their block-diagonal attention); their
    attention mask only tells HF Trainer which tokens are real, for its token count (tokens/s without the
    padding), and LoraTrainer takes it out before the forward, which must not see it (trainer.py)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        packed = "position_ids" in rows[0]
        positions = torch.zeros((len(rows), width), dtype=torch.long) if packed else None
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            mask[i, :n] = 1
            if packed:  # padding is a segment of its own: positions restart at 0
                positions[i, :n] = torch.tensor(row["position_ids"])
                positions[i, n:] = torch.arange(width - n)
        if packed:  # a KV cache (on by default in eval) would turn the packed-sequence detection off
            return {"input_ids": ids, "labels": labels, "position_ids": positions, "use_cache": False,
                    "attention_mask": mask}
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
