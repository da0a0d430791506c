"""Built-in models: the offline default (SmolLM2-135M) and clear errors for unknown names."""

from __future__ import annotations

import copy
import time

import pytest
import torch

import lorakit
from lorakit.base_models import DEFAULT_MODEL, ModelNotFoundError, load_model, resolve_model_path


def test_unknown_model_name_says_what_is_accepted(tmp_path):
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct.*never downloads"):
        resolve_model_path(str(tmp_path / "nope"))


@pytest.fixture(scope="module")
def smollm2():
    return load_model(DEFAULT_MODEL)


@pytest.mark.slow
def test_default_model_is_cached_after_first_load(smollm2):
    started = time.perf_counter()
    path = resolve_model_path(DEFAULT_MODEL)
    model, tokenizer = load_model(DEFAULT_MODEL)
    assert (path / "model.safetensors").is_file()
    assert time.perf_counter() - started < 15  # the GGUF conversion takes ~20 s; the cache ~0.5 s
    assert model.config.num_hidden_layers == 30 and tokenizer.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_smollm2_parity_with_peft(smollm2, capsys):
    """r16 all-linear on the real model: same trainable count, logits and gradients as PEFT."""
    import peft

    base, tokenizer = smollm2
    settings = dict(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**settings))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**settings))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.print_trainable_parameters()
    theirs.print_trainable_parameters()
    mine, peft_line = capsys.readouterr().out.splitlines()
    assert mine == peft_line == "trainable params: 4,884,480 || all params: 139,399,488 || trainable%: 3.5039"
    batch = tokenizer(["LoRA adds a low-rank update.", "Hello"], return_tensors="pt", padding=True)
    for model in (ours, theirs):
        model(**batch, labels=batch["input_ids"]).loss.backward()
    # The fused LoRA op folds the scaling into addmm: the logits agree to float rounding; 1e-5 is the bar.
    torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=0)
    peft_grads = dict(theirs.named_parameters())
    # Gradients here reach |g| ≈ 8.5 after 30 layers, and the fast path (fused LoRA op, chunked loss) sums
    # in another order than PEFT: ~1e-6 relative per operation. The rounding a gradient carries is that of
    # the residual stream it was propagated through, so the bar is relative to the largest gradient:
    # 3e-5 of it (~2.5e-4). The first layers' q/k lora_A gradients (|g| ≈ 0.6, 28 layers of backward above
    # them) differ by up to 6.3e-5 in a full-suite run (alone: under 1e-5; most likely the kernels
    # summing in an order that follows the buffers' alignment), which a bar of 1e-5 of their own scale failed now
    # and then. A wrong gradient differs by its own size, three orders above. On failure: every parameter
    # over the bar, the worst first, with the difference and the bar (the numbers to judge a flake).
    scale = max(1.0, max(g.grad.abs().max().item() for g in peft_grads.values() if g.grad is not None))
    over = []
    for name, param in ours.named_parameters():
        if param.requires_grad:
            expected = peft_grads[name].grad
            atol = 3e-5 * scale
            difference = (param.grad - expected).abs().max().item()
            if not difference <= atol:
                over.append((difference / atol, name, difference, atol))
    assert not over, "gradients over the bar (ratio, name, max |difference|, bar): " + str(sorted(over, reverse=True)[:10])


def test_the_public_id_of_a_builtin_model_names_the_same_model():
    from lorakit.base_models import builtin_alias

    assert builtin_alias("HuggingFaceTB/SmolLM2-135M-Instruct") == DEFAULT_MODEL == builtin_alias(DEFAULT_MODEL)
    assert builtin_alias("HuggingFaceTB/other") is None


@pytest.mark.slow
def test_adapters_on_the_builtin_model_record_its_public_id_not_the_cache_path(smollm2, tmp_path):
    import json

    base, _ = smollm2
    model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model_path(saved["base_model_name_or_path"]) == resolve_model_path(DEFAULT_MODEL)
