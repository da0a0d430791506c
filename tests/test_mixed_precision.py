"""Mixed precision is a normal path: the fused LoRA op and the fused loss under autocast and
with half-precision bases, against the plain reference path and an fp32 run; gradcheck of
every custom autograd function in float64.

Tolerances. Half precision rounds every GEMM output to 8 (bf16) or 11 (fp16) mantissa bits,
and the fused and plain paths round in different places (one addmm vs a GEMM, a scale and an
add), so they cannot agree bit for bit. What must hold: the loss agrees to bf16's resolution
(measured |Δ| ≈ 6e-4 on a loss of 4.2; allowed 1e-2), and each gradient tensor agrees with the
plain path's to within bf16 noise (measured relative L2 error ≤ 0.06 between the two under
autocast, each 0.015–0.09 away from fp32; allowed 0.15 — a wrong scaling or a lost term gives
≥ 0.5). Without autocast, a bf16 base with fp32 adapters rounds only the base GEMM and the
final add, so the two paths agree far closer (measured ≤ 1.5e-2 max, allowed 2e-2 relative).
"""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from conftest import VOCAB, tiny_gpt2, tiny_llama
from lorakit.fused_loss import LinearCrossEntropy
from lorakit.methods.lora.fused import LoraLinearFunction

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def wrapped(builder, dtype=torch.float32):
    model = lorakit.get_peft_model(builder().to(dtype), lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return model


def batch(seed: int = 3) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 9), generator=gen)
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "labels": labels}


def step(model, inputs: dict, autocast: torch.dtype | None = None):
    """(loss, {name: grad}) of one training step, optionally under CPU autocast."""
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = model(**inputs)
    out.loss.backward()
    return out.loss.float(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def reference(model):
    ref = copy.deepcopy(model)
    ref.set_fast_path(False)
    return ref


def relative_errors(grads: dict, expected: dict) -> dict[str, float]:
    assert grads.keys() == expected.keys() and grads
    return {n: ((grads[n].float() - expected[n].float()).norm() / expected[n].float().norm()).item() for n in grads}


@pytest.mark.parametrize("arch", BUILDERS)
def test_fused_path_under_bf16_autocast_equals_the_reference_path(arch):
    model = wrapped(BUILDERS[arch])
    inputs = batch()
    fast_loss, fast = step(model, inputs, torch.bfloat16)
    ref_loss, ref = step(reference(model), inputs, torch.bfloat16)
    assert abs(fast_loss - ref_loss) < 1e-2
    assert max(relative_errors(fast, ref).values()) < 0.15
    assert all(g.dtype == torch.float32 for g in fast.values())  # gradients land in the fp32 adapters


def test_the_fused_op_runs_under_autocast():
    model = wrapped(tiny_llama)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(2, 5, 32, requires_grad=True))
    assert type(out.grad_fn).__name__ == "LoraLinearFunctionBackward" and out.dtype == torch.bfloat16


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_bf16_base_fused_equals_reference(adapter_dtype):
    model = wrapped(tiny_llama, torch.bfloat16)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(adapter_dtype)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(layer(torch.randn(2, 5, 32, dtype=torch.bfloat16)).grad_fn).__name__ == "LoraLinearFunctionBackward"
    inputs = batch()
    fast_loss, fast = step(model, inputs)
    ref_loss, ref = step(reference(model), inputs)
    tolerance = 2e-2 if adapter_dtype == torch.float32 else 0.15  # bf16 adapters: every GEMM rounds
    assert abs(fast_loss - ref_loss) < 1e-2
    assert max(relative_errors(fast, ref).values()) < tolerance
    assert all(g.dtype == adapter_dtype for g in fast.values())


def test_generate_under_fp16_autocast_equals_the_reference_path():
    model = wrapped(tiny_llama).eval()
    ids = batch()["input_ids"][:2]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        fast = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        slow = reference(model).generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("same_input", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_lora_linear_function(same_input, with_bias):
    gen = torch.Generator().manual_seed(0)

    def tensor(*shape, grad=True):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(grad)

    x = tensor(2, 3, 5)
    x_d = x if same_input else tensor(2, 3, 5)
    weight = tensor(4, 5, grad=False)
    bias = tensor(4) if with_bias else None
    assert torch.autograd.gradcheck(
        lambda x, x_d, bias, a, b: LoraLinearFunction.apply(x, x if same_input else x_d, weight, bias, a, b, 0.7),
        (x, x_d, bias, tensor(2, 5), tensor(4, 2)),
    )


def test_gradcheck_linear_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, generator=gen, dtype=torch.float64)
    bias = torch.randn(11, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 11, (7,), generator=gen)
    divisor = torch.tensor(7.0, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda h: LinearCrossEntropy.apply(h, weight, bias, targets, divisor), (hidden,))
