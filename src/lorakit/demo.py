"""`lorakit demo`: LoRA on SmolLM2-135M-Instruct, end to end, in about a minute on a CPU.

Setup, train, compare — readable in order. The bundled data are made-up facts the base
model cannot know ("What is the capital of Veloria?"), so the generation before training
is visibly wrong and the one after visibly right. The full config-driven training job
(`lorakit train`) replaces this recipe.
"""

from __future__ import annotations

import random
import time
from importlib import resources

import torch
from rich.console import Console
from rich.table import Table

from lorakit import LoraConfig, get_peft_model
from lorakit.models import DEFAULT_MODEL, load_model
from lorakit.train.data import encode_prompt_completion, pad_batch, prompt_ids, read_jsonl


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    """Greedy answers, one prompt at a time (no padding subtleties in a demo)."""
    answers = []
    model.eval()
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt_ids(tokenizer, prompt)])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def run_demo(model_name: str = DEFAULT_MODEL, steps: int = 30, batch_size: int = 6, lr: float = 2e-3,
             shown: int = 4, seed: int = 0) -> dict:
    console = Console()
    torch.manual_seed(seed)
    rng = random.Random(seed)

    # 1. Setup: base model (converted and cached on first use), data, adapter.
    with console.status(f"Loading {model_name} (the first run converts the GGUF file, ~20 s)…"):
        base, tokenizer = load_model(model_name)
    examples = read_jsonl(resources.files("lorakit") / "data" / "demo.jsonl")
    encoded = [encode_prompt_completion(tokenizer, e["prompt"], e["completion"]) for e in examples]
    shown_examples = examples[:shown]
    questions = [e["prompt"] for e in shown_examples]
    before = generate_answers(base, tokenizer, questions)

    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    model.print_trainable_parameters()

    # 2. Train: plain AdamW on the adapter parameters only; loss on the answers only.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    started = time.perf_counter()
    for step in range(1, steps + 1):
        batch = pad_batch(rng.sample(encoded, batch_size), tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1 or step % 10 == 0 or step == steps:
            console.print(f"step {step:3d}/{steps}  loss {loss.item():.4f}")
    seconds = time.perf_counter() - started

    # 3. Compare: the same questions, base vs base + adapter.
    after = generate_answers(model, tokenizer, questions)
    table = Table(title=f"Before / after LoRA ({steps} steps, {seconds:.0f} s)")
    for column in ("question", "expected", "base model", "with adapter"):
        table.add_column(column, overflow="fold")
    for example, old, new in zip(shown_examples, before, after, strict=True):
        table.add_row(example["prompt"], example["completion"], old, new)
    console.print(table)
    correct = sum(e["completion"] in answer for e, answer in zip(shown_examples, after, strict=True))
    console.print(f"adapter answers containing the expected sentence: {correct}/{len(after)}")
    return {"before": before, "after": after, "final_loss": loss.item(), "seconds": seconds, "correct": correct}
