"""DoRA against PEFT on the same weights: outputs, gradients, merge, files both ways, a 4-bit
base, mixed batches. fp32, atol 1e-5; merge/unmerge restores weights within 1e-6."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import lorakit
from conftest import (
    assert_rows_equal_alone,
    dequantized_copy,
    inputs_for,
    output_of,
    small_llama,
    tiny_gpt2,
    tiny_llama,
    twin,
)
from lorakit.base_models import load_base
from lorakit.errors import ConfigError

ATOL = 1e-5
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
DORA = dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)


def grads(model, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    return loss, {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}


EMBEDDING_TARGETS = {"llama": ["embed_tokens", "q_proj"], "gpt2": ["wte", "c_attn"]}


@pytest.mark.parametrize("arch", BUILDERS)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("embedding", [False, True])
def test_outputs_and_gradients_equal_peft(arch, dropout, embedding):
    targets = EMBEDDING_TARGETS[arch] if embedding else "all-linear"
    ours, theirs, base = twin(BUILDERS[arch], lora_dropout=dropout, **{**DORA, "target_modules": targets})
    inputs = inputs_for(base)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), atol=ATOL, rtol=0)
    (loss_a, grads_a), (loss_b, grads_b) = grads(ours, inputs), grads(theirs, inputs)
    torch.testing.assert_close(loss_a, loss_b, atol=ATOL, rtol=0)
    assert grads_a.keys() == grads_b.keys() and any("lora_magnitude_vector" in k for k in grads_a)
    for key in grads_a:
        torch.testing.assert_close(grads_a[key], grads_b[key], atol=ATOL, rtol=0, msg=key)


def test_fresh_dora_adapter_starts_at_the_base_and_its_magnitude_is_the_weight_norm():
    base = tiny_llama()
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**DORA))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**DORA))
    inputs = inputs_for(base)
    with torch.no_grad():
        torch.testing.assert_close(output_of(ours, inputs), output_of(base, inputs), atol=ATOL, rtol=0)
    layer = ours.get_base_model().model.layers[0].mlp.down_proj
    expected = torch.linalg.norm(base.model.layers[0].mlp.down_proj.weight, dim=1)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, expected, atol=1e-6, rtol=0)
    peft_m = theirs.base_model.model.model.layers[0].mlp.down_proj.lora_magnitude_vector["default"].weight
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, peft_m, atol=1e-6, rtol=0)


# not GPT-2's embedding: its wte is tied to the LM head, so merging into it changes the head too
# (for plain LoRA and in PEFT alike)
@pytest.mark.parametrize("arch, embedding", [("llama", False), ("llama", True), ("gpt2", False)])
def test_merge_equals_peft_and_unmerge_restores_the_weights(arch, embedding):
    targets = EMBEDDING_TARGETS[arch] if embedding else "all-linear"
    ours, theirs, base = twin(BUILDERS[arch], **{**DORA, "target_modules": targets})
    with torch.no_grad():  # train the magnitude away from ‖W‖ so the merge is not trivial
        for model in (ours, theirs):
            for name, param in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.mul_(1.0 + 0.1 * torch.arange(param.numel()) / param.numel())
    inputs = inputs_for(base)
    ours.eval()
    with torch.no_grad():
        before = output_of(ours, inputs)
    original = {k: v.clone() for k, v in ours.get_base_model().state_dict().items() if "base_layer" in k}
    ours.merge_adapter()
    theirs.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(output_of(ours, inputs), before, atol=ATOL, rtol=0)
    ours_sd, theirs_sd = ours.get_base_model().state_dict(), theirs.base_model.model.state_dict()
    for key in original:
        torch.testing.assert_close(ours_sd[key], theirs_sd[key], atol=1e-6, rtol=0, msg=key)
    ours.unmerge_adapter()
    for key, value in original.items():
        torch.testing.assert_close(ours.get_base_model().state_dict()[key], value, atol=1e-6, rtol=0, msg=key)
    merged = ours.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(output_of(merged, inputs), before, atol=ATOL, rtol=0)


def test_files_move_both_ways(tmp_path):
    ours, theirs, base = twin(tiny_llama, **{**DORA, "target_modules": ["embed_tokens", "q_proj", "down_proj"]})
    with torch.no_grad():
        for model in (ours, theirs):
            for name, param in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.add_(0.05)
    inputs = inputs_for(base)
    ours.eval()
    expected = output_of(ours, inputs).detach()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    read_by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    read_by_us = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs").eval()
    with torch.no_grad():
        torch.testing.assert_close(output_of(read_by_peft, inputs), expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(output_of(read_by_us, inputs), expected, atol=ATOL, rtol=0)
    assert read_by_us.peft_config["default"].use_dora


def test_dora_on_a_4bit_base_equals_peft(tmp_path):
    small_llama().save_pretrained(tmp_path / "base")
    config = dict(DORA, init_lora_weights=False)
    ours = lorakit.get_peft_model(load_base(str(tmp_path / "base"), quantize="nf4"), lorakit.LoraConfig(**config))
    theirs = peft.get_peft_model(load_base(str(tmp_path / "base"), quantize="nf4"), peft.LoraConfig(**config))
    adapter = {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
    result = ours.load_state_dict(adapter, strict=False)  # the 4-bit base's own keys are the same weights
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    inputs = inputs_for(ours)
    ours.train(), theirs.train()
    with torch.no_grad():  # the magnitude came from the dequantized weight's norm, in both
        torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), atol=ATOL, rtol=0)
    # In eval mode we differ from PEFT on purpose: on AVX512-BF16 CPUs bitsandbytes repacks the
    # weight for its inference kernel, and PEFT's DoRA then dequantizes the repacked bytes as if
    # they were the normal layout (measured: 0.097 off). Ours keeps the normal layout for a layer
    # it dequantizes (quant.keep_training_layout) and equals the dequantized fp32 reference.
    reference = lorakit.get_peft_model(dequantized_copy(ours), lorakit.LoraConfig(**config))
    reference.load_state_dict(adapter, strict=False)
    ours.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(output_of(ours, inputs), output_of(reference, inputs), atol=ATOL, rtol=0)


def test_mixed_batch_rows_with_dora_equal_each_row_alone():
    ours, _, base = twin(tiny_llama, **DORA)
    ours.add_adapter("plain", lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    inputs = inputs_for(base, batch=3)
    ours.eval()
    names = ["default", "__base__", "plain"]
    assert_rows_equal_alone(ours, base, inputs, names, ATOL)
    with torch.no_grad():
        generated = ours.generate(**inputs, adapter_names=names, max_new_tokens=3, do_sample=False)
        assert generated.shape == (3, inputs["input_ids"].shape[1] + 3)


def test_dora_refusals_are_clear():
    ours, _, _ = twin(tiny_llama, **DORA)
    with pytest.raises(ConfigError, match="use DoRA"):
        ours.add_weighted_adapter(["default"], [1.0], "blend", combination_type="linear")
