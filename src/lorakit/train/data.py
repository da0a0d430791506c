"""Turning examples into token ids and labels, with the loss on the answer only.

A prompt/completion pair is rendered with the tokenizer's chat template (user turn plus
the assistant header), then the completion and the end-of-turn token are appended.
Prompt positions get label -100, so the loss (and the gradient) comes only from the
tokens the model should learn to produce.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

IGNORE_INDEX = -100  # what torch's cross-entropy skips


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The chat-formatted prompt, ending where the assistant's answer begins."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt_completion(tokenizer, prompt: str, completion: str) -> dict[str, list[int]]:
    head = prompt_ids(tokenizer, prompt)
    answer = tokenizer(completion + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return {"input_ids": head + answer, "labels": [IGNORE_INDEX] * len(head) + answer}


def pad_batch(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into tensors (labels padded with -100)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
