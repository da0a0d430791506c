"""The causal-LM loss without full logits: LM head + cross-entropy, chunked, gradient in forward.

A training step of a 135M model with a 49k vocabulary spends about a third of its time on
the LM head and the loss (profiled on SmolLM2, batch 4 x 128: head GEMM 357 ms, its backward
167 ms, log-softmax 165 + 172 ms, zero-filling the 100 MB logits gradient 153 ms, of 2.9 s).
Here, only positions whose label is not -100 reach the head at all, and they go through it
in chunks of up to CHUNK_ROWS rows: for each chunk, logits → logsumexp → loss, and at once the
gradient of the loss w.r.t. the hidden states, (softmax − onehot) · W, written into a
(rows × hidden) buffer. Backward only scales that buffer. Full logits are never held, and
the head's weight is frozen (its gradient is not needed; otherwise we fall back).

`causal_lm_loss_forward` runs a transformers causal LM this way when it is safe to: a model
type whose forward is exactly backbone → lm_head → shifted cross-entropy (no logit scaling or
soft-capping), a plain frozen `nn.Linear` head, and no inputs we do not know. The output
then has `loss` and no `logits`. `PeftModel.set_fast_path(False)` turns it off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
# Rows per chunk: GEMMs with fewer rows run slower (SmolLM2's head, 512 rows in all: 128-row
# chunks 492 ms, 256-row 374 ms, one 512-row GEMM 352 ms), while the chunk's logits buffer
# costs rows x vocab x 4 bytes (256 x 49152: 50 MB). At most CHUNK_LOGITS logits per chunk.
CHUNK_ROWS = 256
CHUNK_LOGITS = 1 << 24
# forward = backbone → lm_head → ForCausalLMLoss, nothing in between (checked in their modeling code)
MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2"})
# inputs we pass to the backbone unchanged; anything else means "not the plain training call"
BACKBONE_KWARGS = frozenset({"attention_mask", "position_ids", "inputs_embeds", "token_type_ids", "use_cache",
                             "output_attentions", "output_hidden_states", "cache_position", "past_key_values", "cache"})


class LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(hidden @ Wᵀ + b, target) / divisor, for a frozen W.

    The two head GEMMs run in the head's dtype, or under autocast in the autocast dtype (as the
    plain path's lm_head would: measured on SmolLM2 4x128, the fp32 head was 0.46 s of a 1.9 s
    bf16-autocast step); the softmax and the loss are always fp32 (float64 for a float64 head:
    gradcheck). ∂L/∂hidden = (softmax − onehot) · W / divisor.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                divisor: torch.Tensor) -> torch.Tensor:
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            gemm_dtype = torch.get_autocast_dtype(device_type)
            weight, bias = weight.to(gemm_dtype), bias.to(gemm_dtype) if bias is not None else None
        rows = max(1, min(CHUNK_ROWS, CHUNK_LOGITS // weight.shape[0]))
        dtype = torch.promote_types(weight.dtype, torch.float32)  # of the logits
        exact = weight.dtype == hidden.dtype == dtype  # GEMMs straight into the logits buffer
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # One logits buffer, reused by every chunk and updated in place (no per-chunk allocations).
        buffer = torch.empty((min(rows, hidden.shape[0]), weight.shape[0]), dtype=dtype, device=hidden.device)
        with torch.autocast(device_type, enabled=False):
            for start in range(0, hidden.shape[0], rows):
                h, t = hidden[start:start + rows].to(weight.dtype), targets[start:start + rows]
                logits = buffer[: h.shape[0]]
                if not exact:  # a half-precision head (or input): its logits, upcast
                    logits.copy_(F.linear(h, weight, bias))
                elif bias is None:
                    torch.mm(h, weight.t(), out=logits)
                else:
                    torch.addmm(bias, h, weight.t(), out=logits)
                target = logits.gather(1, t[:, None]).squeeze(1)
                peak = logits.amax(dim=1, keepdim=True)
                norm = logits.sub_(peak).exp_().sum(dim=1, keepdim=True)  # logits now hold exp(logit − peak)
                total += (peak.squeeze(1) + norm.squeeze(1).log() - target).sum()
                if grad is not None:  # dloss/dlogits = softmax − onehot
                    logits.div_(norm)
                    logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                    if exact:
                        torch.mm(logits, weight, out=grad[start:start + rows])
                    else:
                        grad[start:start + rows] = torch.mm(logits.to(weight.dtype), weight)
        if grad is not None:
            ctx.save_for_backward(grad, divisor)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad, divisor = ctx.saved_tensors
        return grad * (grad_output / divisor).to(grad.dtype), None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor,
                         num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """HF's shifted causal-LM loss (ForCausalLMLoss) of `head(hidden)`, without the full logits.

    hidden: (batch, seq, dim); labels: (batch, seq) with -100 where there is no loss. As in
    transformers, the loss is the mean over counted tokens, or their sum / num_items_in_batch
    when Trainer passes that (gradient accumulation).
    """
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != IGNORE_INDEX
    rows = hidden[:, :-1][keep]
    if num_items_in_batch is None:
        divisor = keep.sum().clamp_min(1).to(torch.float32)
    else:
        divisor = torch.as_tensor(num_items_in_batch, device=hidden.device, dtype=torch.float32)
    if rows.shape[0] == 0:  # nothing to learn here: a zero that still connects to the graph
        return hidden.sum() * 0.0
    return LinearCrossEntropy.apply(rows, head.weight, head.bias, targets[keep], divisor)


def fused_loss_applies(model: nn.Module, labels, kwargs: dict) -> bool:
    """Whether `model(**inputs, labels=labels)` may run as backbone + linear_cross_entropy."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (
        labels is not None and torch.is_grad_enabled() and model.training
        and getattr(config, "model_type", None) in MODEL_TYPES
        and not getattr(config, "final_logit_softcapping", None) and getattr(config, "logit_scale", None) in (None, 1.0)
        and type(head) is nn.Linear and not any(p.requires_grad for p in head.parameters())
        and getattr(model, "base_model", model) is not model
        and set(kwargs) <= BACKBONE_KWARGS | {"num_items_in_batch", "return_dict"}
        and kwargs.get("return_dict", True) is not False
    )


def causal_lm_loss_forward(model: nn.Module, input_ids, labels, kwargs: dict):
    """The causal LM's training forward with `linear_cross_entropy` as its loss (logits=None)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("return_dict", None)
    out = model.base_model(input_ids, **kwargs)
    loss = linear_cross_entropy(out.last_hidden_state, model.get_output_embeddings(), labels, num_items)
    # transformers 5 renamed past_key_values to cache (reading the old name warns)
    name = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    cache = {name: getattr(out, name, None)}
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=getattr(out, "hidden_states", None),
                                  attentions=getattr(out, "attentions", None), **cache)
