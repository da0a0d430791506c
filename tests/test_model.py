"""PeftModel behaviour: freezing, switching, disabling, merging, unloading, routing, errors."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from conftest import inputs_for, output_of, tiny_bert_classifier, tiny_gpt2, tiny_llama
from lorakit.errors import AdapterNameError, AdapterStateError, MergeError, RoutingError, TargetModulesError


def wrapped(builder=tiny_llama, **config):
    config.setdefault("target_modules", "all-linear")
    config.setdefault("init_lora_weights", False)  # random B: adapters visibly change outputs
    base = builder()
    return lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**config)), base


def base_weights(model):
    return {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}


def test_base_is_frozen_and_only_adapters_train():
    model, _ = wrapped(r=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_default_init_starts_at_the_base_model():
    model, base = wrapped(r=4, init_lora_weights=True)
    inputs = inputs_for(base)
    assert torch.equal(output_of(model, inputs), output_of(base, inputs))
    for layer in model.base_model.adapter_layers():
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        assert torch.count_nonzero(layer.lora_A["default"].weight) > 0


def test_gaussian_init_draws_a_with_std_one_over_r():
    model, _ = wrapped(r=4, init_lora_weights="gaussian")
    a = torch.cat([m.lora_A["default"].weight.flatten() for m in model.base_model.adapter_layers()])
    assert abs(a.std().item() - 0.25) < 0.03


def test_disable_adapter_and_unload_give_base_output_bit_for_bit():
    model, base = wrapped(r=4)
    inputs = inputs_for(base)
    expected = output_of(base, inputs)
    assert not torch.allclose(output_of(model, inputs), expected)
    with model.disable_adapter():
        assert torch.equal(output_of(model, inputs), expected)
    assert not torch.allclose(output_of(model, inputs), expected)  # re-enabled after the block
    plain = model.unload()
    assert torch.equal(output_of(plain, inputs), expected)
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_merge_then_unmerge_restores_weights():
    model, base = wrapped(r=4)
    inputs = inputs_for(base)
    before_weights, before_out = base_weights(model), output_of(model, inputs)
    model.merge_adapter()
    torch.testing.assert_close(output_of(model, inputs), before_out, atol=1e-5, rtol=0)
    changed = base_weights(model)
    assert any(not torch.equal(changed[k], before_weights[k]) for k in before_weights)
    model.unmerge_adapter()
    for key, value in base_weights(model).items():
        torch.testing.assert_close(value, before_weights[key], atol=1e-6, rtol=0, msg=key)


def test_merging_twice_is_refused_and_changes_nothing():
    model, _ = wrapped(r=4)
    model.merge_adapter()
    merged = base_weights(model)
    with pytest.raises(AdapterStateError, match="already merged"):
        model.merge_adapter()
    with pytest.raises(AdapterStateError):
        model.merge_adapter(["default"])
    assert all(torch.equal(v, merged[k]) for k, v in base_weights(model).items())


def test_safe_merge_refuses_non_finite_and_rolls_back_every_layer():
    model, _ = wrapped(r=4)
    before = base_weights(model)
    layers = model.base_model.adapter_layers()
    with torch.no_grad():
        layers[-1].lora_B["default"].weight[0, 0] = float("nan")  # the last layer merged fails
    with pytest.raises(MergeError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    assert all(not layer.merged_adapters for layer in layers)
    assert all(torch.equal(v, before[k]) for k, v in base_weights(model).items())


def test_quantized_base_wraps_trains_and_refuses_merge_without_changing_anything():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))  # float, then 4-bit
    quant = bnb.nn.Linear4bit(16, 16, compute_dtype=torch.float32, quant_type="nf4")
    quant.load_state_dict(net[1].state_dict())
    net[1] = quant.to("cpu")
    model = lorakit.get_peft_model(net, lorakit.LoraConfig(target_modules=["0", "1"], init_lora_weights=False))
    x = torch.randn(2, 16)
    first, second = model.base_model.model
    hidden = first.base_layer(x) + first.adapter_output(x, "default")
    expected = second.base_layer(hidden) + second.adapter_output(hidden, "default")
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)
    model(x).sum().backward()
    assert second.lora_A["default"].weight.grad is not None
    float_weight = first.base_layer.weight.detach().clone()
    with pytest.raises(MergeError, match="quantized"):
        model.merge_and_unload()
    assert torch.equal(first.base_layer.weight, float_weight) and not first.merged_adapters


def test_merge_and_unload_keeps_outputs_and_returns_plain_model():
    model, base = wrapped(tiny_gpt2, r=4, target_modules=["c_attn", "c_fc"])
    inputs = inputs_for(base)
    expected = output_of(model, inputs)
    plain = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, lorakit.methods.AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(output_of(plain, inputs), expected, atol=1e-5, rtol=0)


def test_set_adapter_switches_and_only_active_adapter_trains():
    model, base = wrapped(r=4)
    model.add_adapter("second", lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    assert model.active_adapters == ["default"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".second." in n)
    inputs = inputs_for(base)
    first = output_of(model, inputs)
    model.set_adapter("second")
    assert model.active_adapter == "second"
    assert all(p.requires_grad == (".second." in n) for n, p in model.named_parameters() if "lora_" in n)
    assert not torch.allclose(output_of(model, inputs), first)
    with pytest.raises(AdapterNameError, match="loaded adapters"):
        model.set_adapter("missing")


def test_delete_adapter_frees_it_and_never_changes_the_tree():
    """As in PEFT, layers stay wrapped after a delete (a serving model's tree must not change under
    a running forward); `unload()` gives back the original model."""
    model, base = wrapped(r=4, target_modules=["q_proj", "v_proj"])
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model.add_adapter("extra", lorakit.LoraConfig(r=2, target_modules=["k_proj", "q_proj"]))
    structure = [(n, id(m)) for n, m in model.named_modules()]
    keys = set(model.state_dict())
    model.delete_adapter("extra")
    assert [(n, id(m)) for n, m in model.named_modules()] == structure
    assert keys - set(model.state_dict()) == {k for k in keys if ".extra." in k}
    model.delete_adapter("default")
    assert not any(".lora_" in k for k in model.state_dict())
    plain = model.unload()
    assert not any(isinstance(m, lorakit.methods.AdapterLayer) for m in plain.modules())
    assert plain.state_dict().keys() == original.keys()


def test_adapter_name_rules():
    model, _ = wrapped(r=4)
    for bad in ("default", "__base__", "", "a.b"):
        with pytest.raises(AdapterNameError):
            model.add_adapter(bad, lorakit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(AdapterStateError, match="add_adapter"):
        lorakit.get_peft_model(model, lorakit.LoraConfig(target_modules=["q_proj"]))


def test_targets_that_match_nothing_list_adaptable_modules():
    with pytest.raises(TargetModulesError, match="q_proj.*gate_proj"):
        wrapped(target_modules=["query", "value"])


def test_unadaptable_target_is_refused_before_the_model_changes():
    model, _ = wrapped(r=4)
    keys = set(model.state_dict())
    with pytest.raises(TargetModulesError, match="LlamaRMSNorm"):
        model.add_adapter("bad", lorakit.LoraConfig(target_modules=["q_proj", "input_layernorm"]))
    assert set(model.state_dict()) == keys and "bad" not in model.peft_config


def test_default_targets_by_model_type():
    model, _ = wrapped(target_modules=None)
    assert {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, lorakit.methods.AdapterLayer)} == {
        "q_proj", "v_proj"
    }


def test_all_linear_skips_the_output_head():
    model, _ = wrapped(r=2)
    assert isinstance(model.get_base_model().lm_head, torch.nn.Linear)


def test_seq_cls_head_is_trained_as_a_saved_copy():
    model, _ = wrapped(tiny_bert_classifier, r=2, task_type="SEQ_CLS", target_modules=["query"])
    wrapper = model.get_base_model().classifier
    assert isinstance(wrapper, lorakit.methods.ModulesToSaveWrapper)
    assert all(p.requires_grad for p in wrapper.modules_to_save["default"].parameters())
    assert not any(p.requires_grad for p in wrapper.original_module.parameters())
    assert model.peft_config["default"].modules_to_save == ["classifier"]


def test_adapter_names_errors_come_before_compute():
    model, base = wrapped(r=4)
    inputs = inputs_for(base, batch=2)
    with pytest.raises(AdapterNameError, match="loaded: \\['default'\\]"):
        model(**inputs, adapter_names=["default", "nope"])
    with pytest.raises(RoutingError, match="one name per row"):
        model(**inputs, adapter_names=["default"])
    with pytest.raises(RoutingError):
        model(**inputs, adapter_names="default")
    model.merge_adapter()
    with pytest.raises(AdapterStateError, match="merged"):
        model(**inputs, adapter_names=["default", "default"])
    with pytest.raises(AdapterStateError):
        with model.disable_adapter():
            pass


def test_attribute_passthrough_to_the_base_model():
    model, _ = wrapped(r=4)
    assert model.config.model_type == "llama"
    assert model.get_base_model() is model.base_model.model


def test_per_row_adapters_with_gradient_checkpointing_refuse_instead_of_wrong_gradients():
    model, base = wrapped(r=4)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    inputs = inputs_for(base, batch=2)
    with pytest.raises(AdapterStateError, match="gradient checkpointing"):
        model(**inputs, adapter_names=["default", "__base__"])
    with torch.no_grad():  # inference recomputes nothing: allowed
        model(**inputs, adapter_names=["default", "__base__"])
