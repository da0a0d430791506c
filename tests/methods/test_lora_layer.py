"""Adapted layers against plain PyTorch, and per-row routing against each row run alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from conftest import VOCAB, inputs_for, output_of, tiny_gpt2, tiny_llama
from lorakit.methods.lora.embedding import LoraEmbedding
from lorakit.methods.lora.layer import LoraLinear

ATOL = 1e-5


def _random_adapter(layer, name="a", r=3, alpha=6.0, **kwargs):
    layer.update_layer(name, r=r, lora_alpha=alpha, init_lora_weights=False, **kwargs)
    layer.set_adapter([name], trainable=True)
    return layer


def test_linear_equals_the_formula():
    torch.manual_seed(0)
    layer = _random_adapter(LoraLinear(nn.Linear(8, 5)))
    x = torch.randn(4, 8)
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    expected = F.linear(x, layer.base_layer.weight, layer.base_layer.bias) + 2.0 * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.delta_weight("a"), 2.0 * b @ a, atol=1e-6, rtol=0)


def test_conv1d_delta_is_stored_transposed():
    torch.manual_seed(0)
    layer = _random_adapter(LoraLinear(Conv1D(5, 8)))  # Conv1D(nf=out, nx=in)
    x = torch.randn(2, 3, 8)
    merged_out = x @ (layer.base_layer.weight + layer.delta_weight("a")) + layer.base_layer.bias
    torch.testing.assert_close(layer(x), merged_out, atol=ATOL, rtol=0)
    assert layer.delta_weight("a").shape == layer.base_layer.weight.shape == (8, 5)


def test_embedding_equals_the_formula():
    torch.manual_seed(0)
    layer = _random_adapter(LoraEmbedding(nn.Embedding(11, 6, padding_idx=0)), r=2, alpha=4.0)
    ids = torch.tensor([[0, 3, 10], [5, 5, 1]])
    weight = layer.base_layer.weight + layer.delta_weight("a")
    torch.testing.assert_close(layer(ids), weight[ids], atol=ATOL, rtol=0)


def test_embedding_default_init_is_a_no_op():
    layer = LoraEmbedding(nn.Embedding(11, 6))
    layer.update_layer("a", r=2, lora_alpha=2)
    layer.set_adapter(["a"], trainable=True)
    ids = torch.tensor([[1, 2]])
    assert torch.equal(layer(ids), layer.base_layer(ids))


def test_rslora_scaling_in_the_layer():
    layer = LoraLinear(nn.Linear(4, 4))
    layer.update_layer("a", r=16, lora_alpha=8, use_rslora=True)
    assert layer.scaling["a"] == 2.0


def test_dropout_only_on_the_lora_path():
    torch.manual_seed(0)
    layer = _random_adapter(LoraLinear(nn.Linear(8, 8)), lora_dropout=0.5).train()
    with layer_disabled(layer):
        x = torch.randn(64, 8)
        assert torch.equal(layer(x), layer.base_layer(x))  # base path is never dropped
    torch.manual_seed(1)
    noisy = layer(x)
    torch.manual_seed(1)
    mask = F.dropout(torch.ones_like(x), p=0.5, training=True)
    expected = layer.base_layer(x) + layer.lora_B["a"](layer.lora_A["a"](x * mask)) * layer.scaling["a"]
    torch.testing.assert_close(noisy, expected, atol=ATOL, rtol=0)


class layer_disabled:
    def __init__(self, layer):
        self.layer = layer

    def __enter__(self):
        self.layer.disable_adapters = True

    def __exit__(self, *exc):
        self.layer.disable_adapters = False


# -- per-row routing --------------------------------------------------------------------------
def _three_adapters(builder=tiny_llama):
    """Adapters of different rank, alpha, scaling and target sets on one base."""
    base = builder()
    linear = ["q_proj", "v_proj", "down_proj"] if builder is tiny_llama else ["c_attn", "c_fc"]
    other = ["k_proj", "up_proj", "embed_tokens"] if builder is tiny_llama else ["c_proj", "wte"]
    model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(
        r=8, lora_alpha=16, target_modules=linear, init_lora_weights=False))
    model.add_adapter("small", lorakit.LoraConfig(r=2, lora_alpha=7, target_modules=other, init_lora_weights=False))
    model.add_adapter("rs", lorakit.LoraConfig(r=4, lora_alpha=3, use_rslora=True, target_modules="all-linear",
                                               init_lora_weights=False))
    return model.eval(), base


def _alone(model, name, run, *args, **kwargs):
    """run(*args, **kwargs) with one adapter active (or with adapters disabled for __base__)."""
    if name == "__base__":
        with model.disable_adapter():
            return run(*args, **kwargs)
    model.set_adapter(name)
    return run(*args, **kwargs)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("batch", [1, 2, 5, 33])
def test_each_row_equals_its_adapter_alone(builder, batch):
    model, base = _three_adapters(builder)
    cycle = ["default", "small", "__base__", "rs"]
    names = [cycle[(i * 7 + batch) % 4] for i in range(batch)]
    inputs = inputs_for(base, batch=batch, seq=6)
    mixed = output_of(model, inputs, adapter_names=names)
    for name in set(names):
        rows = [i for i, n in enumerate(names) if n == name]
        alone = _alone(model, name, output_of, model, {k: v[rows] for k, v in inputs.items()})
        torch.testing.assert_close(mixed[rows], alone, atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("side", ["left", "right"])
def test_generation_per_row_equals_alone_with_padding(side):
    model, base = _three_adapters()
    names = ["rs", "__base__", "small", "default"]
    gen = torch.Generator().manual_seed(3)
    lengths = [5, 3, 6, 4]
    ids = torch.zeros(4, 6, dtype=torch.long)
    mask = torch.zeros(4, 6, dtype=torch.long)
    for i, n in enumerate(lengths):
        span = slice(6 - n, 6) if side == "left" else slice(0, n)
        ids[i, span] = torch.randint(1, VOCAB, (n,), generator=gen)
        mask[i, span] = 1
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    if side == "right":  # generation continues after the last real token only with left padding;
        ids, mask = ids[:, :3], mask[:, :3]  # for right padding, compare the equal-length prefix
        mask[:] = 1
    mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **settings)
    for i, name in enumerate(names):
        alone = _alone(model, name, model.generate, input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], **settings)
        assert torch.equal(mixed[i:i + 1], alone), name


def test_generation_with_beams_repeats_each_rows_adapter():
    model, base = _three_adapters()
    inputs = inputs_for(base, batch=2, seq=4)
    settings = dict(max_new_tokens=3, do_sample=False, num_beams=2, pad_token_id=0)
    mixed = model.generate(**inputs, adapter_names=["small", "rs"], **settings)
    for i, name in enumerate(["small", "rs"]):
        alone = _alone(model, name, model.generate, **{k: v[i:i + 1] for k, v in inputs.items()}, **settings)
        assert torch.equal(mixed[i:i + 1], alone)


def test_per_row_gradients_reach_only_the_rows_adapters():
    model, base = _three_adapters()
    model.train()
    model.set_adapter(["default", "small", "rs"])  # all trainable; the rows pick which one is used
    inputs = inputs_for(base, batch=2, seq=4)
    output_of(model, inputs, adapter_names=["small", "__base__"]).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".small" in n)
    assert all(g is None for n, g in grads.items() if ".rs" in n or ".default" in n)
