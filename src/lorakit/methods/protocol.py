"""`AdapterMethod`: what one adapter method provides, so that shared code never names its classes.

torchtune's idea (an adapter says which of its parameters are adapter parameters; no base
class to inherit) applied to PEFT's layout (one folder per method). Files, the tuner,
`inspect`, the footprint and optimizer groups ask a method through this protocol; the
method's folder owns its config class, its layers, its PEFT tensor names and shapes, its
initialisation and its merge maths (the layers implement `AdapterLayer`'s hooks).

A method is registered in `table.py` by its PEFT type (adapter_config.json's `peft_type`), and names its
section in the training job (`job_name`, `job_defaults`).

Two shapes of method: `acts_on = "layers"` (LoRA, IA3, AdaLoRA, bottleneck adapters) wraps
target modules; `acts_on = "inputs"` (prompt tuning, P-tuning, prefix tuning:
`VirtualTokenMethod`) wraps nothing and keeps one encoder per adapter beside the model, whose
virtual tokens the per-row hook (virtual_tokens/inputs.py) puts in front of each row's input.
Shared code asks `acts_on`, never a class.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeAlias

import torch
from torch import nn

from lorakit.methods.adapter_layer import AdapterLayer

AdapterConfig: TypeAlias = Any  # a registered method's config class (LoraConfig, IA3Config, …)


class AdapterMethod(Protocol):
    acts_on: str  # "layers"
    peft_type: str  # adapter_config.json's "peft_type", e.g. "LORA"
    config_class: type  # e.g. LoraConfig; its from_dict reads adapter_config.json
    param_marker: str  # in every adapter parameter's name (e.g. "lora_"), never in a base parameter's
    job_name: str  # the training job's `method:` value and section name, e.g. "lora"
    job_defaults: dict[str, Any]  # the job's defaults for that section (the keys given override them one by one)

    def prepare_config(self, model: nn.Module, config: Any) -> None:
        """Fill in what the model implies for this method's config (PEFT's per-model defaults)."""

    def check_targets(self, modules: dict[str, nn.Module], targets: list[str], config: Any) -> None:
        """Raise a ConfigError before anything changes if `config` cannot adapt these target modules."""

    def new_layer(self, module: nn.Module, config: Any) -> AdapterLayer:
        """Wrap one target module (holding no adapter yet)."""

    def add_adapter(self, layer: AdapterLayer, name: str, config: Any, module_name: str,
                    tensors: dict[str, torch.Tensor] | None) -> None:
        """Add adapter `name` to a wrapped layer: initialised, or from a file's checked `tensors`
        (keyed by the suffixes of `expected_tensors`)."""

    def expected_tensors(self, module: nn.Module, config: Any, module_name: str) -> dict[str, tuple[int, ...]]:
        """PEFT's file tensors for one target module: name suffix after the module path → shape."""

    def tensors_of(self, layer: AdapterLayer, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s live tensors in `layer`, under the suffixes of `expected_tensors`."""

    def mismatch_hint(self, found: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                      config: Any, module_name: str) -> str | None:
        """A clearer message than "wrong shape" for a file whose tensors do not fit, if there is one."""

    def convert_weight_init(self, tensors: dict[str, torch.Tensor], config: Any, initial: dict[str, torch.Tensor],
                            source: Any) -> tuple[dict[str, torch.Tensor], Any]:
        """(tensors, config) of an adapter re-expressed for the original base, given the tensors it was
        initialised with (PiSSA/OLoRA take part of W; PEFT's `path_initial_model_for_weight_conversion`)."""

    def add_weighted_adapter(self, model: Any, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str, svd_rank: int | None) -> None:
        """Blend `adapters` (this method's) into a new adapter on `model`, or raise ConfigError if the
        method cannot blend (PEFT's `add_weighted_adapter`)."""

    def summarize(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """For `lorakit inspect`: {"target_modules": [...], "ranks": {rank: count}} of a file's tensors."""

    def module_deltas(self, tensors: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
        """{module: what the adapter changes there, as one tensor} from a file's tensors — comparable across
        versions whatever the factorisation (`lorakit registry diff`)."""

    # Optional (the tuner and the job ask with getattr):
    #   job_fields(fields, model, total_steps)                   fill what the job knows (AdaLoRA's total_step)
    #   loss_term(model, name, config) -> Tensor | None         added to every loss (PEFT's orth. regulariser)
    #   update_and_allocate(model, layers, name, config, step, state)   after each optimizer step
    #   resume_state(layers, name, config, state) -> (tensors, json)     what a checkpoint needs beyond parameters
    #   restore_resume_state(model, layers, name, config, state, tensors, json)   its inverse, on resume


class VirtualTokenMethod(Protocol):
    acts_on: str  # "inputs"
    peft_type: str
    config_class: type
    param_marker: str
    job_name: str
    job_defaults: dict[str, Any]
    places: str  # "inputs" (embeddings) or "cache" (every layer's keys and values)

    def prepare_config(self, model: nn.Module, config: Any) -> None:
        """Fill in the model's sizes (layers, hidden size, heads)."""

    def expected_model_tensors(self, config: Any) -> dict[str, tuple[int, ...]]:
        """PEFT's file tensors (not under a module path): name → shape."""

    def new_encoder(self, model: nn.Module, config: Any, tensors: dict[str, torch.Tensor] | None) -> nn.Module:
        """The adapter's encoder (`places`, `virtual_tokens()`): initialised, or from a file's checked tensors."""

    def model_tensors(self, encoder: nn.Module) -> dict[str, torch.Tensor]:
        """What `save_pretrained` writes for this adapter."""

    def refuse_merge(self, name: str) -> Exception:
        """The error for merging an adapter that has no weight to merge into."""
