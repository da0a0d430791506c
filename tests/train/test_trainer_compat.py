"""A lorakit model under a plain `transformers.Trainer` and under TRL's `SFTTrainer`."""

from __future__ import annotations

import datasets
import pytest
import torch

import lorakit
from chat_model import records
from lorakit.base_models import load_base, load_tokenizer
from lorakit.train.data import encode_record


def wrapped(chat_model_dir):
    torch.manual_seed(0)
    base = load_base(str(chat_model_dir))
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    return lorakit.get_peft_model(base, config), {k: v.clone() for k, v in base.state_dict().items() if "lora_" not in k}


def frozen_base_unchanged(model, before: dict) -> bool:
    after = model.get_base_model().state_dict()
    return all(torch.equal(after[k], v) for k, v in before.items())


def test_plain_transformers_trainer_trains_and_evaluates(tmp_path, chat_model_dir):
    from transformers import Trainer, TrainingArguments

    tokenizer = load_tokenizer(str(chat_model_dir))
    model, base_before = wrapped(chat_model_dir)
    rows = [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids), "source": "x"}
            for e in (encode_record(tokenizer, r, "prompt_completion") for r in records("prompt_completion"))]
    dataset = datasets.Dataset.from_list(rows)
    collate = lambda batch: {k: torch.tensor([b[k] for b in batch]) for k in ("input_ids", "attention_mask", "labels")}  # noqa: E731
    single = [rows[0]]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=1, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, eval_dataset=datasets.Dataset.from_list(single),
                      data_collator=collate)
    # Trainer reads our forward's signature: it keeps the model's columns and drops the stray one
    assert trainer._remove_unused_columns(dataset).column_names == ["input_ids", "labels", "attention_mask"]
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before  # the adapter learned; eval computed a loss (it finds `labels` in our signature)
    with torch.no_grad():
        direct = model(**collate(single)).loss.item()
    assert after == pytest.approx(direct, abs=1e-5)
    assert frozen_base_unchanged(model, base_before)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_trl_sft_trainer_trains_and_checkpoints_adapters_only(tmp_path, chat_model_dir):

    from trl import SFTConfig

    from lorakit.train.trl import LoraSFTTrainer

    tokenizer = load_tokenizer(str(chat_model_dir))
    model, base_before = wrapped(chat_model_dir)
    dataset = datasets.Dataset.from_list(records("prompt_completion"))
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                     report_to=[], use_cpu=True, logging_steps=1, save_steps=3, disable_tqdm=True,
                     bf16=False)  # TRL defaults to bf16 autocast, which accelerate wraps around forward for good
    trainer = LoraSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).any()  # TRL's completion-only loss
    with torch.no_grad():  # TRL's fused-head loss equals the plain loss of our model on the same batch
        fused = trainer.compute_loss(trainer.model, dict(batch)).item()
        plain = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                      labels=batch["labels"]).loss.item()
    assert fused == pytest.approx(plain, abs=1e-5)
    trainer.train()
    assert frozen_base_unchanged(model, base_before)
    checkpoint = tmp_path / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    reloaded = lorakit.PeftModel.from_pretrained(load_base(str(chat_model_dir)), checkpoint)
    ids = batch["input_ids"][:1]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)


def losses_of(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def bf16_run(tmp_path, chat_model_dir, fast: bool, sft: bool) -> list[float]:
    """Three bf16-autocast steps (accelerate wraps forward in CPU autocast), fast path on or off."""
    from transformers import Trainer, TrainingArguments

    tokenizer = load_tokenizer(str(chat_model_dir))
    model, _ = wrapped(chat_model_dir)
    model.set_fast_path(fast)
    common = dict(output_dir=str(tmp_path / f"{fast}"), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                  report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0)
    if sft:  # TRL's default config: bf16 on, nothing turned off
        from trl import SFTConfig

        from lorakit.train.trl import LoraSFTTrainer

        args = SFTConfig(**common)
        assert args.bf16
        trainer = LoraSFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(records("prompt_completion")),
                                 processing_class=tokenizer)
    else:
        rows = [{"input_ids": e.input_ids, "labels": e.labels}
                for e in (encode_record(tokenizer, r, "prompt_completion") for r in records("prompt_completion"))]
        from lorakit.train.batching import Collator

        trainer = Trainer(model=model, args=TrainingArguments(**common, bf16=True),
                          train_dataset=datasets.Dataset.from_list(rows), data_collator=Collator(tokenizer.pad_token_id))
    trainer.train()
    return losses_of(trainer)


@pytest.mark.parametrize("sft", [False, True], ids=["Trainer", "LoraSFTTrainer"])
def test_bf16_training_through_trainers_equals_the_reference_path(tmp_path, chat_model_dir, sft):
    """bf16 autocast, as GPU users train: the fused path trains and its losses follow the plain
    path's to bf16 resolution (loss ≈ 6, bf16 resolves ≈ 0.02 there; allowed 0.05)."""
    fast = bf16_run(tmp_path, chat_model_dir, fast=True, sft=sft)
    plain = bf16_run(tmp_path, chat_model_dir, fast=False, sft=sft)
    assert len(fast) == len(plain) == 3
    assert fast[-1] < fast[0]
    for a, b in zip(fast, plain, strict=True):
        assert abs(a - b) < 0.05, (fast, plain)
