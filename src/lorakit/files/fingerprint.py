"""Base-model fingerprint: does this adapter belong to this base model?

An adapter trained on base v1 and loaded onto v2 (same shapes, different weights) runs
without any error and silently produces worse output. So a saved adapter records where
it came from, and loading compares.

What is recorded (≈10 KB of JSON in the safetensors metadata, which PEFT ignores):
- `arch`: a hash of the layout — name, kind and logical shape of every Linear/Conv1D,
  Embedding and norm weight. Any change of architecture, size or module names shows here.
- `samples`: 256 values at fixed positions of a few weight tensors: every embedding, up to
  8 norm weights spread over the depth, and the first, middle and last linear layer.

How two fingerprints are compared: `arch` must be equal, and for each sampled tensor the
relative RMS difference ‖a−b‖/‖a‖ must stay under a tolerance. Tensors that are float in
every variant (embeddings, norms) must agree within 0.4%: fp32 vs bf16 rounding is
≈0.1%, while a retrained base (every weight moved by ~1%) is ≈1%. A linear layer that is
quantized on either side only has to agree within 30% (NF4 alone is ≈9%, another
model ≈140%).

What it can detect: a different architecture or size; a base whose embeddings, norms or
sampled linear layers changed by ≳0.5% (fine-tuned, retrained, another checkpoint);
with a quantized base, gross differences in the sampled linear layers.
What it cannot detect: changes confined to linear layers that were not sampled (e.g. a
base fine-tuned with LoRA merged into some layers only and frozen embeddings), changes
below ~0.4%, and — when one side is 4-bit — linear-layer changes smaller than the
quantization error. It is a guard against the common mistake, not a cryptographic proof.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.errors import AdapterBaseMismatch
from lorakit.layer_shapes import conv1d_type, linear_features
from lorakit.methods import inner_module
from lorakit.quant import float_weight, quant_kind

VERSION = 1
SAMPLES = 256
FLOAT_TOLERANCE = 0.004
QUANTIZED_TOLERANCE = 0.30
MAX_NORMS = 8


def base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules of the base model as it was before wrapping (adapters are looked through)."""
    stack = [("", model)]
    while stack:
        prefix, module = stack.pop()
        module = inner_module(module)
        yield prefix, module
        children = [(f"{prefix}.{name}" if prefix else name, child) for name, child in module.named_children()]
        stack.extend(reversed(children))  # depth-first, in definition order


@functools.cache
def _kind(module_type: type) -> str | None:
    """'linear', 'embedding', 'norm' or None — decided once per module class, not per module."""
    if issubclass(module_type, nn.Linear) or module_type is conv1d_type():
        return "linear"
    if issubclass(module_type, nn.Embedding):
        return "embedding"
    return "norm" if "norm" in module_type.__name__.lower() else None


def _layout(model: nn.Module) -> tuple[list[tuple], dict[str, nn.Module]]:
    layout, sampled = [], {}
    linears, norms = [], []
    seen: set[int] = set()
    for name, module in base_modules(model):
        kind = _kind(type(module))
        if kind is None or id(module) in seen:
            continue
        seen.add(id(module))
        if kind == "linear":
            layout.append((name, "linear", *linear_features(module)[:2]))
            linears.append((name, module))
        elif kind == "embedding":
            layout.append((name, "embedding", module.num_embeddings, module.embedding_dim))
            sampled[name] = module
        elif isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 1:
            layout.append((name, "norm", module.weight.numel()))
            norms.append((name, module))
    for group, count in ((norms, MAX_NORMS), (linears, 3)):
        if group:
            picks = sorted({round(i * (len(group) - 1) / max(count - 1, 1)) for i in range(min(count, len(group)))})
            sampled.update(group[i] for i in picks)
    return layout, sampled


