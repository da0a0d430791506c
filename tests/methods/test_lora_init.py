"""PiSSA, PiSSA with randomized SVD, OLoRA against PEFT: the same A, B and residual base,
outputs and gradients; files both ways; conversion to a plain LoRA adapter for the original
base; and unload gives the original weights back. fp32, atol 1e-5."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import lorakit
from conftest import inputs_for, output_of, tiny_gpt2, tiny_llama
from lorakit.base_models import load_base
from lorakit.errors import ConfigError

ATOL = 1e-5
INITS = ["pissa", "pissa_niter_4", "olora"]
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def both(builder, init: str, **extra):
    """(ours, peft's, untouched base): wrapped with the same seed (randomized SVD draws from it)."""
    base = builder()
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=init, **extra)
    torch.manual_seed(7)
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**config))
    torch.manual_seed(7)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    return ours, theirs, base


def nudge(*models) -> None:
    """Stand-in for training: the same small change to every adapter tensor."""
    with torch.no_grad():
        for model in models:
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.add_(0.01 * torch.cos(torch.arange(param.numel(), dtype=torch.float32)).view_as(param))


@pytest.mark.parametrize("arch, init", [(a, i) for a in BUILDERS for i in INITS if (a, i) != ("gpt2", "olora")])
def test_same_factors_residual_outputs_and_gradients_as_peft(arch, init):
    ours, theirs, base = both(BUILDERS[arch], init)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert ours_sd.keys() == theirs_sd.keys()
    for key in ours_sd:  # A, B and the residual base weights
        torch.testing.assert_close(ours_sd[key], theirs_sd[key], atol=ATOL, rtol=0, msg=key)
    inputs = inputs_for(base)
    with torch.no_grad():  # the wrapped model starts at the base model
        torch.testing.assert_close(output_of(ours.eval(), inputs), output_of(base, inputs), atol=ATOL, rtol=0)
    nudge(ours, theirs)
    for model in (ours, theirs):
        model.train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, theirs_grads[name], atol=ATOL, rtol=0, msg=name)


def test_olora_on_gpt2_conv1d_uses_the_out_by_in_weight():
    """Differs from PEFT on purpose: PEFT 0.21's olora_init takes the QR of Conv1D's stored (in, out)
    weight, which gives A and B of the wrong shapes (its forward then fails). We factor W as (out, in)."""
    base = tiny_gpt2()
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                         init_lora_weights="olora"))
    layer = ours.get_base_model().transformer.h[0].attn.c_attn
    weight = base.transformer.h[0].attn.c_attn.weight.t()  # (out, in)
    q, upper = torch.linalg.qr(weight)
    torch.testing.assert_close(layer.lora_B["default"].weight, q[:, :4], atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.lora_A["default"].weight, upper[:4], atol=ATOL, rtol=0)
    inputs = inputs_for(base)
    with torch.no_grad():
        torch.testing.assert_close(output_of(ours.eval(), inputs), output_of(base, inputs), atol=ATOL, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_files_both_ways_and_the_conversion_for_the_original_base(tmp_path, init):
    ours, theirs, base = both(tiny_llama, init)
    ours.save_pretrained(tmp_path / "initial")
    nudge(ours, theirs)
    inputs = inputs_for(base)
    trained = output_of(ours.eval(), inputs).detach()
    ours.save_pretrained(tmp_path / "trained")
    theirs.save_pretrained(tmp_path / "peft-trained")
    # a PiSSA/OLoRA file on the original base: the loader takes the initial part out again
    with torch.no_grad():
        by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "trained").eval()
        torch.testing.assert_close(output_of(by_peft, inputs), trained, atol=ATOL, rtol=0)
        by_us = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft-trained").eval()
        torch.testing.assert_close(output_of(by_us, inputs), trained, atol=ATOL, rtol=0)
    # converted: a plain LoRA adapter (rank 2r) that needs no change to the base
    ours.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    converted = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "converted")
    assert converted.peft_config["default"].init_lora_weights is True and converted.peft_config["default"].r == 8
    untouched = dict(base.named_parameters())
    for name, param in converted.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, untouched[name.replace("base_layer.", "")]), name
    with torch.no_grad():
        torch.testing.assert_close(output_of(converted.eval(), inputs), trained, atol=ATOL, rtol=0)
        by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "converted").eval()
        torch.testing.assert_close(output_of(by_peft, inputs), trained, atol=ATOL, rtol=0)


