"""PEFT's public names that existing code calls, against PEFT on twin models: layer switches,
status reports, set_requires_grad, the loading keywords; and errors that name our class."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import lorakit
from conftest import inputs_for, output_of, tiny_llama, twin
from lorakit.errors import AdapterStateError, ConfigError

CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def test_disable_and_enable_adapter_layers_match_peft():
    ours, theirs, base = twin(tiny_llama, **CONFIG)
    inputs = inputs_for(base)
    with torch.no_grad():
        adapted = output_of(ours, inputs)
        for model in (ours, theirs):
            model.disable_adapter_layers()
        torch.testing.assert_close(output_of(ours, inputs), output_of(base, inputs), atol=1e-6, rtol=0)
        torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), atol=1e-6, rtol=0)
        for model in (ours, theirs):
            model.enable_adapter_layers()
        torch.testing.assert_close(output_of(ours, inputs), adapted, atol=0, rtol=0)
        torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), atol=1e-5, rtol=0)
    ours.merge_adapter()
    with pytest.raises(AdapterStateError, match="unmerge_adapter"):
        ours.disable_adapter_layers()


def comparable(status) -> dict:
    out = dataclasses.asdict(status)
    for key in ("module_type", "adapter_model_type", "quantization_backend"):  # our class names are our own
        out.pop(key, None)
    return out


def test_layer_and_model_status_match_peft():
    ours, theirs, _ = twin(tiny_llama, **CONFIG)
    second = dict(r=2, lora_alpha=4, target_modules=["q_proj"])
    ours.add_adapter("other", lorakit.LoraConfig(**second))
    import peft

    theirs.add_adapter("other", peft.LoraConfig(**second))
    for step in ("as wrapped", "other trains too", "merged"):
        if step == "other trains too":
            for model in (ours, theirs):
                model.set_requires_grad("other", True)
        if step == "merged":
            for model in (ours, theirs):
                model.merge_adapter(["default"])
        assert [comparable(s) for s in ours.get_layer_status()] == [comparable(s) for s in theirs.get_layer_status()], step
        assert comparable(ours.get_model_status()) == comparable(theirs.get_model_status()), step
    assert ours.get_model_status().merged_adapters == ["default"]
    assert ours.get_layer_status()[0].name == "model.model.layers.0.self_attn.q_proj"


def test_set_requires_grad_freezes_and_unfreezes_one_adapter():
    ours, _, _ = twin(tiny_llama, **CONFIG)
    ours.set_requires_grad("default", False)
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora_" in n)
    ours.set_requires_grad(["default"], True)
    assert all(p.requires_grad for n, p in ours.named_parameters() if "lora_" in n)
    with pytest.raises(KeyError, match="Unknown adapter 'nope'"):
        ours.set_requires_grad("nope")


def test_loading_keywords(tmp_path):
    ours, _, base = twin(tiny_llama, **CONFIG)
    for name, param in ours.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.bfloat16)
    ours.save_pretrained(tmp_path / "nested" / "run")  # a bf16 adapter in a subfolder
    fresh = lambda: tiny_llama()  # noqa: E731
    options = dict(subfolder="run", torch_device="cpu", low_cpu_mem_usage=True)
    upcast = lorakit.PeftModel.from_pretrained(fresh(), tmp_path / "nested", **options)
    kept = lorakit.PeftModel.from_pretrained(fresh(), tmp_path / "nested", autocast_adapter_dtype=False, **options)
    lora_dtypes = lambda m: {p.dtype for n, p in m.named_parameters() if "lora_" in n}  # noqa: E731
    assert lora_dtypes(upcast) == {torch.float32} and lora_dtypes(kept) == {torch.bfloat16}
    saved = {n: p for n, p in ours.named_parameters() if "lora_" in n}
    assert all(torch.equal(p, saved[n].float()) for n, p in upcast.named_parameters() if "lora_" in n)
    with torch.no_grad():
        torch.testing.assert_close(output_of(kept, inputs_for(base)), output_of(ours, inputs_for(base)), atol=0, rtol=0)
    # config= replaces the file's config (here: the same adapter, loaded trainable with more dropout)
    other = lorakit.LoraConfig(**CONFIG, lora_dropout=0.3)
    upcast.load_adapter(tmp_path / "nested", "second", subfolder="run", config=other, is_trainable=True)
    assert upcast.peft_config["second"].lora_dropout == 0.3 and not upcast.peft_config["second"].inference_mode
    with pytest.raises(ConfigError, match="Unknown loading option"):
        lorakit.PeftModel.from_pretrained(fresh(), tmp_path / "nested", subfolder="run", revison="main")


def test_an_unknown_attribute_names_our_class():
    ours, _, _ = twin(tiny_llama, **CONFIG)
    with pytest.raises(AttributeError, match=r"'lorakit.PeftModel' object has no attribute 'no_such_thing' "
                                             r"\(nor has the wrapped LlamaForCausalLM\)"):
        ours.no_such_thing  # noqa: B018
    assert ours.config.model_type == "llama"  # passthrough still works


def test_gradient_checkpointing_guard_reads_no_deprecated_attribute():
    """The refusal of per-row adapters under checkpointing must not hang on a deprecated property
    (it warned, and would silently read False once transformers removes it)."""
    ours, _, base = twin(tiny_llama, **CONFIG)
    ours.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ours.train()
    inputs = inputs_for(base, batch=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with pytest.raises(AdapterStateError, match="gradient checkpointing"):
            ours(**inputs, adapter_names=["default", "__base__"])
    ours.get_base_model().gradient_checkpointing_disable()
    ours(**inputs, adapter_names=["default", "__base__"])  # allowed again
