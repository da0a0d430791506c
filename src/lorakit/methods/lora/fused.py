"""One autograd op for a LoRA linear layer on a float base: y = x Wᵀ + b + s · (x_d Aᵀ) Bᵀ.

The plain path runs it as five autograd nodes (base linear, A, B, a scaling multiply, an
add) and two more passes over the output in backward. This op:

- folds the scaling and the add into one in-place GEMM (`addmm_` with alpha=s) in forward,
  and the LoRA part of the input gradient into the base's in backward;
- saves only x_d (the LoRA input; the same tensor as x when dropout is off) and the rank-r
  intermediate h = x_d Aᵀ; never forms B A;
- computes no gradient for the frozen base weight, and none for A, B or the bias unless
  they require it.

Dropout stays outside (x_d = dropout(x) by the layer's own module), so its masks and its
random stream are exactly the plain path's — the tests compare the two with dropout on.

Dtypes follow the plain path exactly (tests/test_mixed_precision.py):
- no autocast: the base GEMM runs in the base weight's dtype, the LoRA GEMMs in the
  adapter's (x_d is cast to A's dtype, as PEFT does); when the two differ (a bf16 base with
  fp32 adapters) Δ = s·h Bᵀ is formed in the adapter dtype and rounded once into the output,
  which is what `result + adapter_output(x).to(result.dtype)` does. x_d is saved in its own
  dtype and cast again in backward: no fp32 copy of a half-precision input is kept.
- under `torch.autocast`: every GEMM runs in the autocast dtype, as each `nn.Linear` of the
  plain path would. The op casts its inputs itself and runs with autocast off inside (an
  autocast-cast `addmm_` into a half-precision output would mix dtypes); autograd casts
  each returned gradient back to its input's dtype.

Chain rule (g = ∂L/∂y, N rows):  ∂L/∂B = s·gᵀh,  g_h = g B,  ∂L/∂A = s·g_hᵀ x_d,
∂L/∂b = Σ g,  ∂L/∂x = g W (+ s·g_h A when x_d is x),  ∂L/∂x_d = s·g_h A.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger("lorakit")


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, x_d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        same_input = x_d is x
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):  # everything in the autocast dtype, as the plain path
            dtype = torch.get_autocast_dtype(device_type)
            x, weight, lora_a, lora_b = (t.to(dtype) for t in (x, weight, lora_a, lora_b))
            x_d = x if same_input else x_d.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            out = F.linear(x, weight, bias)  # base dtype
            h = F.linear(x_d.to(lora_a.dtype), lora_a)  # (..., r), adapter dtype
            if lora_b.dtype == out.dtype:
                _flat(out).addmm_(_flat(h), lora_b.t(), alpha=scaling)
            else:  # Δ in the adapter dtype, rounded once into the output
                _flat(out).add_(torch.mm(_flat(h), lora_b.t()).mul_(scaling).to(out.dtype))
        ctx.scaling = scaling
        ctx.same_input = same_input
        ctx.save_for_backward(x_d, h, weight, lora_a, lora_b)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_d, h, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_xd, _, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        grad_x = grad_xd = grad_bias = grad_a = grad_b = None
        with torch.autocast(grad_out.device.type, enabled=False):
            g = _flat(grad_out).to(weight.dtype)  # (N, out), base dtype
            g_lora = g.to(lora_b.dtype)
            g_h = g_lora @ lora_b  # (N, r), unscaled
            if need_b:
                grad_b = torch.mm(g_lora.t(), _flat(h)).mul_(s)
            if need_a:
                grad_a = torch.mm(g_h.t(), _flat(x_d).to(lora_a.dtype)).mul_(s)
            if need_bias:
                grad_bias = g.sum(0)
            if need_x:
                grad_x = g @ weight
                if ctx.same_input and lora_a.dtype == grad_x.dtype:  # the LoRA part joins the base part in one GEMM
                    grad_x.addmm_(g_h, lora_a, alpha=s)
                elif ctx.same_input:
                    grad_x.add_(torch.mm(g_h, lora_a).mul_(s).to(grad_x.dtype))
                grad_x = grad_x.view(*grad_out.shape[:-1], -1)
            if need_xd and not ctx.same_input:
                grad_xd = torch.mm(g_h, lora_a).mul_(s).view(*grad_out.shape[:-1], -1)
        return grad_x, grad_xd, None, grad_bias, grad_a, grad_b, None


_logged_fallbacks: set[str] = set()


def log_fallback_once(reason: str) -> None:
    """A fast path that cannot apply says so once per reason (a silent slow path is a defect)."""
    if reason not in _logged_fallbacks:
        _logged_fallbacks.add(reason)
        logger.warning("lorakit: fused LoRA op not used (%s); running the plain path, same numbers, slower.", reason)