@pytest.mark.parametrize("init", INITS)
def test_unload_and_delete_give_the_original_weights_back(init):
    ours, _, base = both(tiny_llama, init)
    restored = ours.unload()
    for name, param in restored.named_parameters():
        torch.testing.assert_close(param, dict(base.named_parameters())[name], atol=1e-6, rtol=0, msg=name)
    ours, _, base = both(tiny_llama, init)
    ours.add_adapter("other", lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    ours.delete_adapter("default")
    q = ours.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    torch.testing.assert_close(q, base.model.layers[0].self_attn.q_proj.weight, atol=1e-6, rtol=0)


def test_pissa_on_a_quantized_base_is_refused_and_olora_works(tmp_path):
    from conftest import small_llama

    small_llama().save_pretrained(tmp_path / "base")
    with pytest.raises(ConfigError, match="PiSSA needs a full-precision base"):
        lorakit.get_peft_model(load_base(str(tmp_path / "base"), quantize="nf4"),
                               lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    quantized = load_base(str(tmp_path / "base"), quantize="nf4").eval()
    inputs = inputs_for(quantized)
    with torch.no_grad():
        before = output_of(quantized, inputs)
    model = lorakit.get_peft_model(quantized, lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="olora"))
    with torch.no_grad():  # residual requantized: the start is the base up to 4-bit rounding of the residual
        assert (output_of(model.eval(), inputs) - before).abs().max() < 0.05


def test_weight_inits_on_embeddings_are_refused():
    with pytest.raises(ConfigError, match="leave embedding layers"):
        lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights="pissa"))


def test_config_accepts_the_init_names_and_rejects_others():
    for init in ("pissa", "PiSSA", "pissa_niter_16", "olora", "gaussian"):
        lorakit.LoraConfig(init_lora_weights=init)
    with pytest.raises(ConfigError, match="pissa_niter_K"):
        lorakit.LoraConfig(init_lora_weights="pissa_niter_")
    with pytest.raises(ConfigError, match="Did you mean 'olora'"):
        lorakit.LoraConfig(init_lora_weights="olra")


@pytest.mark.parametrize("init", INITS)
def test_the_base_is_the_true_base_for_disabled_adapters_base_rows_and_other_adapters(init):
    """PiSSA/OLoRA leave W − s·B0A0 in the base layer; everything that is not that adapter must
    still see W: disable_adapter(), `__base__` rows, and the rows/activation of another adapter."""
    base = tiny_llama()
    model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                          init_lora_weights=init))
    nudge(model)  # trained: the adapter now differs from its initial part
    plain = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    model.add_adapter("plain", plain)
    reference = lorakit.get_peft_model(copy.deepcopy(base), plain, "plain")  # W + ΔW_plain on the true base
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if ".plain." in k}, strict=False)
    inputs = inputs_for(base)
    model.eval()
    with torch.no_grad():
        truth = output_of(base, inputs)
        with model.disable_adapter():
            torch.testing.assert_close(output_of(model, inputs), truth, atol=ATOL, rtol=0)
        trained = output_of(model, inputs)
        assert (trained - truth).abs().max() > 1e-3
        rows = output_of(model, inputs, adapter_names=["__base__", "default", "plain"])
        torch.testing.assert_close(rows[0], truth[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(rows[1], trained[1], atol=ATOL, rtol=0)
        torch.testing.assert_close(rows[2], output_of(reference, inputs)[2], atol=ATOL, rtol=0)
        model.set_adapter("plain")
        torch.testing.assert_close(output_of(model, inputs), output_of(reference, inputs), atol=ATOL, rtol=0)
