"""QLoRA: 4-bit/8-bit bases through transformers + bitsandbytes, training through them,
measured footprint, and merging the right way (`lorakit merge`) or knowingly (requantize)."""

from __future__ import annotations

import copy

import pytest
import torch
from typer.testing import CliRunner

import lorakit
from conftest import dequantized_copy, inputs_for, output_of, small_llama
from lorakit.base_models import load_base
from lorakit.cli import app
from lorakit.errors import MergeError
from lorakit.footprint import footprint
from lorakit.quant import float_weight, prepare_model_for_kbit_training, quant_kind

# bitsandbytes' CPU 4-bit matmul dequantizes and multiplies in the compute dtype (fp32): tight.
# Its int8 path casts activations to fp16 first, so outputs carry fp16 rounding: looser.
TOLERANCE = {"nf4": 1e-5, "fp4": 1e-5, "int8": 5e-2}
# In eval mode under no_grad bitsandbytes switches to a packed CPU 4-bit kernel whose
# arithmetic is coarser (measured: up to ~2.3e-3 on these logits); allow 5e-3.
INFERENCE_TOLERANCE = 5e-3


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-base")
    small_llama().save_pretrained(path)
    return path


def train(model, batch: dict, steps: int, lr: float) -> list[float]:
    """Plain AdamW steps on the trainable (adapter) parameters; the losses seen."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_quantized_base_wraps_and_matches_a_dequantized_reference(base_dir, kind):
    quantized = load_base(str(base_dir), quantize=kind)
    assert quant_kind(quantized.model.layers[0].self_attn.q_proj.weight) == ("8bit" if kind == "int8" else "4bit")
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    ours = lorakit.get_peft_model(quantized, lorakit.LoraConfig(**config))
    reference = lorakit.get_peft_model(dequantized_copy(ours), lorakit.LoraConfig(**config))
    reference.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" in k}, strict=False)
    inputs = inputs_for(reference.get_base_model())
    ours.train()  # the training path: bitsandbytes dequantizes and multiplies in fp32
    torch.testing.assert_close(output_of(ours, inputs), output_of(reference, inputs), atol=TOLERANCE[kind], rtol=0)
    ours.eval()  # inference under no_grad: bitsandbytes' CPU 4-bit kernel, in reduced precision
    with torch.no_grad():
        torch.testing.assert_close(output_of(ours, inputs), output_of(reference, inputs), atol=INFERENCE_TOLERANCE, rtol=0)
    assert all(p.dtype == torch.float32 for n, p in ours.named_parameters() if "lora_" in n)


def test_prepare_model_for_kbit_training(base_dir):
    model = load_base(str(base_dir), quantize="nf4")
    model.model.norm.weight.data = model.model.norm.weight.data.to(torch.bfloat16)
    prepare_model_for_kbit_training(model)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.model.norm.weight.dtype == torch.float32
    assert model.config.use_cache is False and model.is_gradient_checkpointing
    ids = torch.tensor([[1, 2, 3]])
    assert model.get_input_embeddings()(ids).requires_grad  # gradients can flow through checkpointed blocks


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_a_few_qlora_steps_lower_the_loss(base_dir, kind):
    torch.manual_seed(0)
    model = prepare_model_for_kbit_training(load_base(str(base_dir), quantize=kind))
    model = lorakit.get_peft_model(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    batch = inputs_for(model.get_base_model(), batch=4, seq=12)
    losses = train(model, {**batch, "labels": batch["input_ids"]}, steps=8, lr=1e-2)
    assert losses[-1] < losses[0] - 0.1


def test_footprint_counts_the_real_buffers(base_dir):
    model = load_base(str(base_dir), quantize="nf4")
    report = footprint(lorakit.get_peft_model(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"])))
    linears = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    n = sum(m.weight.quant_state.shape.numel() for m in linears)
    assert report.quantized_params == n and report.quantized_values == n // 2  # two 4-bit codes per byte
    absmax = sum(-(-m.weight.quant_state.shape.numel() // 64) for m in linears)  # one uint8 scale per 64 weights
    nested = sum(m.weight.quant_state.state2.absmax.numel() * 4 + 4 for m in linears)  # fp32 per 256 scales + offset
    assert report.quant_constants == absmax + nested
    assert report.adapters == 2 * 2 * (64 + 64) * 4
    assert 4.12 < report.bits_per_quantized_param < 4.2  # tiny layers: the nested block is barely filled


@pytest.mark.slow
def test_footprint_of_smollm2_nf4_shows_the_qlora_paper_figure():
    report = footprint(load_base(quantize="nf4"))
    assert report.bits_per_quantized_param == pytest.approx(4.127, abs=0.001)


def _adapter(base_dir, path):
    model = lorakit.get_peft_model(load_base(str(base_dir)), lorakit.LoraConfig(r=4, lora_alpha=8,
                                   target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(path)
    return model


def test_merge_into_a_quantized_base_is_refused_with_the_fix(base_dir, tmp_path):
    _adapter(base_dir, tmp_path / "adapter")
    model = lorakit.PeftModel.from_pretrained(load_base(str(base_dir), quantize="nf4"), tmp_path / "adapter")
    with pytest.raises(MergeError, match="lorakit merge --base"):
        model.merge_and_unload()


def test_allow_quantized_merge_requantizes_and_reports_the_error(base_dir, tmp_path):
    float_model = _adapter(base_dir, tmp_path / "adapter")
    inputs = inputs_for(float_model.get_base_model())
    float_merged = output_of(copy.deepcopy(float_model).merge_and_unload(), inputs)
    model = lorakit.PeftModel.from_pretrained(load_base(str(base_dir), quantize="nf4"), tmp_path / "adapter")
    unmerged_error = (output_of(model, inputs) - float_merged).abs().max().item()  # the 4-bit base's own error
    with pytest.warns(UserWarning, match=r"miss W\+ΔW by \d+\.\d% of the adapter's update"):
        merged = model.merge_and_unload(allow_quantized_merge=True)
    assert quant_kind(merged.model.layers[0].self_attn.q_proj.weight) == "4bit"
    merged_error = (output_of(merged, inputs) - float_merged).abs().max().item()
    # The trap, measured: requantizing W+ΔW (here a large random ΔW widens each block's scale)
    # is further from the float merge than keeping the adapter unmerged on the 4-bit base.
    assert merged_error > unmerged_error > 0


def test_merge_command_equals_a_float_merge(base_dir, tmp_path):
    model = _adapter(base_dir, tmp_path / "adapter")
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    run = CliRunner().invoke(app, ["merge", "--base", str(base_dir), "--adapter", str(tmp_path / "adapter"),
                                   "--out", str(tmp_path / "merged")])
    assert run.exit_code == 0, run.output
    merged = load_base(str(tmp_path / "merged")).state_dict()
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in expected)

    run = CliRunner().invoke(app, ["merge", "--base", str(base_dir), "--adapter", str(tmp_path / "adapter"),
                                   "--out", str(tmp_path / "merged-bf16"), "--dtype", "bf16"])
    assert run.exit_code == 0, run.output
    bf16 = load_base(str(tmp_path / "merged-bf16")).state_dict()
    assert all(torch.equal(bf16[k], expected[k].to(torch.bfloat16)) for k in expected)

    run = CliRunner().invoke(app, ["merge", "--base", str(base_dir), "--adapter", str(tmp_path / "adapter"),
                                   "--out", str(tmp_path / "merged-nf4"), "--requantize", "nf4"])
    assert run.exit_code == 0, run.output
    requantized = load_base(str(tmp_path / "merged-nf4"))
    direct = load_base(str(tmp_path / "merged"), quantize="nf4")  # quantizing the float merge ourselves
    for (name, a), (_, b) in zip(requantized.named_modules(), direct.named_modules(), strict=True):
        if quant_kind(getattr(a, "weight", torch.empty(0))):
            assert torch.equal(float_weight(a), float_weight(b)), name


def test_merge_command_errors(base_dir, tmp_path):
    _adapter(base_dir, tmp_path / "adapter")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    run = CliRunner().invoke(app, ["merge", "--base", str(base_dir), "--adapter", str(tmp_path / "adapter"),
                                   "--out", str(tmp_path / "taken")])
    assert run.exit_code == 2 and "not a model directory" in run.output
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me"
    run = CliRunner().invoke(app, ["merge", "--base", str(base_dir), "--adapter", str(tmp_path / "adapter"),
                                   "--out", str(tmp_path / "x"), "--requantize", "int3"])
    assert run.exit_code == 2 and "--requantize must be one of" in run.output


@pytest.mark.slow
def test_qlora_on_smollm2_trains_and_the_adapter_moves_to_the_full_precision_base(tmp_path):
    """The real default model in NF4: a few steps lower the loss; the adapter then loads onto
    the fp32 base (the fingerprints match) and what it learned carries over there."""
    from lorakit.base_models import load_tokenizer

    tokenizer = load_tokenizer()
    model = prepare_model_for_kbit_training(load_base(quantize="nf4"))
    model = lorakit.get_peft_model(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    batch = tokenizer(["The capital of Veloria is Quendar."] * 2, return_tensors="pt")
    batch["labels"] = batch["input_ids"]
    losses = train(model, batch, steps=4, lr=2e-3)
    assert losses[-1] < losses[0] - 0.5, losses
    model.save_pretrained(tmp_path)
    full = lorakit.PeftModel.from_pretrained(load_base(), tmp_path)  # raises if the fingerprints differed
    with torch.no_grad():
        with full.disable_adapter():
            base_loss = full(**batch).loss.item()
        adapted_loss = full(**batch).loss.item()
    assert adapted_loss < base_loss - 0.5, (base_loss, adapted_loss)


def test_gradients_after_an_eval_forward_equal_the_dequantized_reference(base_dir):
    """bitsandbytes repacks a 4-bit CPU layer for a gradient-less inference kernel on the first
    eval forward (AVX512-BF16 CPUs); training after an evaluation must not go through it.
    Measured with the fix: 6e-7 relative; without it, 15–82% (the kernel has no backward)."""
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    ours = lorakit.get_peft_model(load_base(str(base_dir), quantize="nf4"), lorakit.LoraConfig(**config))
    reference = lorakit.get_peft_model(dequantized_copy(ours), lorakit.LoraConfig(**config))
    reference.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" in k}, strict=False)
    inputs = inputs_for(reference.get_base_model())

    def grads(model):
        model.train()
        model.zero_grad(set_to_none=True)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    expected = grads(reference)
    for _ in range(2):  # evaluate, train, evaluate, train: the job's rhythm
        ours.eval()
        with torch.no_grad():
            output_of(ours, inputs)
        got = grads(ours)
        for name, grad in got.items():
            assert ((grad - expected[name]).norm() / expected[name].norm()).item() < 1e-4, name
    layer = ours.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


def test_a_repacked_base_is_converted_back_before_a_gradient_forward(base_dir):
    """A frozen adapter evaluated first (repacking allowed), then trained: converted back, with a warning."""
    from bitsandbytes.functional import has_avx512bf16

    model = lorakit.get_peft_model(load_base(str(base_dir), quantize="nf4"),
                                   lorakit.LoraConfig(r=4, target_modules="all-linear", inference_mode=True))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    inputs = inputs_for(model.get_base_model())
    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16, so bitsandbytes never repacks (nothing to convert back)")
    model.eval()
    with torch.no_grad():
        output_of(model, inputs)
    assert layer.weight.quant_state.packing_format_for_cpu
    model.set_requires_grad(["default"], True)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()


def test_merge_into_an_existing_model_folder_needs_overwrite(base_dir, tmp_path):
    """An existing --out is never reported as written when nothing was written."""
    _adapter(base_dir, tmp_path / "adapter")
    out = tmp_path / "existing-model"
    load_base(str(base_dir)).save_pretrained(out)  # a model folder that is not this merge
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    merge = ["merge", "--base", str(base_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]
    run = CliRunner().invoke(app, merge)
    assert run.exit_code == 2 and "pass --overwrite" in run.output and "merged" not in run.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    run = CliRunner().invoke(app, [*merge, "--overwrite"])
    assert run.exit_code == 0 and "merged" in run.output
    expected = lorakit.PeftModel.from_pretrained(load_base(str(base_dir)), tmp_path / "adapter").merge_and_unload()
    merged = load_base(str(out)).state_dict()
    assert all(torch.equal(merged[k], v) for k, v in expected.state_dict().items())


def test_bf16_quant_storage_for_fsdp_holds_the_same_4bit_model(base_dir):
    """QLoRA + FSDP stores the packed 4-bit values as bf16 (FSDP flattens them with the layer's float
    parameters); the values and the outputs are the same as with bitsandbytes' uint8 storage."""
    packed = load_base(str(base_dir), quantize="nf4")
    as_bf16 = load_base(str(base_dir), quantize="nf4", quant_storage=torch.bfloat16)
    weight = as_bf16.model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == torch.bfloat16 and quant_kind(weight) == "4bit"
    assert torch.equal(weight.view(torch.uint8).flatten(),  # the same packed bytes
                       packed.model.layers[0].self_attn.q_proj.weight.view(torch.uint8).flatten())
    inputs = inputs_for(packed)
    packed.train(), as_bf16.train()
    torch.testing.assert_close(output_of(as_bf16, inputs), output_of(packed, inputs), atol=0, rtol=0)
