"""AdaLoRA as an `AdapterMethod` (methods/protocol.py), with the two things it adds to training:
the orthogonality term in the loss and the rank allocator after each optimizer step.

PEFT's file names for one target module (after `base_model.model.<module path>.`):
`lora_A` (r, in), `lora_B` (out, r), `lora_E` (r, 1) — r the kept triplets of `rank_pattern`
(`<module path>.lora_E` → init_r booleans), or init_r before any allocation.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.layer_shapes import linear_features
from lorakit.methods import inner_module, no_weight_conversion
from lorakit.methods.adalora.allocator import RankAllocator
from lorakit.methods.adalora.config import AdaLoraConfig
from lorakit.methods.adalora.layer import SVDLinear
from lorakit.methods.adapter_layer import AdapterLayer
from lorakit.targets import is_linear

SUFFIXES = ("lora_A", "lora_B", "lora_E")


class AdaLoraMethod:
    acts_on = "layers"
    peft_type = "ADALORA"
    config_class = AdaLoraConfig
    param_marker = "lora_"
    job_name = "adalora"
    job_defaults = {"init_r": 12, "target_r": 8, "lora_alpha": 32, "target_modules": "all-linear"}

    def job_fields(self, fields: dict, model: str, total_steps: int | None) -> None:
        """The job's schedule: the rank budget reaches target_r by the run's last optimizer step."""
        if fields.get("total_step") is None and total_steps is not None:
            fields["total_step"] = total_steps

    def prepare_config(self, model: nn.Module, config: AdaLoraConfig) -> None:
        """Nothing from the model; the training job fills in total_step (`job_fields`)."""

    def check_targets(self, modules: dict[str, nn.Module], targets: list[str], config: AdaLoraConfig) -> None:
        other = [n for n in targets if not is_linear(inner_module(modules[n]))]
        if other:
            raise ConfigError(f"AdaLoRA adapts linear layers (as PEFT's SVDLinear); {other[0]} is a "
                              f"{type(inner_module(modules[other[0]])).__name__}.")
        if config.total_step is None and not config.inference_mode:
            raise ConfigError("AdaLoRA needs total_step (the run's optimizer steps: its budget schedule ends there); "
                              "set AdaLoraConfig(total_step=...). `lorakit train` fills it in from the run's length.")

    def new_layer(self, module: nn.Module, config: AdaLoraConfig) -> AdapterLayer:
        layer = SVDLinear(module)
        config.fan_in_fan_out = layer.weight_transposed  # PEFT sets it from the layer type, with a warning
        return layer

    def add_adapter(self, layer: SVDLinear, name: str, config: AdaLoraConfig, module_name: str,
                    tensors: dict[str, torch.Tensor] | None) -> None:
        layer.update_layer(name, config.rank_for(module_name), config.init_r, config.lora_alpha, config.lora_dropout,
                           config.init_lora_weights, tensors)

    def expected_tensors(self, module: nn.Module, config: AdaLoraConfig, module_name: str) -> dict[str, tuple[int, ...]]:
        in_features, out_features, _ = linear_features(inner_module(module))
        r = config.rank_for(module_name)
        return {"lora_A": (r, in_features), "lora_B": (out_features, r), "lora_E": (r, 1)}

    def tensors_of(self, layer: SVDLinear, name: str) -> dict[str, torch.Tensor]:
        if bool(layer.kept[name].all()):
            return {key: getattr(layer, key)[name] for key in SUFFIXES}  # the live parameters
        return layer.kept_tensors(name)

    def mismatch_hint(self, found, expected, config, module_name) -> str | None:
        tensor = found.get("lora_E")
        if tensor is not None and tuple(tensor.shape) != expected["lora_E"]:
            return (f"{module_name}: lora_E holds {tensor.shape[0]} triplets, but the config's rank_pattern keeps "
                    f"{expected['lora_E'][0]} there (an edited rank_pattern, or the config of another run).")
        return None

    def convert_weight_init(self, tensors, config, initial, source):
        raise no_weight_conversion("AdaLoRA")

    def add_weighted_adapter(self, model, adapters, weights, adapter_name, combination_type, svd_rank) -> None:
        raise ConfigError(f"Adapters {adapters} are AdaLoRA adapters; add_weighted_adapter blends LoRA adapters "
                          "(PEFT refuses AdaLoRA too).")

    def summarize(self, tensors: dict[str, torch.Tensor]) -> dict:
        ranks = Counter(t.shape[0] for k, t in tensors.items() if k.endswith(".lora_E"))
        return {"target_modules": sorted(k.rsplit(".lora_E", 1)[0] for k in tensors if k.endswith(".lora_E")),
                "ranks": dict(sorted(ranks.items()))}

    def module_deltas(self, tensors: dict[str, torch.Tensor], config: AdaLoraConfig) -> dict[str, torch.Tensor]:
        scale = config.lora_alpha / (config.init_r + 1e-5)
        out = {}
        for key in tensors:
            if key.endswith(".lora_E"):
                path = key.rsplit(".lora_E", 1)[0]
                a, b, e = (tensors[f"{path}.{s}"].float() for s in SUFFIXES)
                out[path] = b @ (a * e) * scale
        return out

    # -- training --------------------------------------------------------------------------
    def loss_term(self, model: nn.Module, name: str, config: AdaLoraConfig) -> torch.Tensor | None:
        """PEFT's orthogonality regulariser: mean over A and B of ‖AAᵀ − I‖_F / ‖BᵀB − I‖_F, × orth_reg_weight."""
        terms = []
        for pname, p in model.named_parameters():
            if ("lora_A" in pname or "lora_B" in pname) and name in pname:
                cov = p @ p.T if "lora_A" in pname else p.T @ p
                terms.append(torch.norm(cov - torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device), p="fro"))
        return config.orth_reg_weight * (sum(terms) / len(terms)) if terms else None

    def update_and_allocate(self, model: nn.Module, layers: dict[str, SVDLinear], name: str, config: AdaLoraConfig,
                            step: int, state: dict[str, Any]) -> None:
        """One step of PEFT's `update_and_allocate` for adapter `name` (`state` keeps its allocator)."""
        if config.total_step is None:
            raise ConfigError("update_and_allocate needs the config's total_step.")
        allocator = state.setdefault(name, RankAllocator(model, config, name))
        end = config.total_step - config.tfinal
        pattern = None
        if step < end:
            _, pattern = allocator.update_and_allocate(model, step)
        elif step == end:
            _, pattern = allocator.update_and_allocate(model, step, force_mask=True)
            allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = {}, {}, {}
        elif config.rank_pattern:
            allocator.mask_using_rank_pattern(model, config.rank_pattern)
        if pattern:
            config.rank_pattern = {key.replace(f".{name}", ""): kept for key, kept in pattern.items()}
            for path, layer in layers.items():
                kept = config.rank_pattern.get(f"{path}.lora_E")
                if kept is not None and name in layer.kept:
                    layer.kept[name] = torch.tensor(kept, dtype=torch.bool)

    def resume_state(self, layers: dict[str, SVDLinear], name: str, config: AdaLoraConfig,
                     state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
        """What a resumed run needs besides the parameters: each layer's kept triplets, the rank pattern,
        and the allocator's smoothed importance scores (PEFT's checkpoints lose these)."""
        tensors = {f"kept/{path}": layer.kept[name].to(torch.uint8) for path, layer in layers.items()
                   if name in layer.kept}
        allocator = state.get(name)
        if allocator is not None:
            for kind in SCORES:
                tensors.update({f"{kind}/{pname}": score for pname, score in getattr(allocator, kind).items()})
        return tensors, {"rank_pattern": config.rank_pattern or None, "allocator": allocator is not None}

    def restore_resume_state(self, model: nn.Module, layers: dict[str, SVDLinear], name: str, config: AdaLoraConfig,
                             state: dict[str, Any], tensors: dict[str, torch.Tensor], meta: dict) -> None:
        config.rank_pattern = meta["rank_pattern"]
        for path, layer in layers.items():
            if f"kept/{path}" in tensors:
                layer.kept[name] = tensors[f"kept/{path}"].bool()
        state.pop(name, None)
        if meta["allocator"]:
            allocator = state[name] = RankAllocator(model, config, name)
            for kind in SCORES:
                scores = {key.split("/", 1)[1]: t for key, t in tensors.items() if key.startswith(f"{kind}/")}
                setattr(allocator, kind, scores)


SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # RankAllocator's per-parameter statistics
ADALORA = AdaLoraMethod()
