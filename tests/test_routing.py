"""Mixed-adapter batches: the fast paths against the plain reference, and a bank of 200 adapters.

The two implementations of `adapter_names` must agree (fp32, atol 1e-5): the plain path
(a GEMM pair per adapter group, gather/scatter per group) and the bucketed one (one bmm pair
per rank bucket, used on reusable routings under no_grad for decode-like shapes).
"""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from conftest import inputs_for, output_of, tiny_gpt2, tiny_llama
from lorakit.methods import AdapterLayer
from lorakit.routing import Routing, adapter_routing

ATOL = 1e-5


def _model(builder=tiny_llama, count: int = 5):
    base = builder()
    targets = [["q_proj", "v_proj", "down_proj"], ["k_proj", "up_proj"], "all-linear", ["q_proj"], ["o_proj", "v_proj"]]
    if builder is tiny_gpt2:
        targets = [["c_attn", "c_fc"], ["c_proj"], "all-linear", ["c_attn"], ["c_fc", "c_proj"]]
    model = None
    for i in range(count):
        config = lorakit.LoraConfig(r=(2, 8, 4, 3, 5)[i % 5], lora_alpha=(4, 3, 8, 1, 10)[i % 5], use_rslora=i % 2 == 1,
                                    target_modules=targets[i % 5], init_lora_weights=False)
        if model is None:
            model = lorakit.get_peft_model(copy.deepcopy(base), config, adapter_name="a0")
        else:
            model.add_adapter(f"a{i}", config)
    return model.eval(), base


def _run(model, inputs, routing):
    with torch.no_grad(), adapter_routing(routing):
        return output_of(model, inputs)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("seq", [1, 3, 9])  # decode-like (bucketed when reusable) and prefill-like
def test_fast_paths_equal_the_reference(builder, seq):
    model, base = _model(builder)
    names = ["a3", "__base__", "a0", "a4", "a1", "a3", "a2", "__base__", "a0"]
    inputs = inputs_for(base, batch=len(names), seq=seq)
    reference = _run(model, inputs, Routing(names, reusable=True, reference=True))
    bucketed = _run(model, inputs, Routing(names, reusable=True))
    torch.testing.assert_close(bucketed, reference, atol=ATOL, rtol=0)
    for row in (0, 1, 4):  # and each row equals its adapter alone
        if names[row] == "__base__":
            with torch.no_grad(), model.disable_adapter():
                alone = output_of(model, {k: v[row:row + 1] for k, v in inputs.items()})
        else:
            model.set_adapter(names[row])
            with torch.no_grad():
                alone = output_of(model, {k: v[row:row + 1] for k, v in inputs.items()})
        torch.testing.assert_close(bucketed[row:row + 1], alone, atol=ATOL, rtol=0)


def test_bucketed_path_is_used_only_where_it_pays():
    model, base = _model()
    layer = next(m for m in model.modules() if isinstance(m, AdapterLayer) and len(m.r) > 1)
    x = torch.randn(3, 1, layer.in_features)
    reusable, one_off = Routing(["a0", "a2", "a0"], reusable=True), Routing(["a0", "a2", "a0"])
    with torch.no_grad():
        assert layer.use_gathered(x, reusable) and not layer.use_gathered(x, one_off)
        assert not layer.use_gathered(torch.randn(3, 64, layer.in_features), reusable)  # prefill: grouped
    assert not layer.use_gathered(x, reusable)  # gradients on: stacks would not carry them


def test_reused_routing_caches_stacks_once_and_stays_correct_across_steps():
    model, base = _model()
    names = ["a2", "a0", "a4"]
    routing = Routing(names, reusable=True)
    inputs = inputs_for(base, batch=3, seq=1)
    first = _run(model, inputs, routing)
    cached = dict(routing._cache)
    second = _run(model, inputs, routing)
    assert torch.equal(first, second) and routing._cache.keys() == cached.keys()
    assert all(routing._cache[k] is cached[k] for k in cached)  # built once, reused


def test_a_bank_of_200_adapters_costs_only_their_own_weights():
    base = tiny_llama()
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(r=1, target_modules=["q_proj", "v_proj"]),
                                   adapter_name="t0")
    layers_before = {name: id(m) for name, m in model.named_modules() if isinstance(m, AdapterLayer)}
    for i in range(1, 200):
        model.add_adapter(f"t{i}", lorakit.LoraConfig(r=(1, 2, 4)[i % 3], target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    assert {name: id(m) for name, m in model.named_modules() if isinstance(m, AdapterLayer)} == layers_before
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    expected = sum(4 * (1, 2, 4)[i % 3] * (32 + 32 + 32 + 16) * 2 for i in range(1, 200)) + 4 * 1 * (64 + 48) * 2
    assert adapter_bytes == expected  # exactly A and B of every adapter, nothing duplicated
    # and the model holds nothing else: the base tensors plus A and B per (adapter, layer)
    assert len(model.state_dict()) == len(base.state_dict()) + 2 * 200 * len(layers_before)
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == base_bytes + adapter_bytes

    names = [f"t{i}" for i in range(200)]
    inputs = inputs_for(base, batch=200, seq=2)
    mixed = model.generate(**inputs, adapter_names=names, max_new_tokens=2, do_sample=False, pad_token_id=0)
    for row in (0, 57, 199):
        model.set_adapter(names[row])
        alone = model.generate(**{k: v[row:row + 1] for k, v in inputs.items()}, max_new_tokens=2, do_sample=False,
                               pad_token_id=0)
        width = alone.shape[1]  # a row that hit EOS alone stops; in the batch it is padded with 0
        assert torch.equal(mixed[row:row + 1, :width], alone) and not mixed[row, width:].any()
    model.delete_adapter("t57")
    assert {name: id(m) for name, m in model.named_modules() if isinstance(m, AdapterLayer)} == layers_before
    assert not any(".t57." in n for n, _ in model.named_parameters())
