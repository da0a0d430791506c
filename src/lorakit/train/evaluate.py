"""Before/after: the base model against base + adapter on the same eval examples.

For each side: loss and perplexity over the answer tokens (token-weighted, exactly the
training loss's definition), and — for examples that have a prompt and a reference answer —
greedy generations scored by exact match (equal after collapsing whitespace) and contains
match (the reference appears in the generation, ignoring case). The base side is the same
model inside `disable_adapter()`, so nothing is loaded twice. Works on any model with
PEFT's `disable_adapter()` (ours or PEFT's: the quality benchmark scores both with this code).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from lorakit.train.batching import Collator
from lorakit.train.config import EvalConfig
from lorakit.train.data import IGNORE_INDEX, Example


def normalize(text: str) -> str:
    return " ".join(text.split())


@torch.no_grad()
def answer_loss(model, examples: list[Example], pad_id: int, batch_size: int = 8) -> tuple[float, int]:
    """(mean loss per answer token, number of answer tokens)."""
    collate = Collator(pad_id)
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate([{"input_ids": e.input_ids, "labels": e.labels} for e in examples[start:start + batch_size]])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, -batch["input_ids"].shape[1]:]  # virtual tokens (soft prompts) come first
        targets = batch["labels"][:, 1:]
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum",
                                 ignore_index=IGNORE_INDEX)
        total += losses.item()
        count += int((targets != IGNORE_INDEX).sum())
    return total / max(count, 1), count


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy answers, left-padded batches (the generated text starts at the same column)."""
    answers = []
    pad_id = tokenizer.pad_token_id
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(chunk):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return answers


def score(model, tokenizer, examples: list[Example], max_new_tokens: int, batch_size: int = 8) -> dict:
    loss, tokens = answer_loss(model, examples, tokenizer.pad_token_id, batch_size)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "answer_tokens": tokens,
              "exact_match": None, "contains_match": None, "generated": 0}
    asked = [e for e in examples if e.prompt_ids and e.reference is not None]
    if asked:
        answers = generate(model, tokenizer, [e.prompt_ids for e in asked], max_new_tokens, batch_size)
        exact = [normalize(a) == normalize(e.reference) for a, e in zip(answers, asked, strict=True)]
        contains = [normalize(e.reference).casefold() in normalize(a).casefold() for a, e in zip(answers, asked, strict=True)]
        result |= {"exact_match": sum(exact) / len(asked), "contains_match": sum(contains) / len(asked),
                   "generated": len(asked), "answers": answers, "hits": list(zip(exact, contains, strict=True))}
    return result


def by_group(asked: list[Example], base: dict, adapter: dict) -> list[dict]:
    """Exact / contains match per `group` of the eval records (in order of appearance), when they have groups."""
    groups: dict[str, list[int]] = {}
    for i, example in enumerate(asked):
        if example.group is not None:
            groups.setdefault(example.group, []).append(i)
    return [{"group": name, "examples": len(rows),
             **{f"{side}_{metric}": sum(scores["hits"][i][k] for i in rows) / len(rows)
                for side, scores in (("base", base), ("adapter", adapter))
                for k, metric in enumerate(("exact_match", "contains_match"))}}
            for name, rows in groups.items()]


def compare(model, tokenizer, examples: list[Example], settings: EvalConfig | None = None) -> dict:
    """{"base": metrics, "adapter": metrics, "samples": [...]} for the same examples (the first
    `settings.max_examples`; defaults: the job's `eval:` section)."""
    settings = settings or EvalConfig()
    examples = examples[: settings.max_examples]
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
            base = score(model, tokenizer, examples, settings.max_new_tokens, settings.batch_size)
        adapter = score(model, tokenizer, examples, settings.max_new_tokens, settings.batch_size)
    finally:
        model.train(was_training)
    asked = [e for e in examples if e.prompt_ids and e.reference is not None]
    shown = []
    for i, example in enumerate(asked[: settings.samples]):
        shown.append({"prompt": example.question, "expected": example.reference,
                      "base": base["answers"][i], "adapter": adapter["answers"][i]})
    groups = by_group(asked, base, adapter) if asked else []
    for side in (base, adapter):
        side.pop("answers", None)
        side.pop("hits", None)
    return {"examples": len(examples), "base": base, "adapter": adapter, "samples": shown, "groups": groups}
