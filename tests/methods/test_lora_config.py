"""LoraConfig: PEFT's fields and defaults, clear errors, PEFT's per-module pattern rules."""

from __future__ import annotations

import dataclasses
import math

import peft
import pytest
from peft.utils.other import get_pattern_key

from lorakit import LoraConfig, TaskType
from lorakit.errors import ConfigError


def test_defaults_equal_peft():
    ours, theirs = LoraConfig(), peft.LoraConfig()
    for field in dataclasses.fields(LoraConfig):
        if hasattr(theirs, field.name):
            assert getattr(ours, field.name) == getattr(theirs, field.name), field.name


def test_unknown_field_names_the_closest():
    with pytest.raises(ConfigError, match="no field 'rank'.*Did you mean 'r'"):
        LoraConfig(rank=8)
    with pytest.raises(ConfigError, match="Did you mean 'lora_dropout'"):
        LoraConfig(lora_droput=0.1)
    with pytest.raises(ConfigError, match="Did you mean 'lora_alpha'"):
        LoraConfig(lora_alfa=16)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(r=2.5), "r must be a positive integer"),
        (dict(r=True), "r must be a positive integer"),
        (dict(lora_alpha=-1), "lora_alpha must be a positive number"),
        (dict(lora_alpha=float("nan")), "lora_alpha"),
        (dict(lora_dropout=1.0), r"lora_dropout must be a number in \[0, 1\)"),
        (dict(bias="lora"), "Did you mean 'lora_only'"),
        (dict(init_lora_weights="pisa"), "init_lora_weights must be"),
        (dict(init_lora_weights=1), "init_lora_weights must be"),
        (dict(task_type="CAUSAL"), "Did you mean 'CAUSAL_LM'"),
        (dict(target_modules=[]), "target_modules must be a non-empty list"),
        (dict(target_modules="q_proj["), "not a valid regular expression"),
        (dict(target_modules="q_.*", layers_to_transform=[0]), "cannot be combined with a regex"),
        (dict(target_modules=["q"], layers_to_transform=[-1]), "layers_to_transform"),
        (dict(target_modules=["q"], layers_pattern="layers"), "only has a meaning together"),
        (dict(rank_pattern={"q": 0}), r"rank_pattern\['q'\]"),
        (dict(use_rslora="yes"), "use_rslora must be True or False"),
        (dict(modules_to_save="classifier"), "modules_to_save must be a non-empty list"),
    ],
)
def test_bad_values_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**kwargs)


def test_config_error_is_also_a_value_error():
    with pytest.raises(ValueError):
        LoraConfig(r=-3)


def test_normalisation():
    config = LoraConfig(target_modules=("v_proj", "q_proj", "v_proj"), task_type=TaskType.CAUSAL_LM,
                        init_lora_weights="Gaussian")
    assert config.target_modules == ["v_proj", "q_proj"]
    assert config.task_type == "CAUSAL_LM" and config.init_lora_weights == "gaussian"
    assert LoraConfig(target_modules="ALL-LINEAR").target_modules == "all-linear"
    assert LoraConfig(target_modules={"b", "a"}).target_modules == ["a", "b"]


@pytest.mark.parametrize("name", [
    "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.10.mlp.down_proj",
    "model.layers.1.mlp.down_proj", "transformer.h.3.attn.c_attn", "v_proj",
])
def test_pattern_keys_follow_peft(name):
    patterns = {r"layers\.1\..*": 3, "down_proj": 5, "q_proj": 7, "c_attn": 2}
    config = LoraConfig(r=4, lora_alpha=8, rank_pattern=patterns, alpha_pattern={"q_proj": 1.5})
    peft_key = get_pattern_key(list(patterns), name)
    assert config.rank_for(name) == patterns.get(peft_key, 4)
    peft_alpha_key = get_pattern_key(["q_proj"], name)
    assert config.alpha_for(name) == {"q_proj": 1.5}.get(peft_alpha_key, 8)


def test_scaling_plain_and_rslora():
    assert LoraConfig(r=16, lora_alpha=32).scaling_for("x") == 2.0
    assert LoraConfig(r=16, lora_alpha=32, use_rslora=True).scaling_for("x") == 32 / math.sqrt(16)
    config = LoraConfig(r=16, lora_alpha=32, rank_pattern={"k": 4}, use_rslora=True)
    assert config.scaling_for("a.k") == 32 / 2


