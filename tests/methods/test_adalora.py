"""AdaLoRA against PEFT, fp32 atol 1e-5: parameter names and counts, outputs, loss with the orthogonality
term, gradients; after a short training run with the allocator the same rank pattern from the same seed
and data; saved tensors and config, files both ways, merge; rows beside LoRA rows in one batch."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit
from conftest import VOCAB, tiny_llama
from lorakit.errors import AdapterWeightsError, ConfigError

ATOL = 1e-5
SETTINGS = dict(init_r=6, target_r=2, total_step=12, tinit=2, tfinal=3, deltaT=1, lora_alpha=8,
                target_modules=["q_proj", "v_proj", "down_proj"])


def twins(**extra):
    base = tiny_llama()
    settings = {**SETTINGS, **extra}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(task_type="CAUSAL_LM", **settings))
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.AdaLoraConfig(task_type="CAUSAL_LM", **settings))
    torch.manual_seed(0)
    with torch.no_grad():  # E starts at 0 (the base model); random E makes the adapter matter
        for name, param in theirs.named_parameters():
            if "lora_E" in name:
                param.normal_()
    ours.load_state_dict(theirs.state_dict(), strict=True)  # PEFT's names, ranknum included, key for key
    return ours, theirs


def train_both(ours, theirs, steps: int = 12) -> None:
    """The same AdamW run on both, PEFT's loop: backward, step, update_and_allocate, zero_grad."""
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ours, theirs)]
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        ids = torch.randint(1, VOCAB, (4, 8), generator=gen)
        for model, optimizer in zip((ours, theirs), optimizers, strict=True):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            model.base_model.update_and_allocate(step)
            optimizer.zero_grad()


def test_outputs_loss_gradients_and_counts_equal_peft():
    ours, theirs = twins()
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ids = torch.randint(1, VOCAB, (3, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits,
                                   atol=ATOL, rtol=0)
    ours.train(), theirs.train()
    expected, got = theirs(input_ids=ids, labels=ids).loss, ours(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)  # includes the orthogonality term
    with torch.no_grad():
        ours.set_fast_path(False)
        assert got > ours(input_ids=ids, labels=ids).loss - 1e-3  # sanity: the term is positive
    expected.backward(), got.backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], atol=ATOL, rtol=0, msg=name)


def test_allocator_gives_pefts_rank_pattern_and_the_files_match(tmp_path):
    ours, theirs = twins()
    train_both(ours, theirs)
    mine, peft_pattern = ours.peft_config["default"].rank_pattern, theirs.peft_config["default"].rank_pattern
    assert mine == {k.replace(".default", ""): v for k, v in peft_pattern.items()}
    assert {sum(v) for v in mine.values()} != {SETTINGS["init_r"]}  # ranks were actually pruned
    assert sum(map(sum, mine.values())) == SETTINGS["target_r"] * len(mine)  # to the final budget
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=ATOL, rtol=0, msg=key)
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs")]
    assert configs[0]["rank_pattern"] == configs[1]["rank_pattern"]
    ids = torch.randint(1, VOCAB, (2, 6))
    with torch.no_grad():
        reference = theirs.eval()(input_ids=ids).logits
        torch.testing.assert_close(ours.eval()(input_ids=ids).logits, reference, atol=ATOL, rtol=0)
        peft_loads_ours = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
        torch.testing.assert_close(peft_loads_ours(input_ids=ids).logits, reference, atol=ATOL, rtol=0)
        we_load_peft = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs").eval()
        torch.testing.assert_close(we_load_peft(input_ids=ids).logits, reference, atol=ATOL, rtol=0)
        merged = we_load_peft.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, reference, atol=ATOL, rtol=0)


def test_rows_beside_lora_rows_and_a_pattern_that_does_not_fit_the_file(tmp_path):
    from conftest import assert_rows_equal_alone, inputs_for

    ours, _ = twins()
    ours.add_adapter("lora", lorakit.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    base = tiny_llama()
    assert_rows_equal_alone(ours.eval(), base, inputs_for(base, batch=3), ["default", "lora", "__base__"])
    ours.save_pretrained(tmp_path, selected_adapters=["default"])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["rank_pattern"] = {"model.layers.0.self_attn.q_proj.lora_E": [True] * 2 + [False] * 4}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterWeightsError, match="rank_pattern keeps 2"):
        lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path, verify_integrity=False)


def test_config_refusals():
    with pytest.raises(ConfigError, match="total_step"):
        lorakit.get_peft_model(tiny_llama(), lorakit.AdaLoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="tinit < total_step - tfinal"):
        lorakit.AdaLoraConfig(total_step=10, tinit=5, tfinal=5)
    with pytest.raises(ConfigError, match="cannot exceed init_r"):
        lorakit.AdaLoraConfig(init_r=4, target_r=8, total_step=10)
    ours, _ = twins()
    with pytest.raises(ConfigError, match="AdaLoRA"):
        ours.add_weighted_adapter(["default"], [1.0], "blend")
