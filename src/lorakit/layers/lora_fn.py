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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, x_d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        out = F.linear(x, weight, bias)
        h = F.linear(x_d, lora_a)  # (..., r)
        out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), lora_b.t(), alpha=scaling)
        ctx.scaling = scaling
        ctx.same_input = x_d is x
        ctx.save_for_backward(x_d, h, weight, lora_a, lora_b)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_d, h, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_xd, _, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        g = grad_out.reshape(-1, grad_out.shape[-1])
        g_h = g @ lora_b  # (N, r), unscaled
        grad_x = grad_xd = grad_bias = grad_a = grad_b = None
        if need_b:
            grad_b = torch.mm(g.t(), h.reshape(-1, h.shape[-1])).mul_(s)
        if need_a:
            grad_a = torch.mm(g_h.t(), x_d.reshape(-1, x_d.shape[-1])).mul_(s)
        if need_bias:
            grad_bias = g.sum(0)
        if need_x:
            grad_x = g @ weight
            if ctx.same_input:  # x_d is x: the LoRA part joins the base part in one GEMM
                grad_x.addmm_(g_h, lora_a, alpha=s)
            grad_x = grad_x.view(*grad_out.shape[:-1], -1)
        if need_xd and not ctx.same_input:
            grad_xd = torch.mm(g_h, lora_a).mul_(s).view(*grad_out.shape[:-1], -1)
        return grad_x, grad_xd, None, grad_bias, grad_a, grad_b, None
