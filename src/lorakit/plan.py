"""Memory planner (`lorakit plan`): what a fine-tune or a multi-tenant deployment needs, part by part.

Model states, per parameter P (the recipes of the QLoRA paper and the LoRA lesson):
- full fine-tune: weights 2 B + gradients 2 B + Adam m, v 8 B = 12 B ("the 12-byte recipe";
  70B → 840 GB), plus a 4 B fp32 master copy if kept (16 B; 70B → 1.12 TB);
- LoRA: the frozen base in 16-bit, 2 B (the floor: 70B → 140 GB), plus per adapter
  parameter fp32 weight, gradient and Adam m, v = 16 B;
- QLoRA: quantized layers in NF4, 0.5 B (65B → 32.5 GB), plus the block constants of double
  quantization, 8/64 + 32/(64·256) = 0.127 bits (→ 33.5 GB); the rest of the model (embeddings,
  norms, head) stays 16-bit when the model's shape is known.

Activations (when batch, sequence and shape are given), per token and decoder layer of a
Llama-style block with gated MLP, in the compute dtype — the tensors autograd keeps for the
backward pass: 8h (norm inputs and outputs, q, rotated q, attention output, o_proj input) +
3·kv (k, v, rotated k) + 4f (gate, up, SiLU(gate), their product). With gradient
checkpointing only each layer's input (h) is kept, plus one layer's set during its
recomputation. The output layer keeps tokens × vocab fp32 logits, their log-softmax and,
during backward, their gradient (3 × tokens × vocab × 4 B).

Multi-tenant serving: N merged copies cost N × base; one shared base plus N adapters costs
base + N × adapter (14 GB and 50 × 128 MB: 700 GB vs 20.25 GB, 34.6x).

The count above is what the maths needs; eager PyTorch keeps more (RMSNorm and RoPE
temporaries, attention buffers, loss temporaries, allocator slack). Measured with HF
transformers in fp32 on CPU (SmolLM2-135M, LoRA r16, batch 4 x 128; bench/measure_step_memory.py)
the per-token memory is 1.6x the count, so activations and logits are multiplied by
ACTIVATION_FACTOR = 1.6. Checked on shapes not used for that fit — LoRA 2x128 (-5%) and
8x128 (+3%), QLoRA 4x128 (-3%) and 1x512 — within ±20% (tests/test_plan.py). Known gap:
with gradient checkpointing the measured peak was 16-23% above the plan (1.71-1.86 GB vs
1.43 GB for LoRA 4x128): what the recomputation keeps alive is not modelled, so read a
checkpointed plan as a lower bound.

`runtime` is the framework's own resident memory (the Python process with torch loaded),
which matters on CPU; it is 0 unless given.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorakit.errors import ConfigError

GB = 1e9
NF4_BITS = 4.0
ACTIVATION_FACTOR = 1.6  # eager PyTorch keeps this much more than the analytic count (see above)
DOUBLE_QUANT_CONSTANT_BITS = 8 / 64 + 32 / (64 * 256)  # absmax in 8 bits per 64 weights, fp32 per 256 absmax
PLAN_METHODS = ("full", "lora", "qlora")


@dataclass
class Shape:
    """What the planner needs to know about a decoder-only model (Llama-style)."""

    params: float
    layers: int | None = None
    hidden: int | None = None
    intermediate: int | None = None
    kv_dim: int | None = None  # num_key_value_heads × head_dim
    vocab: int | None = None
    unquantized: float = 0.0  # parameters outside the decoder's linear layers (embeddings, norms, head)

    @classmethod
    def from_model_dir(cls, path: str | Path) -> Shape:
        """Sizes read from a transformers config (parameters counted on the meta device: no memory)."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        params = sum(p.numel() for p in model.parameters())  # tied weights counted once
        linear = sum(m.weight.numel() for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings())
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(params=params, layers=config.num_hidden_layers, hidden=config.hidden_size,
                   intermediate=config.intermediate_size, kv_dim=kv_heads * head_dim, vocab=config.vocab_size,
                   unquantized=params - linear)

    def lora_params(self, r: int) -> float:
        """All-linear LoRA on q, k, v, o, gate, up, down: r·L·(9h + 2kv + 3f)."""
        if None in (self.layers, self.hidden, self.intermediate):
            return 0.0
        kv = self.kv_dim or self.hidden
        return r * self.layers * (9 * self.hidden + 2 * kv + 3 * self.intermediate)


# Llama-style shapes of the common sizes, for `--params` alone: (model, layers, hidden, MLP width,
# KV width = KV heads x head dim, vocab), from those models' config.json files.
STANDARD_SHAPES: dict[float, tuple[str, int, int, int, int, int]] = {
    7e9: ("Llama-2-7B", 32, 4096, 11008, 4096, 32000),
    8e9: ("Llama-3-8B", 32, 4096, 14336, 1024, 128256),
    13e9: ("Llama-2-13B", 40, 5120, 13824, 5120, 32000),
    34e9: ("CodeLlama-34B", 48, 8192, 22016, 1024, 32000),
    65e9: ("LLaMA-65B", 80, 8192, 22016, 8192, 32000),
    70e9: ("Llama-2-70B", 80, 8192, 28672, 1024, 32000),
}


