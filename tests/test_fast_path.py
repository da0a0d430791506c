"""The fast training path equals the plain reference path and PEFT: loss and every adapter
gradient, fp32, atol 1e-5 — tiny Llama and GPT-2, dropout off and on (same masks: both paths
draw them from the same seeded stream, in the same order), bias modes, several active
adapters, gradient checkpointing, and Trainer's num_items_in_batch."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from conftest import VOCAB, tiny_gpt2, tiny_llama, twin
from lorakit.fused_loss import linear_cross_entropy
from lorakit.methods.lora.layer import LoraLinear

ATOL = 1e-5
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def batch(seed: int = 3, rows: int = 3, seq: int = 9) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, seq), generator=gen)
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt without loss
    labels[0, -2:] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def step(model, inputs: dict, seed: int = 0, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, {name: grad}) of one training forward/backward with a seeded dropout stream."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**inputs, **kwargs)
    out.loss.backward()
    grads = {n.replace(".default", ""): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def assert_same(a, b) -> None:
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a.loss, out_b.loss, atol=ATOL, rtol=0)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=ATOL, rtol=0, msg=name)


def reference(model):
    ref = copy.deepcopy(model)
    ref.set_fast_path(False)
    return ref


@pytest.mark.parametrize("arch", BUILDERS)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_fast_path_equals_reference_and_peft(arch, dropout, bias):
    ours, theirs, _ = twin(BUILDERS[arch], r=4, lora_alpha=8, lora_dropout=dropout, bias=bias,
                           target_modules="all-linear")
    inputs = batch()
    fast = step(ours, inputs)
    assert fast[0].logits is None  # the fused loss ran: no full logits
    assert_same(fast, step(reference(ours), inputs))
    assert_same(fast, step(theirs, inputs))


def test_the_fused_lora_op_is_what_runs():
    ours, _, _ = twin(tiny_llama, r=4, lora_alpha=8, target_modules=["q_proj"])
    layer = ours.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear)
    out = layer(torch.randn(2, 5, 32, requires_grad=True))
    assert type(out.grad_fn).__name__ == "LoraLinearFunctionBackward"
    ours.set_fast_path(False)  # the model's switch, read by every layer from the adapter set
    assert type(layer(torch.randn(2, 5, 32)).grad_fn).__name__ != "LoraLinearFunctionBackward"


def test_several_active_adapters_stack_the_same_way():
    ours, theirs, _ = twin(tiny_llama, r=4, lora_alpha=8, target_modules="all-linear")
    second = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    ours.add_adapter("other", second)
    ours.set_adapter(["default", "other"])
    inputs = batch()
    assert_same(step(ours, inputs), step(reference(ours), inputs))


@pytest.mark.parametrize("arch", BUILDERS)
def test_gradient_checkpointing_on(arch):
    ours, theirs, _ = twin(BUILDERS[arch], r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear")
    for model in (ours, theirs):
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inputs = batch()
    fast = step(ours, inputs)
    assert_same(fast, step(reference(ours), inputs))
    assert_same(fast, step(theirs, inputs))


def test_num_items_in_batch_normalizes_like_transformers():
    ours, _, _ = twin(tiny_llama, r=4, lora_alpha=8, target_modules="all-linear")
    inputs = batch()
    assert_same(step(ours, inputs, num_items_in_batch=40), step(reference(ours), inputs, num_items_in_batch=40))


def test_linear_cross_entropy_against_torch_in_chunks(monkeypatch):
    """Chunk boundaries, a bias, rows without loss: equal to F.cross_entropy on full logits."""
    import lorakit.fused_loss as fused

    monkeypatch.setattr(fused, "CHUNK_ROWS", 3)  # 3 rows per chunk
    head = torch.nn.Linear(16, 50)
    head.requires_grad_(False)
    hidden = torch.randn(2, 11, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 11))
    labels[1, 3:7] = -100
    loss = linear_cross_entropy(hidden, head, labels)
    loss.backward()
    ours = hidden.grad.clone()
    hidden.grad = None
    logits = head(hidden)[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours, hidden.grad, atol=ATOL, rtol=0)


def test_eval_and_no_labels_keep_the_logits():
    ours, _, _ = twin(tiny_llama, r=4, lora_alpha=8, target_modules="all-linear")
    inputs = batch()
    ours.eval()
    assert ours(**inputs).logits is not None
    ours.train()
    assert ours(input_ids=inputs["input_ids"]).logits is not None
    with torch.no_grad():
        assert ours(**inputs).logits is not None
