"""`lorakit registry diff A B`: what changed between two versions — config keys, and per module the
norm of each version's weight change and of their difference (asked of the method: for LoRA
ΔW = s·BA, since A and B alone are not comparable across trainings)."""

from __future__ import annotations

from lorakit.files.format import read_adapter
from lorakit.files.tensors import PREFIX
from lorakit.methods.table import method_of
from lorakit.registry.store import Registry

_NOISE = {"revision", "inference_mode"}


def _deltas(registry: Registry, ref: str):
    info = registry.resolve(ref)
    files = read_adapter(registry.blob_folder(info))
    tensors = {k.removeprefix(PREFIX): t for k, t in files.tensors.items()}
    return info, method_of(files.config).module_deltas(tensors, files.config)


def diff_versions(registry: Registry, ref_a: str, ref_b: str) -> dict:
    a, deltas_a = _deltas(registry, ref_a)
    b, deltas_b = _deltas(registry, ref_b)
    config = {key: {"a": a.config.get(key), "b": b.config.get(key)}
              for key in sorted(set(a.config) | set(b.config) - _NOISE)
              if a.config.get(key) != b.config.get(key) and key not in _NOISE}
    modules = {}
    for name in sorted(set(deltas_a) | set(deltas_b)):
        da, db = deltas_a.get(name), deltas_b.get(name)
        row = {"norm_a": float(da.norm()) if da is not None else None,
               "norm_b": float(db.norm()) if db is not None else None}
        if da is not None and db is not None and da.shape == db.shape:
            change = float((db - da).norm())
            row |= {"diff": change, "relative": change / max(row["norm_a"], 1e-12)}
        modules[name] = row
    return {"a": a.ref, "b": b.ref, "same_content": a.digest == b.digest, "config": config, "modules": modules}
