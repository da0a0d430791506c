"""Prompt tuning, P-tuning (MLP, LSTM) and prefix tuning (plain, projected) against PEFT, fp32 atol 1e-5:
trainable counts, outputs, loss, gradients, saved tensors, files both ways, generate; rows of every
method (and LoRA, IA3, the base) in one batch, each equal to its adapter run alone."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch

import lorakit
from conftest import VOCAB, assert_rows_equal_alone, tiny_llama
from lorakit.errors import AdapterStateError, AdapterWeightsError, ConfigError, MergeError

ATOL = 1e-5
CASES = {
    "prompt": ("PromptTuningConfig", dict(num_virtual_tokens=4)),
    "p_tuning_mlp": ("PromptEncoderConfig", dict(num_virtual_tokens=4, encoder_hidden_size=16)),
    "p_tuning_lstm": ("PromptEncoderConfig", dict(num_virtual_tokens=3, encoder_hidden_size=8,
                                                  encoder_reparameterization_type="LSTM")),
    "prefix": ("PrefixTuningConfig", dict(num_virtual_tokens=4)),
    "prefix_projection": ("PrefixTuningConfig", dict(num_virtual_tokens=3, prefix_projection=True,
                                                     encoder_hidden_size=16)),
}


def _ours_from_peft(theirs) -> dict:
    """PEFT's prompt_encoder.<name>.… state under our names (base_model.prompt_encoder.<name>.…)."""
    return {f"base_model.{k}": v for k, v in theirs.state_dict().items() if k.startswith("prompt_encoder.")}


def twins(case: str, base=None):
    cls, settings = CASES[case]
    base = base if base is not None else tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, cls)(task_type="CAUSAL_LM", **settings))
    ours = lorakit.get_peft_model(copy.deepcopy(base), getattr(lorakit, cls)(task_type="CAUSAL_LM", **settings))
    result = ours.load_state_dict(_ours_from_peft(theirs), strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "prompt_encoder" in k]
    return ours, theirs


def batch(rows: int = 3, length: int = 7, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # one left-padded row
    return {"input_ids": ids, "attention_mask": mask}


def greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """The oracle's greedy continuation from full forwards (no cache)."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("case", CASES)
def test_outputs_loss_gradients_and_counts_equal_peft(case):
    ours, theirs = twins(case)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    inputs = batch()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's deprecation notes
        expected = theirs.eval()(**inputs).logits
        got = ours.eval()(**inputs).logits
    assert got.shape == expected.shape == (3, CASES[case][1]["num_virtual_tokens"] * (case.startswith(("prompt", "p_")))
                                           + 7, VOCAB)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    for model in (ours, theirs):
        model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.loss = model(**inputs, labels=labels).loss  # ours: the fast path's loss (no logits)
        model.loss.backward()
    torch.testing.assert_close(ours.loss, theirs.loss, atol=ATOL, rtol=0)
    expected = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    got = {n.removeprefix("base_model."): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("case", CASES)
def test_files_both_ways_and_saved_tensors_equal_peft(case, tmp_path):
    from safetensors.torch import load_file

    ours, theirs = twins(case)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    mine, peft_made = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert mine.keys() == peft_made.keys() == {"prompt_embeddings"}
    torch.testing.assert_close(mine["prompt_embeddings"], peft_made["prompt_embeddings"], atol=ATOL, rtol=0)
    inputs = batch()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = ours.eval()(**inputs).logits
        peft_loads_ours = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
        torch.testing.assert_close(peft_loads_ours(**inputs).logits, reference, atol=ATOL, rtol=0)
        we_load_peft = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs").eval()
        torch.testing.assert_close(we_load_peft(**inputs).logits, reference, atol=ATOL, rtol=0)
    assert we_load_peft.get_nb_trainable_parameters()[0] == 0  # loaded for inference, as PEFT


@pytest.mark.parametrize("case", CASES)
def test_generate_equals_the_oracles_greedy_continuation(case):
    """PEFT 0.21.2's generate() on transformers 5.24 disagrees with its own forward for these methods
    (prefix tuning: the prefix goes in as the deprecated `past_key_values` beside generate's own `cache`
    and is ignored; prompt tuning: it drops generate's position ids, so decode steps sit at other
    positions — a logit gap of 0.03 on this tiny model). So the oracle is PEFT's forward: greedy steps
    without a cache. Ours must equal it for every method."""
    ours, theirs = twins(case)
    ids = batch()["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = greedy(theirs.eval(), ids, 5)
        got = ours.eval().generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        assert got.tolist() == expected.tolist()


def test_text_and_sample_vocab_init_equal_peft(chat_model_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(chat_model_dir)
    settings = dict(task_type="CAUSAL_LM", num_virtual_tokens=6, prompt_tuning_init="TEXT",
                    prompt_tuning_init_text="Answer briefly:", tokenizer_name_or_path=str(chat_model_dir))
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.PromptTuningConfig(**settings))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(**settings))
    torch.testing.assert_close(ours.base_model.prompt_encoder["default"].embedding.weight,
                               theirs.prompt_encoder["default"].embedding.weight, atol=0, rtol=0)
    settings = dict(task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="SAMPLE_VOCAB")
    torch.manual_seed(3)
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.PromptTuningConfig(**settings))
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(**settings))
    torch.testing.assert_close(ours.base_model.prompt_encoder["default"].embedding.weight,
                               theirs.prompt_encoder["default"].embedding.weight, atol=0, rtol=0)


def mixed_model():
    base = tiny_llama()
    model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "lora")
    model.add_adapter("ia3", lorakit.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                               init_ia3_weights=False))
    model.add_adapter("prompt", lorakit.PromptTuningConfig(num_virtual_tokens=4))
    model.add_adapter("p_tuning", lorakit.PromptEncoderConfig(num_virtual_tokens=2, encoder_hidden_size=8))
    model.add_adapter("prefix", lorakit.PrefixTuningConfig(num_virtual_tokens=3))
    model.add_adapter("long_prefix", lorakit.PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=True))
    return model.eval(), base


NAMES = ["prompt", "lora", "prefix", "__base__", "p_tuning", "ia3", "long_prefix"]


def test_mixed_method_batch_rows_equal_each_adapter_alone():
    model, base = mixed_model()
    ids = batch(rows=len(NAMES), length=6, seed=4)["input_ids"]
    assert_rows_equal_alone(model, base, {"input_ids": ids}, NAMES, atol=ATOL, last=6)


def test_mixed_method_generate_rows_equal_each_adapter_alone():
    model, base = mixed_model()
    ids = batch(rows=len(NAMES), length=6, seed=5)["input_ids"]
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=NAMES, max_new_tokens=4, do_sample=False)
        for row, name in enumerate(NAMES):
            if name == "__base__":
                alone = base.generate(input_ids=ids[row:row + 1], max_new_tokens=4, do_sample=False)
            else:
                model.set_adapter(name)
                alone = model.generate(input_ids=ids[row:row + 1], max_new_tokens=4, do_sample=False)
            assert mixed[row].tolist() == alone[0].tolist(), name


def test_mixed_batch_trains_each_rows_adapter():
    """Gradients of a mixed batch reach each row's own adapter, as the sum of the rows run alone."""
    model, _ = mixed_model()
    model.train()
    names = ["prompt", "prefix", "lora"]
    for name in names:
        model.set_requires_grad(name, True)
    ids = batch(rows=3, length=5, seed=6)["input_ids"]
    model(input_ids=ids, labels=ids, adapter_names=names).loss.backward()
    for name in names:
        params = list(model.base_model.prompt_encoder[name].parameters()) if name in model.base_model.prompt_encoder \
            else [p for n, p in model.named_parameters() if f".{name}." in n and "lora_A" in n]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params), name