def _sample(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    if quant_kind(weight):
        flat = float_weight(module).reshape(-1)
    else:
        flat = weight.detach().reshape(-1)
    count = min(SAMPLES, flat.numel())  # evenly spaced positions, in integers (float linspace overshoots)
    index = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
    return flat.index_select(0, index).float().cpu()  # gather first, convert only the samples


def base_fingerprint(model: nn.Module) -> dict:
    """The fingerprint of `model`'s base weights (a bare model or a wrapped one)."""
    layout, sampled = _layout(model)
    arch = hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]
    samples = {}
    for name, module in sampled.items():
        values = _sample(module).numpy().astype("<f4").tobytes()
        samples[name] = {"q": quant_kind(module.weight), "v": base64.b64encode(values).decode()}
    return {"version": VERSION, "arch": arch, "samples": samples}


@dataclass
class Comparison:
    match: bool
    reason: str


def compare(saved: dict, current: dict) -> Comparison:
    """Does `current` look like the base `saved` was made from? (See the module docstring.)"""
    if saved.get("version") != VERSION:
        return Comparison(True, f"fingerprint version {saved.get('version')} is not comparable; not checked")
    if saved["arch"] != current["arch"]:
        return Comparison(False, "the architecture differs (module names or shapes)")
    worst_name, worst, worst_tol = next(iter(saved["samples"]), None), 0.0, FLOAT_TOLERANCE
    for name, entry in saved["samples"].items():
        if name not in current["samples"]:
            return Comparison(False, f"the base has no tensor {name!r}")
        other = current["samples"][name]
        a = torch.frombuffer(bytearray(base64.b64decode(entry["v"])), dtype=torch.float32)
        b = torch.frombuffer(bytearray(base64.b64decode(other["v"])), dtype=torch.float32)
        if a.shape != b.shape:
            return Comparison(False, f"tensor {name!r} has a different size")
        tolerance = QUANTIZED_TOLERANCE if entry["q"] or other["q"] else FLOAT_TOLERANCE
        difference = ((a - b).norm() / a.norm().clamp_min(1e-12)).item()
        if difference / tolerance > worst / worst_tol:
            worst_name, worst, worst_tol = name, difference, tolerance
    summary = f"largest relative difference {worst:.3%} in {worst_name!r} (tolerance {worst_tol:.1%})"
    return Comparison(worst <= worst_tol, summary)


_warned_unfingerprinted = False


def verify_base_fingerprint(files, current: dict, base_name: str | None, verify_base: bool) -> None:
    """Raise AdapterBaseMismatch (or warn, with verify_base=False) if `files` was made on another base."""
    global _warned_unfingerprinted
    saved = files.fingerprint
    if saved is None:
        if not _warned_unfingerprinted:
            _warned_unfingerprinted = True
            warnings.warn(
                f"{files.directory} has no base fingerprint (made by PEFT or another tool), so lorakit cannot check "
                "that it belongs to this base model. Re-save it with lorakit to record one.",
                stacklevel=3,
            )
        return
    result = compare(saved, current)
    if result.match:
        return
    trained_on = files.metadata.get("lorakit.base_model") or files.config.base_model_name_or_path or "unknown"
    message = (
        f"Adapter {files.directory} was trained on a different base model: {result.reason}.\n"
        f"  adapter's base: {trained_on} (fingerprint {short_id(saved)})\n"
        f"  this base:      {base_name or 'unknown'} (fingerprint {short_id(current)})\n"
        "Load it onto the base it was trained on, or pass verify_base=False to load it anyway "
        "(its outputs will not be what was trained)."
    )
    if verify_base:
        raise AdapterBaseMismatch(message)
    warnings.warn(message, stacklevel=3)


def short_id(fingerprint: dict | None) -> str:
    """A short display form: architecture hash plus a digest of the sampled values."""
    if not fingerprint:
        return "none"
    digest = hashlib.sha256(json.dumps(fingerprint["samples"], sort_keys=True).encode()).hexdigest()[:8]
    return f"{fingerprint['arch'][:12]}/{digest}"
