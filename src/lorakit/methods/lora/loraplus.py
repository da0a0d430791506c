"""LoRA+ (Hayou et al. 2024): A and B learn at different rates — an optimizer for LoRA adapters."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.methods.lora.embedding import LoraEmbedding


def create_loraplus_optimizer(
    model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *, lr: float, loraplus_lr_ratio: float = 16.0,
    loraplus_lr_embedding: float = 1e-6, loraplus_weight_decay: float = 0.0, **kwargs,
) -> torch.optim.Optimizer:
    """LoRA+ (Hayou et al. 2024): B learns `loraplus_lr_ratio` times faster than A.

    With B = 0 at init, A and B play different roles, and one learning rate for both is
    inefficient for wide models; the paper sets η_B = λ·η_A with λ ≈ 16. Groups, as PEFT's
    create_loraplus_optimizer makes them: A (and anything else) at `lr`; B and 1-D adapter
    parameters (DoRA magnitudes, biases) at lr·λ — with `loraplus_weight_decay` unless in a
    LayerNorm or named "bias"; embedding adapters at `loraplus_lr_embedding`.
    """
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    decay = {n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in n}
    embedding_params = {id(p) for m in model.modules() if isinstance(m, LoraEmbedding) for p in
                        (*m.lora_embedding_A.values(), *m.lora_embedding_B.values())}
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding_params:
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            groups["B" if name in decay else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    optimizer = optimizer_cls([
        {"params": groups["A"], "weight_decay": loraplus_weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": loraplus_weight_decay, "lr": loraplus_lr_embedding},
        {"params": groups["B"], "weight_decay": loraplus_weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ], lr=lr, **kwargs)
    if type(optimizer).__name__ in ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit"):
        import bitsandbytes  # embeddings keep 32-bit optimizer state (as PEFT and bitsandbytes advise)

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
