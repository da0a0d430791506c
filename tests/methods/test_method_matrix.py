"""Every method in the method table (methods/table.py) runs the same cases, as PEFT's testing_common.py runs
every tuner through one matrix: save → load gives the same outputs; a merge equals the unmerged model (or is
refused with a MergeError that says why); a mixed batch (one adapter per row, `__base__` rows) equals each
row alone; the engine's greedy tokens equal `generate` alone. A method added to the table is in the matrix
by itself — its config is built from its own job defaults, made small for the tiny model."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from conftest import assert_rows_equal_alone, inputs_for, output_of, tiny_llama
from lorakit.errors import MergeError
from lorakit.methods.table import METHODS, is_adapter_parameter
from lorakit.serve import Engine, SamplingParams

SMALL = {"r": 4, "init_r": 6, "target_r": 4, "num_virtual_tokens": 4, "encoder_hidden_size": 16,
         "reduction_factor": 4}  # the tiny model's sizes, for the keys a method's job defaults have
ATOL = 1e-5
SPECS = list(METHODS.values())


def _config(spec, seed: int):
    fields = {key: SMALL.get(key, value) for key, value in spec.job_defaults.items()}
    fill = getattr(spec, "job_fields", None)
    if fill is not None:
        fill(fields, "tiny", 10)
    torch.manual_seed(seed)
    return spec.config_class(task_type="CAUSAL_LM", **fields)


@pytest.fixture(scope="module", params=SPECS, ids=[spec.job_name for spec in SPECS])
def trained(request):
    """A tiny base and a model with two adapters of one method, "x" and "y", their weights moved off their
    initialisation (a LoRA B starts at 0: a zero adapter would prove nothing)."""
    spec = request.param
    base = tiny_llama()
    model = lorakit.get_peft_model(copy.deepcopy(base), _config(spec, 1), adapter_name="x")
    model.add_adapter("y", _config(spec, 2))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_adapter_parameter(name):
                param.add_(torch.randn(param.shape, generator=gen) * 0.2)
    return spec, base, model.eval()


def test_save_and_load_give_the_same_outputs(trained, tmp_path):
    spec, base, model = trained
    model.save_pretrained(tmp_path)
    inputs = inputs_for(base)
    for name in ("x", "y"):
        folder = tmp_path / name  # "default" would be at the root; named adapters in their folders
        loaded = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), folder, adapter_name=name).eval()
        model.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(output_of(loaded, inputs), output_of(model, inputs), atol=ATOL, rtol=0)


def test_a_merge_equals_the_unmerged_model_or_is_refused_saying_why(trained):
    spec, base, model = trained
    model.set_adapter("x")
    inputs = inputs_for(base)
    with torch.no_grad():
        unmerged = output_of(model, inputs)
    merged = copy.deepcopy(model)
    try:
        plain = merged.merge_and_unload(adapter_names=["x"])
    except MergeError as error:
        assert spec.peft_type in str(error) or "merge" in str(error).lower()
        return
    with torch.no_grad():
        torch.testing.assert_close(output_of(plain, inputs), unmerged, atol=1e-4, rtol=0)


def test_a_mixed_batch_equals_each_row_alone(trained):
    """Compared on the input's own positions: a virtual-token adapter puts its tokens in front of its row."""
    spec, base, model = trained
    names, seq = ["x", "__base__", "y", "x"], 7
    ids = inputs_for(base, batch=len(names), seq=seq)["input_ids"]
    assert_rows_equal_alone(model, base, {"input_ids": ids}, names, atol=ATOL, last=seq)


def test_the_engine_answers_as_generate_alone(trained):
    spec, base, model = trained
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    adapters = ["y", None, "x"]
    sampling = SamplingParams(max_tokens=5, ignore_eos=True)
    engine = Engine(copy.deepcopy(model), max_model_len=48, kv_cache_memory=1 << 22, block_size=4)
    served = [o.token_ids for o in engine.generate(prompts, adapters, sampling)]
    for prompt, adapter, tokens in zip(prompts, adapters, served, strict=True):
        ids = torch.tensor([prompt])
        call = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                    eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            if adapter is None:
                alone = base.generate(**call)[0, len(prompt):].tolist()
            else:
                model.set_adapter(adapter)
                alone = model.generate(**call)[0, len(prompt):].tolist()
        assert tokens == alone, (spec.job_name, adapter)
