"""Base fingerprint: one base in fp32, bf16 and 4-bit matches; a retrained base does not."""

from __future__ import annotations

import copy
import warnings

import bitsandbytes as bnb
import peft
import pytest
import torch
from torch import nn

import lorakit
from conftest import tiny_llama
from lorakit import PeftModel
from lorakit.errors import AdapterBaseMismatch
from lorakit.files.fingerprint import base_fingerprint, compare


def quantized(model: nn.Module, kind: str = "nf4") -> nn.Module:
    """The same model with every decoder Linear replaced by a bitsandbytes 4-bit/8-bit one."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.startswith("model.layers"):
            if kind == "int8":
                q = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                        has_fp16_weights=False)
            else:
                q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=torch.float32, quant_type=kind)
            q.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q.to("cpu"))
    return model


def retrained(model: nn.Module, noise: float = 0.01, seed: int = 7) -> nn.Module:
    """Every weight moved by ~1% (multiplicative Gaussian noise): same shapes, other values."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + noise * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.mark.parametrize("variant", ["fp32 copy", "bf16", "fp16", "nf4", "fp4", "int8", "wrapped"])
def test_same_base_in_any_precision_matches(base, variant):
    other = {
        "fp32 copy": lambda: copy.deepcopy(base), "bf16": lambda: copy.deepcopy(base).to(torch.bfloat16),
        "fp16": lambda: copy.deepcopy(base).to(torch.float16), "nf4": lambda: quantized(base, "nf4"),
        "fp4": lambda: quantized(base, "fp4"), "int8": lambda: quantized(base, "int8"),
        "wrapped": lambda: lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(target_modules="all-linear")).get_base_model(),
    }[variant]()
    result = compare(base_fingerprint(base), base_fingerprint(other))
    assert result.match, result.reason
    assert compare(base_fingerprint(other), base_fingerprint(base)).match  # either side may be the saved one


@pytest.mark.parametrize("precision", ["fp32", "bf16", "nf4"])
def test_retrained_base_is_detected(base, precision):
    changed = retrained(base)
    changed = {"fp32": changed, "bf16": changed.to(torch.bfloat16), "nf4": quantized(changed)}[precision]
    result = compare(base_fingerprint(base), base_fingerprint(changed))
    assert not result.match and "largest relative difference" in result.reason


def test_other_architecture_is_detected(base):
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    assert "architecture" in compare(base_fingerprint(base), base_fingerprint(wider)).reason


def _saved_adapter(base, path):
    model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(path)
    return path


def test_loading_onto_another_base_raises_with_both_fingerprints(base, tmp_path):
    path = _saved_adapter(base, tmp_path / "a")
    with pytest.raises(AdapterBaseMismatch) as caught:
        PeftModel.from_pretrained(retrained(base), path)
    message = str(caught.value)
    assert "adapter's base" in message and "this base" in message and message.count("fingerprint ") == 2
    assert "verify_base=False" in message
    model = lorakit.get_peft_model(retrained(base), lorakit.LoraConfig(target_modules=["v_proj"]))
    with pytest.raises(AdapterBaseMismatch):
        model.load_adapter(path, "other")
    assert "other" not in model.peft_config


def test_verify_base_false_loads_with_a_warning(base, tmp_path):
    path = _saved_adapter(base, tmp_path / "a")
    with pytest.warns(UserWarning, match="different base model"):
        PeftModel.from_pretrained(retrained(base), path, verify_base=False)


def test_adapter_trained_on_4bit_base_loads_onto_full_precision_and_back(base, tmp_path):
    four_bit = lorakit.get_peft_model(quantized(base), lorakit.LoraConfig(r=2, target_modules=["q_proj", "down_proj"],
                                                                           init_lora_weights=False))
    four_bit.save_pretrained(tmp_path / "q")
    full = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "q")  # no mismatch raised
    full.save_pretrained(tmp_path / "f")
    PeftModel.from_pretrained(quantized(base), tmp_path / "f")
    for name, param in full.named_parameters():
        if "lora_" in name:
            assert torch.equal(param, dict(four_bit.named_parameters())[name])


def test_fingerprint_survives_merge_and_peft_adapters_warn_once(base, tmp_path):
    model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.merge_adapter()  # merged weights must not become the recorded base
    model.save_pretrained(tmp_path / "merged")
    PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "merged")
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path / "p")
    import lorakit.files.fingerprint as fp

    fp._warned_unfingerprinted = False
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p")
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p")
    assert sum("no base fingerprint" in str(w.message) for w in seen) == 1


def test_from_pretrained_fingerprints_the_base_once(tmp_path, monkeypatch):
    """A fingerprint reads every weight: from_pretrained checks the file against one and keeps that one."""
    import lorakit.model

    base = tiny_llama()
    lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    calls = []

    def counted(model):
        calls.append(model)
        return base_fingerprint(model)

    monkeypatch.setattr(lorakit.model, "base_fingerprint", counted)
    loaded = PeftModel.from_pretrained(base, tmp_path)
    assert len(calls) == 1 and loaded.base_fingerprint == base_fingerprint(base)
