"""Adapter files: round trips both ways with PEFT, clear errors, atomic saves."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from conftest import inputs_for, output_of, tiny_bert_classifier, tiny_gpt2, tiny_llama, twin
from lorakit import PeftModel
from lorakit.errors import (
    AdapterConfigError,
    AdapterError,
    AdapterFileNotFoundError,
    AdapterNameError,
    AdapterWeightsError,
    PickleRefusedError,
)
from lorakit.files.format import CONFIG_NAME, PICKLE_NAMES, WEIGHTS_NAME

CASES = {
    "llama-embedding": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])),
    "llama-rslora-patterns": (tiny_llama, dict(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear",
                                               rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3})),
    "gpt2-conv1d": (tiny_gpt2, dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "bert-modules-to-save-bias": (tiny_bert_classifier, dict(r=2, lora_alpha=4, task_type="SEQ_CLS",
                                                             target_modules=["query", "value"], bias="lora_only")),
}

warnings.filterwarnings("ignore", message=".*no base fingerprint.*")


def _second_adapter(builder):
    names = {"tiny_gpt2": ["c_proj"], "tiny_bert_classifier": ["key"]}.get(builder.__name__, ["k_proj", "up_proj"])
    return dict(r=3, lora_alpha=5, target_modules=names, init_lora_weights=False)


@pytest.fixture(params=list(CASES), ids=list(CASES))
def trained_pair(request):
    """lorakit and PEFT models with the same two adapters (random B, so outputs differ from base)."""
    builder, config = CASES[request.param]
    ours, theirs, base = twin(builder, **config)
    ours.add_adapter("second", lorakit.LoraConfig(**_second_adapter(builder)))
    theirs.add_adapter("second", peft.LoraConfig(**_second_adapter(builder)))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():  # make the bias / saved-module parts differ from the base too
        for name, param in theirs.named_parameters():
            if param.requires_grad and "lora_" not in name:
                param.add_(0.1)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.eval(), theirs.eval(), base


def _outputs(model, inputs, names=("default", "second")):
    outs = {}
    for name in names:
        model.set_adapter(name)
        outs[name] = output_of(model, inputs)
    return outs


def test_peft_saves_lorakit_loads(trained_pair, tmp_path):
    ours, theirs, base = trained_pair
    theirs.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path / "second", "second")
    inputs = inputs_for(base)
    expected, got = _outputs(theirs, inputs), _outputs(loaded, inputs)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=0, msg=name)
    assert loaded.peft_config["second"].inference_mode and not any(p.requires_grad for p in loaded.parameters())


def test_lorakit_saves_peft_loads(trained_pair, tmp_path):
    ours, theirs, base = trained_pair
    ours.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).is_file() and (tmp_path / "second" / CONFIG_NAME).is_file()
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path / "second", "second")
    inputs = inputs_for(base)
    expected, got = _outputs(ours, inputs), _outputs(loaded, inputs)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=0, msg=name)


def test_saved_tensors_and_config_are_peft_s(trained_pair, tmp_path):
    ours, theirs, _ = trained_pair
    ours.save_pretrained(tmp_path / "ours", selected_adapters=["default"])
    theirs.save_pretrained(tmp_path / "peft", selected_adapters=["default"], save_embedding_layers=False)
    mine, peft_side = load_file(tmp_path / "ours" / WEIGHTS_NAME), load_file(tmp_path / "peft" / WEIGHTS_NAME)
    peft_side = {k: v for k, v in peft_side.items() if ".original_module." not in k and ".modules_to_save." not in k}
    assert mine.keys() == peft_side.keys()
    for key in mine:
        assert torch.equal(mine[key], peft_side[key]), key
    config = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["inference_mode"] is True
    assert not (tmp_path / "ours" / "second").exists()


def test_is_trainable_makes_a_loaded_adapter_train(tmp_path):
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


# -- errors ------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _as_foreign(directory: Path, edit_tensors=None, edit_config=None) -> Path:
    """Rewrite an adapter as another tool would (no lorakit integrity metadata), optionally edited."""
    tensors = load_file(directory / WEIGHTS_NAME)
    config = json.loads((directory / CONFIG_NAME).read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    return directory


def _load(directory, **kwargs):
    return PeftModel.from_pretrained(tiny_llama(), directory, **kwargs)


Q0A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("case, error, message", [
    ("missing dir", AdapterFileNotFoundError, "is not a directory"),
    ("missing config", AdapterFileNotFoundError, "adapter_config.json is missing"),
    ("missing weights", AdapterFileNotFoundError, "adapter_model.safetensors is missing"),
    ("pickle", PickleRefusedError, "lorakit convert --allow-pickle"),
    ("bad json", AdapterConfigError, r"adapter_config.json is not valid JSON \(line 3, column 3"),
    ("json list", AdapterConfigError, "must hold a JSON object"),
    ("unknown peft_type", AdapterConfigError, "peft_type is 'VBLORA'"),
    ("misspelt field", AdapterConfigError, "Did you mean 'lora_alpha'"),
    ("truncated weights", AdapterWeightsError, "truncated or corrupt"),
    ("edited alpha", AdapterConfigError, "does not match the config these weights were saved with"),
    ("flipped data byte", AdapterWeightsError, "checksum mismatch"),
    ("rank mismatch", AdapterWeightsError, "gives .*q_proj rank r=4, but its tensors have rank 2"),
    ("shape mismatch", AdapterWeightsError, r"lora_A.weight has shape \(4, 16\), but .*q_proj"),
    ("unknown module", AdapterWeightsError, "belongs to no module"),
    ("missing tensor", AdapterWeightsError, "lora_B.weight is missing"),
    ("nan", AdapterWeightsError, "NaN/Inf"),
    ("integer tensor", AdapterWeightsError, "dtype torch.int64"),
    ("targets absent", AdapterConfigError, "does not fit this model.*Adaptable modules"),
])
def test_each_bad_input_gets_its_own_clear_error(saved, case, error, message):
    weights, config = saved / WEIGHTS_NAME, saved / CONFIG_NAME
    if case == "missing dir":
        saved = saved / "nope"
    elif case == "missing config":
        config.unlink()
    elif case == "missing weights":
        weights.unlink()
    elif case == "pickle":
        torch.save(load_file(weights), saved / "adapter_model.bin")
        weights.unlink()
    elif case == "bad json":
        config.write_text(config.read_text()[:40])
    elif case == "json list":
        config.write_text("[1, 2]")
    elif case == "unknown peft_type":
        config.write_text(config.read_text().replace('"LORA"', '"VBLORA"'))
    elif case == "misspelt field":
        config.write_text(config.read_text().replace('"lora_alpha"', '"lora_alhpa"'))
    elif case == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:-50])
    elif case == "edited alpha":
        config.write_text(config.read_text().replace('"lora_alpha": 8', '"lora_alpha": 16'))
    elif case == "flipped data byte":
        data = bytearray(weights.read_bytes())
        data[-7] ^= 0x10
        weights.write_bytes(bytes(data))
    elif case == "rank mismatch":
        _as_foreign(saved, edit_config=lambda c: c.update(rank_pattern={}, r=4), edit_tensors=lambda t: t.update(
            {k: (v[:2] if "lora_A" in k else v[:, :2]).contiguous() for k, v in t.items() if "q_proj" in k}))
    elif case == "shape mismatch":
        _as_foreign(saved, edit_tensors=lambda t: t.update({Q0A: t[Q0A][:, :16].contiguous()}))
    elif case == "unknown module":
        _as_foreign(saved, edit_tensors=lambda t: t.update({"base_model.model.model.extra.lora_A.weight": t[Q0A].clone()}))
    elif case == "missing tensor":
        _as_foreign(saved, edit_tensors=lambda t: t.pop(Q0A.replace("lora_A", "lora_B")))
    elif case == "nan":
        _as_foreign(saved, edit_tensors=lambda t: t[Q0A].__setitem__((0, 0), float("nan")))
    elif case == "integer tensor":
        _as_foreign(saved, edit_tensors=lambda t: t.update({Q0A: t[Q0A].long()}))
    elif case == "targets absent":
        _as_foreign(saved, edit_config=lambda c: c.update(target_modules=["query"]))
    with pytest.raises(error, match=message) as caught:
        _load(saved)
    assert isinstance(caught.value, AdapterError)


def test_edited_config_loads_with_verify_integrity_off(saved):
    config = saved / CONFIG_NAME
    config.write_text(config.read_text().replace('"lora_alpha": 8', '"lora_alpha": 16'))
    model = _load(saved, verify_integrity=False)
    assert model.peft_config["default"].lora_alpha == 16


def test_harmless_fields_may_be_edited(saved):
    config = saved / CONFIG_NAME
    config.write_text(config.read_text().replace('"base_model_name_or_path": null', '"base_model_name_or_path": "my/base"'))
    assert _load(saved).peft_config["default"].base_model_name_or_path == "my/base"


def test_load_adapter_refuses_a_taken_name_before_reading(saved):
    model = _load(saved)
    with pytest.raises(AdapterNameError, match="exists"):
        model.load_adapter(saved, "default")


@pytest.mark.parametrize("name", PICKLE_NAMES)
def test_pickle_convert_command_makes_a_loadable_adapter(saved, name):
    """Every pickle name `read_adapter`'s refusal sends users to convert is one convert reads."""
    from typer.testing import CliRunner

    from lorakit.cli import app

    expected = output_of(_load(saved), inputs_for(tiny_llama()))
    tensors = load_file(saved / WEIGHTS_NAME)
    torch.save(tensors, saved / name)
    (saved / WEIGHTS_NAME).unlink()
    with pytest.raises(PickleRefusedError, match=f"{name} is a pickle file"):
        _load(saved)
    refused = CliRunner().invoke(app, ["convert", str(saved)])
    assert refused.exit_code != 0 and not (saved / WEIGHTS_NAME).exists()
    result = CliRunner().invoke(app, ["convert", str(saved), "--allow-pickle"])
    assert result.exit_code == 0, result.output
    torch.testing.assert_close(output_of(_load(saved), inputs_for(tiny_llama())), expected, atol=0, rtol=0)


# -- atomic saves ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fail_at", ["weights", "config"])
def test_interrupted_save_leaves_the_previous_adapter_intact(saved, monkeypatch, fail_at):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    model = _load(saved, is_trainable=True)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)

    def half_write_then_die(path):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    if fail_at == "weights":
        monkeypatch.setattr("lorakit.files.format.save_file", lambda tensors, path, **kwargs: half_write_then_die(path))
    else:
        monkeypatch.setattr(Path, "write_text", lambda self, *args, **kwargs: half_write_then_die(self))
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(saved)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before  # no temp files left either
    _load(saved)
