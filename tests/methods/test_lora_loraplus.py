"""LoRA+ parameter groups and one optimizer step equal PEFT's create_loraplus_optimizer."""

from __future__ import annotations

import pytest
import torch
from peft.optimizers import create_loraplus_optimizer as peft_loraplus

import lorakit
from conftest import inputs_for, tiny_llama, twin

CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=False, bias="lora_only")


def groups_by_name(model, optimizer) -> list[tuple[float, float, list[str]]]:
    names = {id(p): n.replace(".default", "") for n, p in model.named_parameters()}
    return [(g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in optimizer.param_groups]


@pytest.mark.parametrize("dora", [False, True])
def test_groups_and_a_step_equal_peft(dora):
    targets = ["q_proj", "v_proj"] if dora else CONFIG["target_modules"]  # DoRA: no embeddings (refused)
    ours, theirs, base = twin(tiny_llama, **{**CONFIG, "target_modules": targets, "use_dora": dora})
    kwargs = dict(lr=1e-3, loraplus_lr_ratio=16, loraplus_lr_embedding=1e-5, loraplus_weight_decay=0.01)
    ours_opt = lorakit.create_loraplus_optimizer(ours, torch.optim.AdamW, **kwargs)
    theirs_opt = peft_loraplus(theirs, torch.optim.AdamW, **kwargs)
    assert groups_by_name(ours, ours_opt) == groups_by_name(theirs, theirs_opt)
    lrs = {lr for lr, _, names in groups_by_name(ours, ours_opt) if names}
    assert 1e-3 in lrs and 16e-3 in lrs
    inputs = inputs_for(base)
    for model, optimizer in ((ours, ours_opt), (theirs, theirs_opt)):
        model.train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
    theirs_params = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, theirs_params[name], atol=1e-5, rtol=0, msg=name)


def test_b_moves_ratio_times_faster_than_a_under_sgd():
    ours, _, base = twin(tiny_llama, r=4, lora_alpha=8, target_modules=["q_proj"])
    optimizer = lorakit.create_loraplus_optimizer(ours, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=16)
    layer = ours.get_base_model().model.layers[0].self_attn.q_proj
    a0, b0 = layer.lora_A["default"].weight.clone(), layer.lora_B["default"].weight.clone()
    inputs = inputs_for(base)
    ours(**inputs, labels=inputs["input_ids"]).loss.backward()
    grad_a, grad_b = layer.lora_A["default"].weight.grad.clone(), layer.lora_B["default"].weight.grad.clone()
    optimizer.step()
    torch.testing.assert_close(layer.lora_A["default"].weight, a0 - 0.1 * grad_a, atol=1e-7, rtol=0)
    torch.testing.assert_close(layer.lora_B["default"].weight, b0 - 1.6 * grad_b, atol=1e-7, rtol=0)