def test_dict_round_trip_with_peft():
    ours = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2},
                      modules_to_save=["score"], task_type="CAUSAL_LM")
    as_dict = ours.to_dict()
    assert as_dict["peft_type"] == "LORA"
    theirs = peft.LoraConfig(**{k: v for k, v in as_dict.items() if k != "peft_type"})
    assert set(theirs.target_modules) == {"q_proj", "v_proj"} and theirs.rank_pattern == {"q_proj": 2}
    back = LoraConfig.from_dict(theirs.to_dict())
    assert back.to_dict() == LoraConfig.from_dict(as_dict).to_dict()


def test_from_dict_refuses_features_we_do_not_implement():
    data = peft.LoraConfig(target_modules=["q"]).to_dict()
    with pytest.raises(ConfigError, match="peft_type"):
        LoraConfig.from_dict({**data, "peft_type": "IA3"})
    with pytest.raises(ConfigError, match="layer_replication"):
        LoraConfig.from_dict({**data, "layer_replication": [[0, 2]]})
    with pytest.raises(ConfigError, match="Did you mean 'lora_alpha'"):
        LoraConfig.from_dict({**data, "lora_alhpa": 3})


def test_keys_from_older_and_newer_peft_that_are_off_are_ignored_with_one_warning():
    alpaca_lora = {"base_model_name_or_path": "decapoda-research/llama-7b-hf", "bias": "none", "enable_lora": None,
                   "fan_in_fan_out": False, "inference_mode": True, "lora_alpha": 16, "lora_dropout": 0.05,
                   "merge_weights": False, "modules_to_save": None, "peft_type": "LORA", "r": 16,
                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "task_type": "CAUSAL_LM"}
    newer = {**peft.LoraConfig(target_modules=["q"]).to_dict(), "some_future_feature": None, "future_flag": False,
             "future_list": [], "use_qalora": False}
    for data, expected in ((alpaca_lora, "enable_lora=None, merge_weights=False"),
                           (newer, "some_future_feature=None, future_flag=False, future_list=[]")):
        with pytest.warns(UserWarning, match="ignored keys lorakit does not know") as caught:
            config = LoraConfig.from_dict(data)
        assert len(caught) == 1 and expected in str(caught[0].message)
        assert config.r == data["r"]


def test_keys_that_are_switched_on_are_refused_as_probably_newer_peft():
    data = peft.LoraConfig(target_modules=["q"]).to_dict()
    with pytest.raises(ConfigError, match="probably written by a newer PEFT"):
        LoraConfig.from_dict({**data, "use_future_trick": True})
    with pytest.raises(ConfigError, match=r"modules_to_save=\['embed_tokens'\]"):
        LoraConfig.from_dict({**data, "trainable_token_indices": [5, 6]})
    with pytest.raises(ConfigError, match="no field 'enable_lora'"):  # in code, an unknown key is a typo
        LoraConfig(enable_lora=None)


def test_an_alpaca_lora_adapter_file_loads_and_ours_stay_strict(tmp_path):
    import json

    import lorakit
    from conftest import tiny_llama
    from lorakit.errors import AdapterConfigError

    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    theirs.save_pretrained(tmp_path / "alpaca")  # a PEFT-made file, then alpaca-lora's extra keys
    path = tmp_path / "alpaca" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "enable_lora": None, "merge_weights": False}))
    with pytest.warns(UserWarning, match="enable_lora"):
        loaded = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "alpaca")
    assert loaded.peft_config["default"].r == 4
    loaded.save_pretrained(tmp_path / "ours")  # a file we wrote never holds unknown keys: one is an edit
    path = tmp_path / "ours" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "fan_in_fan_nut": False}))
    with pytest.raises(AdapterConfigError, match="Unknown key 'fan_in_fan_nut' in a config lorakit wrote"):
        lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")


def test_a_current_peft_file_loads_without_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoraConfig.from_dict(peft.LoraConfig(target_modules=["q"]).to_dict())
