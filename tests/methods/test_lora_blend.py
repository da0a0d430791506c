"""add_weighted_adapter: the same outputs as PEFT for linear / cat / svd blends."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import lorakit
from conftest import inputs_for, output_of, tiny_gpt2, tiny_llama, twin
from lorakit.errors import AdapterNameError, ConfigError

CASES = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "embed_tokens"], ["q_proj", "up_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"], ["c_attn"]),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def pair(request):
    builder, first, second = CASES[request.param]
    ours, theirs, base = twin(builder, r=4, lora_alpha=8, target_modules=first)
    settings = dict(r=4, lora_alpha=3, use_rslora=True, target_modules=second, init_lora_weights=False)
    ours.add_adapter("b", lorakit.LoraConfig(**settings))
    theirs.add_adapter("b", peft.LoraConfig(**settings))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs, inputs_for(base), base


@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
@pytest.mark.parametrize("weights", [[0.7, -0.4], [1.0, 1.0]])
def test_blend_matches_peft(pair, combination, weights):
    ours, theirs, inputs, _ = pair
    for model in (ours, theirs):
        model.add_weighted_adapter(["default", "b"], weights, "mix", combination_type=combination)
        model.set_adapter("mix")
    # svd goes through a full SVD of each ΔW; both sides call the same LAPACK routine.
    torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), atol=1e-5, rtol=0)
    assert ours.peft_config["mix"].r == theirs.peft_config["mix"].r


def test_cat_blend_equals_stacking_the_weighted_adapters(pair):
    """'cat' is exact: the blend of (1, 1) equals running both adapters stacked."""
    ours, _, inputs, _ = pair
    ours.set_adapter(["default", "b"])
    stacked = output_of(ours, inputs)
    ours.add_weighted_adapter(["default", "b"], [1.0, 1.0], "cat", combination_type="cat")
    ours.set_adapter("cat")
    torch.testing.assert_close(output_of(ours, inputs), stacked, atol=1e-5, rtol=0)


def test_blend_errors(pair):
    ours, _, _, _ = pair
    ours.add_adapter("r2", lorakit.LoraConfig(r=2, target_modules=["q_proj"] if "q_proj" in str(ours) else ["c_attn"]))
    with pytest.raises(ConfigError, match="needs equal ranks"):
        ours.add_weighted_adapter(["default", "r2"], [1, 1], "x", combination_type="linear")
    with pytest.raises(ConfigError, match="one weight per adapter"):
        ours.add_weighted_adapter(["default", "b"], [1], "x")
    with pytest.raises(ConfigError, match="combination_type"):
        ours.add_weighted_adapter(["default", "b"], [1, 1], "x", combination_type="ties")
    with pytest.raises(AdapterNameError):
        ours.add_weighted_adapter(["default", "nope"], [1, 1], "x")
    with pytest.raises(AdapterNameError):
        ours.add_weighted_adapter(["default", "b"], [1, 1], "b")
    assert "x" not in ours.peft_config


def test_blend_is_frozen_and_saves_like_any_adapter(pair, tmp_path):
    ours, _, inputs, base = pair
    ours.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", combination_type="svd", svd_rank=3)
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".mix." in n)
    ours.set_adapter("mix")
    expected = output_of(ours, inputs)
    ours.save_pretrained(tmp_path, selected_adapters=["mix"])
    reloaded = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mix")
    assert reloaded.peft_config["default"].r == 3
    torch.testing.assert_close(output_of(reloaded, inputs), expected, atol=1e-5, rtol=0)