def test_refusals():
    model, _ = mixed_model()
    model.set_adapter("prompt")
    with pytest.raises(MergeError, match="no weight to merge"):
        model.merge_adapter()
    with pytest.raises(MergeError, match="PREFIX_TUNING"):
        model.merge_and_unload(adapter_names=["prefix"])
    model.set_adapter(["prompt", "prefix"])
    with pytest.raises(AdapterStateError, match="a row takes one"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long))
    model.set_adapter(["prompt", "lora"])  # a soft prompt stacked with a layer adapter is fine
    model(input_ids=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(AdapterStateError, match="per row"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long),
              adapter_names=lorakit.routing.Routing(["prompt", "lora", "lora"], per_token=True))
    model.set_adapter("prefix")
    with pytest.raises(AdapterStateError, match="num_beams=1"):
        model.generate(input_ids=torch.ones(1, 3, dtype=torch.long), num_beams=2, max_new_tokens=2)
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        lorakit.PromptTuningConfig()
    with pytest.raises(ConfigError, match="prompt_tuning_init_text"):
        lorakit.PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT")


def test_loading_refuses_a_file_of_the_wrong_shape_and_warns_for_a_reparameterised_one(tmp_path):
    ours, _ = twins("p_tuning_mlp")
    ours.save_pretrained(tmp_path)
    other = tiny_llama()
    other.config.num_hidden_layers = 2
    config = lorakit.PromptEncoderConfig(num_virtual_tokens=5, encoder_hidden_size=16)
    with pytest.raises(AdapterWeightsError, match=r"needs \(5, 32\)"):
        lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path, config=config, verify_integrity=False)
    with pytest.warns(UserWarning, match="training continues on the tokens themselves"):
        loaded = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert loaded.get_nb_trainable_parameters()[0] == 4 * 32  # the table itself


def test_bf16_base_matches_peft():
    """A bf16 base (how GPU users run): the virtual tokens are cast to the model's dtype, as PEFT does."""
    for case in ("prompt", "prefix"):
        ours, theirs = twins(case, base=tiny_llama().to(torch.bfloat16))
        inputs = batch()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(ours.eval()(**inputs).logits, theirs.eval()(**inputs).logits, atol=0, rtol=0)
