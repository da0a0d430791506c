"""Quantized base models (QLoRA) through bitsandbytes: load, prepare, read back, measure.

QLoRA (Dettmers et al. 2023): the frozen base is stored in 4-bit NormalFloat (NF4, levels
at the quantiles of a normal distribution, blocks of 64 weights sharing one absmax scale),
the absmax scales are quantized again to 8 bits in blocks of 256 ("double quantization",
0.5 → 0.127 bits per parameter of overhead), and the LoRA adapters stay in 16/32-bit float
and train through the dequantized weights.

bitsandbytes stores a 4-bit weight as `Params4bit` (two 4-bit codes per uint8 byte plus a
quant_state holding the absmax scales, the nested scales and the code tables) and an 8-bit
one as `Int8Params` (int8 plus a per-row scale `SCB`, value = int8 · SCB / 127). We use its
quantizer and kernels (it has a CPU backend); nothing here quantizes by hand.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import ConfigError

QUANTIZE_CHOICES = ("nf4", "fp4", "int8")


def quant_kind(weight: torch.Tensor) -> str | None:
    """'4bit', '8bit' or None (a plain float weight)."""
    kind = type(weight).__name__
    return {"Params4bit": "4bit", "Int8Params": "8bit"}.get(kind)


def keep_training_layout(module: nn.Module) -> bool:
    """Keep a bitsandbytes 4-bit layer in the layout that training and dequantizing need.

    On a CPU with AVX512-BF16, bitsandbytes' `Linear4bit.forward` repacks the weight for its
    inference kernel on the first eval-mode forward without grad, and from then on every
    forward — training ones too — runs `gemv_4bit`, which has no backward: gradients through
    the base are silently wrong (measured on SmolLM2 NF4: 15% → 82% error against a dequantized
    fp32 reference; PEFT is hit the same way). The repacking is also lossy (absmax to bf16) and
    `dequantize_4bit` does not read the packed layout. So a layer whose adapters train, or whose
    weight we dequantize, turns the repacking off; a weight already repacked is converted back
    (bitsandbytes' own best-effort inverse). Returns whether a repacked weight was found.
    """
    if getattr(module, "support_avx512bf16_for_cpu", False):
        module.support_avx512bf16_for_cpu = False
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # no public name for it

    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    return True


def float_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as a float32 tensor in its logical shape (dequantized if needed).
    An fp32 weight is returned as itself, not copied: clone before writing to it."""
    weight = module.weight
    kind = quant_kind(weight)
    if kind == "4bit":
        import bitsandbytes.functional as bnbf

        if getattr(weight.quant_state, "packing_format_for_cpu", False):  # a weight read once may be read again
            keep_training_layout(module)
        weight = module.weight

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    if kind == "8bit" and weight.dtype == torch.int8:
        return weight.data.float() * weight.SCB.float()[:, None] / 127.0
    return weight.detach().float()


def requantize_like(old: torch.Tensor, values: torch.Tensor) -> nn.Parameter:
    """`values` quantized by bitsandbytes with the same settings as the quantized weight `old`."""
    import bitsandbytes as bnb

    if quant_kind(old) == "4bit":
        state = old.quant_state
        new = bnb.nn.Params4bit(values.to(state.dtype).contiguous(), requires_grad=False, quant_type=state.quant_type,
                                blocksize=state.blocksize, compress_statistics=state.nested,
                                quant_storage=old.quant_storage)
    else:
        new = bnb.nn.Int8Params(values.to(torch.float16).contiguous(), requires_grad=False, has_fp16_weights=False)
    return new.to(old.device)  # bitsandbytes quantizes when the parameter is moved to its device


def bnb_config(quantize: str, double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
               quant_storage: torch.dtype = torch.uint8):
    """transformers' BitsAndBytesConfig for "nf4" | "fp4" | "int8". `quant_storage`: the dtype the
    packed 4-bit values are stored in; FSDP flattens a layer's parameters into one tensor, so for
    QLoRA + FSDP it must be the model's float dtype (bf16), not bitsandbytes' default uint8."""
    from transformers import BitsAndBytesConfig

    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"quantize must be one of {QUANTIZE_CHOICES} or None, got {quantize!r}.")
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=quant_storage)


def is_quantized(model: nn.Module) -> bool:
    return any(quant_kind(p) for p in model.parameters())


def prepare_model_for_kbit_training(
    model: nn.Module, use_gradient_checkpointing: bool = True, gradient_checkpointing_kwargs: dict | None = None
) -> nn.Module:
    """PEFT's recipe before training adapters on a 4/8-bit base.

    Freeze every base parameter; cast the remaining 16-bit float parameters (norms,
    embeddings, head) to fp32 for stable training; make the input embeddings' output require
    grad, so gradients reach the adapters through checkpointed blocks whose inputs would
    otherwise carry none; turn off the KV cache (useless in training, and incompatible with
    checkpointing); enable non-reentrant gradient checkpointing.
    """
    for param in model.parameters():
        param.requires_grad_(False)
        if not quant_kind(param) and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    if use_gradient_checkpointing:
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if hasattr(model, "activation_checkpointing_enable"):  # the name transformers 5.x moved to (the old one warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