def standard_shape(params: float) -> tuple[Shape, str] | None:
    """(the shape, what was assumed) when `params` is within 5% of a common size, else None.
    The parameter count stays the one given; embeddings and head (2 x vocab x hidden) are what
    QLoRA keeps in 16 bits."""
    for size, (name, layers, hidden, width, kv, vocab) in STANDARD_SHAPES.items():
        if abs(params - size) <= 0.05 * size:
            shape = Shape(params, layers, hidden, width, kv, vocab, unquantized=2 * vocab * hidden)
            return shape, (f"assumed the {name} shape: {layers} layers, hidden {hidden}, MLP {width}, KV width {kv}, "
                           f"vocab {vocab} (give --layers/--hidden/--intermediate, or --model, for another)")
    return None


@dataclass
class Plan:
    method: str
    parts_gb: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tenants: dict[str, float] | None = None
    recipes: dict[str, float] | None = None  # full fine-tune: total GB without and with the fp32 master copy

    @property
    def total_gb(self) -> float:
        return sum(self.parts_gb.values())

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "total_gb": self.total_gb}, indent=2)


def parse_count(text: str | float) -> float:
    """"70B" → 7e10, "135M" → 1.35e8, "7.5e9" → 7.5e9."""
    if isinstance(text, (int, float)):
        return float(text)
    match = re.fullmatch(r"\s*([\d.]+(?:e\d+)?)\s*([KMBT]?)\s*", str(text), flags=re.I)
    if not match:
        raise ConfigError(f"--params must look like 70B, 135M or 7.5e9, got {text!r}.")
    return float(match.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[match.group(2).upper()]


def plan(
    shape: Shape, method: str = "lora", r: int = 16, batch: int | None = None, seq: int | None = None,
    grad_ckpt: bool = False, master_copy: bool = False, weight_bytes: int = 2, compute_bytes: int | None = None,
    runtime_gb: float = 0.0, activation_factor: float = ACTIVATION_FACTOR,
) -> Plan:
    """Memory of one training setup, by part, in GB (1e9 bytes)."""
    if method not in PLAN_METHODS:
        raise ConfigError(f"--method must be one of {PLAN_METHODS}, got {method!r}.")
    compute_bytes = compute_bytes or weight_bytes
    P = shape.params
    result = Plan(method)
    parts = result.parts_gb
    if method == "full":
        parts["weights"] = P * weight_bytes / GB
        parts["gradients"] = P * weight_bytes / GB
        parts["optimizer (Adam m, v fp32)"] = P * 8 / GB
        if master_copy:
            parts["fp32 master copy"] = P * 4 / GB
    else:
        adapter = shape.lora_params(r)
        if method == "lora":
            parts["weights (frozen base)"] = P * weight_bytes / GB
        else:
            quantized = P - shape.unquantized
            parts["weights (NF4 values)"] = quantized * NF4_BITS / 8 / GB
            parts["quantization constants"] = quantized * DOUBLE_QUANT_CONSTANT_BITS / 8 / GB
            if shape.unquantized:
                parts["weights (unquantized: embeddings, norms)"] = shape.unquantized * weight_bytes / GB
        parts["adapters (fp32)"] = adapter * 4 / GB
        parts["adapter gradients (fp32)"] = adapter * 4 / GB
        parts["optimizer (Adam m, v fp32)"] = adapter * 8 / GB
        if not adapter:
            result.notes.append("adapter size unknown (give --layers/--hidden/--intermediate or --model): counted as 0")
    if batch and seq and shape.layers and shape.hidden and shape.intermediate:
        tokens = batch * seq
        kv = shape.kv_dim or shape.hidden
        per_layer = 8 * shape.hidden + 3 * kv + 4 * shape.intermediate  # floats per token per layer
        if grad_ckpt:
            floats = tokens * (shape.layers * shape.hidden + per_layer)
        else:
            floats = tokens * shape.layers * per_layer
        parts["activations"] = activation_factor * floats * compute_bytes / GB
        if shape.vocab:
            parts["logits, log-softmax, their gradient (fp32)"] = activation_factor * 3 * tokens * shape.vocab * 4 / GB
    elif batch or seq:
        result.notes.append("activations need --batch, --seq and the model shape (--layers --hidden --intermediate or --model)")
    if runtime_gb:
        parts["runtime (framework)"] = runtime_gb
    return result


def tenants(count: int, base_gb: float, adapter_mb: float) -> dict[str, float]:
    """N merged copies vs one shared base with N adapters (MB/1024 → GB, as the lesson counts)."""
    merged = count * base_gb
    shared = base_gb + count * adapter_mb / 1024
    return {"tenants": count, "merged_gb": merged, "shared_gb": shared, "saving_x": merged / shared}
