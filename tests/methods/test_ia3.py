"""(IA)³ against PEFT, fp32 atol 1e-5: outputs, gradients, merged weights, saved tensors, files
both ways, stacked adapters; IA3 rows beside LoRA rows in one batch on one base."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch

import lorakit
from conftest import assert_rows_equal_alone, inputs_for, output_of, tiny_gpt2, tiny_llama
from lorakit.errors import ConfigError
from lorakit.methods.ia3.config import IA3Config

ATOL = 1e-5
CASES = {
    "llama": (tiny_llama, dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])),
}


def twins(arch: str, **extra):
    """(ours, PEFT's, base) with the same random (IA)³ vectors."""
    builder, settings = CASES[arch]
    base = builder()
    settings = {**settings, "init_ia3_weights": False, **extra}
    ours = lorakit.get_peft_model(copy.deepcopy(base), IA3Config(**settings))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**settings))
    ours.load_state_dict(theirs.state_dict(), strict=True)  # PEFT's parameter names, key for key
    return ours, theirs, base


@pytest.mark.parametrize("arch", CASES)
def test_outputs_and_gradients_equal_peft(arch):
    ours, theirs, base = twins(arch)
    inputs = inputs_for(base)
    with torch.no_grad():
        torch.testing.assert_close(output_of(ours.eval(), inputs), output_of(theirs.eval(), inputs), atol=ATOL, rtol=0)
    for model in (ours, theirs):
        model.train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    expected = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys() and all("ia3_l" in n for n in got)
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("arch", CASES)
def test_merged_weights_equal_peft_and_unmerge_restores(arch):
    ours, theirs, base = twins(arch)
    inputs = inputs_for(base)
    with torch.no_grad():
        before = output_of(ours.eval(), inputs)
        ours.merge_adapter()
        torch.testing.assert_close(output_of(ours, inputs), before, atol=ATOL, rtol=0)
        ours.unmerge_adapter()
        torch.testing.assert_close(output_of(ours, inputs), before, atol=ATOL, rtol=0)
    merged, expected = ours.merge_and_unload().state_dict(), theirs.merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for key in merged:
        torch.testing.assert_close(merged[key], expected[key], atol=ATOL, rtol=0, msg=key)


@pytest.mark.parametrize("arch", CASES)
def test_files_both_ways(tmp_path, arch):
    ours, theirs, base = twins(arch)
    inputs = inputs_for(base)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    from safetensors.torch import load_file

    saved, peft_saved = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert saved.keys() == peft_saved.keys() and all(torch.equal(saved[k], peft_saved[k]) for k in saved)
    with warnings.catch_warnings(record=True) as caught:  # our adapter_config.json holds only PEFT's keys
        warnings.simplefilter("always")
        read_by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)]
    read_by_us = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs").eval()
    with torch.no_grad():
        expected = output_of(theirs.eval(), inputs)
        torch.testing.assert_close(output_of(read_by_peft, inputs), expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(output_of(read_by_us, inputs), expected, atol=ATOL, rtol=0)
    assert type(read_by_us.peft_config["default"]) is IA3Config


def test_stacked_adapters_multiply_as_in_peft():
    ours, theirs, base = twins("llama")
    second = dict(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False)
    ours.add_adapter("other", IA3Config(**second))
    theirs.add_adapter("other", peft.IA3Config(**second))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.set_adapter(["default", "other"])
    theirs.base_model.set_adapter(["default", "other"])
    inputs = inputs_for(base)
    with torch.no_grad():
        torch.testing.assert_close(output_of(ours.eval(), inputs), output_of(theirs.eval(), inputs), atol=ATOL, rtol=0)


def test_ia3_rows_beside_lora_rows_in_one_batch():
    ours, _, base = twins("llama")
    ours.add_adapter("lora", lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj", "up_proj"],
                                                init_lora_weights=False))
    inputs = inputs_for(base, batch=4)
    names = ["default", "lora", "__base__", "default"]
    assert_rows_equal_alone(ours.eval(), base, inputs, names, ATOL)


def test_lora_and_ia3_on_one_module_each_row_equals_peft_with_that_adapter_alone(tmp_path):
    """One module may hold several methods' adapters (methods.layer_chain): IA3 on k_proj/v_proj/down_proj
    and LoRA on k_proj/q_proj, rows of each (and base rows) in one batch, each equal to PEFT's model
    holding that adapter alone; each adapter's file is PEFT's, names as if it were alone."""
    ours, theirs, base = twins("llama")
    settings = dict(r=2, lora_alpha=4, target_modules=["k_proj", "q_proj"], init_lora_weights=False)
    torch.manual_seed(3)
    ours.add_adapter("lora", lorakit.LoraConfig(**settings))
    ours.save_pretrained(tmp_path, selected_adapters=["lora", "default"])
    peft_lora = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    peft_ia3 = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    inputs = inputs_for(base)
    with torch.no_grad():
        mixed = output_of(ours.eval(), inputs, adapter_names=["default", "lora", "__base__"])
        for row, oracle in enumerate((theirs.eval(), peft_lora, base)):
            one = {k: v[row:row + 1] for k, v in inputs.items()}
            torch.testing.assert_close(mixed[row:row + 1], output_of(oracle, one), atol=ATOL, rtol=0, msg=str(row))
        torch.testing.assert_close(output_of(peft_ia3, inputs), output_of(theirs, inputs), atol=ATOL, rtol=0)
    loaded = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path / "lora", adapter_name="lora")
    assert_rows_equal_alone(loaded.eval(), base, inputs, ["lora", "default", "__base__"], ATOL)


def test_defaults_and_config_errors_follow_peft():
    ours = lorakit.get_peft_model(tiny_llama(), IA3Config())
    theirs = peft.get_peft_model(tiny_llama(), peft.IA3Config())
    assert {n: tuple(p.shape) for n, p in ours.named_parameters() if "ia3_" in n} == \
        {n: tuple(p.shape) for n, p in theirs.named_parameters() if "ia3_" in n}
    with pytest.raises(ConfigError, match="subset of target_modules"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ConfigError, match="Did you mean 'feedforward_modules'"):
        IA3Config(feedforward=["down_proj"])


def test_blending_refuses_ia3_adapters():
    ours, _, _ = twins("llama")
    with pytest.raises(ConfigError, match=r"not LoRA adapters \(IA3\)"):
        ours.add_weighted_adapter(["default"], [1.0], "blend")
