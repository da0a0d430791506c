"""`PeftModel` and `get_peft_model`: PEFT's object and method names over lorakit's engine.

A façade: the adapters (names, configs, slots, active ones, the switches, the lock) are the
`AdapterSet` (adapters.py); the module tree and everything that walks every layer is the
tuner (`self.base_model`, tuner.py); the maths is in each method's layers (methods/). This
class checks arguments, takes the set's lock, and delegates.

    model = get_peft_model(base, LoraConfig(r=16, target_modules="all-linear"))
    model(input_ids, adapter_names=["default", "__base__"])   # a different adapter per row

Forwards take the set's lock for reading, loads and deletes for writing: a model serving
requests in several threads can load, replace and delete adapters between two forwards.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from lorakit.adapters import AdapterSet
from lorakit.errors import AdapterNameError, AdapterStateError
from lorakit.files.fingerprint import base_fingerprint
from lorakit.files.save import save_adapters
from lorakit.files.tensors import LoadPlan
from lorakit.fused_loss import causal_lm_loss_forward, fused_loss_applies
from lorakit.loading import checked_load, resolve_config
from lorakit.methods.protocol import AdapterConfig
from lorakit.methods.registry import method_of
from lorakit.routing import Routing
from lorakit.status import TunerLayerStatus, TunerModelStatus, count_parameters, layer_status, model_status
from lorakit.tuner import LoraModel


class PeftModel(nn.Module):
    # Tells transformers' Trainer that this (possibly quantized) model carries trainable
    # adapters; it otherwise refuses to fine-tune a quantized model it does not know as PEFT's.
    _hf_peft_config_loaded = True

    def __init__(
        self, model: nn.Module, peft_config: AdapterConfig, adapter_name: str = "default", *, _load_plan: LoadPlan | None = None
    ):
        super().__init__()
        # Fingerprint the base now, before any merge can change its weights (see fingerprint.py).
        self.base_fingerprint = base_fingerprint(model)
        self.adapter_set = AdapterSet()
        self.base_model = LoraModel(model, self.adapter_set)
        self.adapter_set.check_new_name(adapter_name)
        self.base_model.install(adapter_name, resolve_config(model, peft_config), _load_plan)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "adapter_set"):
                raise
        try:
            return getattr(self.base_model, name)  # e.g. .config, .generation_config, .device
        except AttributeError:
            raise AttributeError(f"'lorakit.PeftModel' object has no attribute {name!r} (nor has the wrapped "
                                 f"{type(self.get_base_model()).__name__})") from None

    # -- adapters --------------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, AdapterConfig]:
        return self.adapter_set.configs

    @property
    def active_adapters(self) -> list[str]:
        return list(self.adapter_set.active)

    @property
    def active_adapter(self) -> str | list[str]:
        active = self.active_adapters
        return active[0] if len(active) == 1 else active  # PEFT's shape

    @property
    def fast_path(self) -> bool:
        return self.adapter_set.fast_path

    def add_adapter(self, adapter_name: str, peft_config: AdapterConfig) -> None:
        """Add a new (inactive unless it is the first) adapter; the base stays frozen."""
        self.adapter_set.check_new_name(adapter_name)
        first = next(iter(self.peft_config.values()), None)  # PEFT applies the first one's SEQ_CLS rule to all
        self.base_model.install(adapter_name, resolve_config(self.get_base_model(), peft_config, first and first.task_type))

    def reserve_targets(self, peft_config: AdapterConfig) -> list[str]:
        """Wrap every module `peft_config` targets now, with no adapter: a serving model then loads any
        adapter within those targets as a tensor write, never changing its module tree."""
        with self.adapter_set.lock.writing():
            return self.base_model.reserve(resolve_config(self.get_base_model(), peft_config))

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make these adapters active (several are summed: stacking); only they train."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if not names:
            raise AdapterNameError("set_adapter needs at least one adapter name.")
        self.adapter_set.check_known(names)
        self.adapter_set.active = names
        self.base_model.set_trainable(names, self.adapter_set.trainable())

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter: its bank rows are freed; the module tree stays as it is."""
        self.adapter_set.check_known([adapter_name])
        if adapter_name in self.base_model.merged_names():
            raise AdapterStateError(f"Adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it.")
        with self.adapter_set.lock.writing():
            self.base_model.remove_adapter(adapter_name)
            self.adapter_set.remove(adapter_name)
        self.base_model.set_trainable(self.active_adapters, self.adapter_set.trainable())

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the plain base model inside the block (adapters are kept, just skipped)."""
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self.enable_adapter_layers()

    def disable_adapter_layers(self) -> None:
        """PEFT's switch: run the base model until `enable_adapter_layers()` (see disable_adapter)."""
        if self.base_model.merged_names():
            raise AdapterStateError("Adapters are merged into the weights; call unmerge_adapter() before disabling.")
        self.adapter_set.disabled = True

    def enable_adapter_layers(self) -> None:
        self.adapter_set.disabled = False

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Train (or freeze) these adapters' parameters, active or not (PEFT's method)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.adapter_set.check_known(names)
        self.base_model.set_requires_grad(names, requires_grad)

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """Each adapted layer's adapters, active/merged state, requires_grad and devices (PEFT's fields)."""
        return layer_status(self.base_model.named_tuner_modules())

    def get_model_status(self) -> TunerModelStatus:
        """The model-wide summary of `get_layer_status()`, "irregular" where layers disagree (PEFT's fields)."""
        return model_status(self.get_base_model(), {n: c.peft_type for n, c in self.peft_config.items()},
                            self.get_nb_trainable_parameters(), self.get_layer_status())

    def add_weighted_adapter(
        self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
        combination_type: str = "svd", svd_rank: int | None = None,
    ) -> None:
        """Blend adapters into a new one (LoRA: "linear", "cat" or "svd"; see lorakit.methods.lora.blend)."""
        self.adapter_set.check_known(list(adapters)[:1])
        method = method_of(self.peft_config[adapters[0]])
        method.add_weighted_adapter(self, list(adapters), list(weights), adapter_name, combination_type, svd_rank)

    # -- merge / unload ----------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights (W += s·BA); all-or-nothing across the model."""
        self._merge(adapter_names, safe_merge, allow_quantized=False)

    def _merge(self, adapter_names: Sequence[str] | None, safe_merge: bool, allow_quantized: bool) -> None:
        names = list(adapter_names) if adapter_names is not None else self.active_adapters
        self.adapter_set.check_known(names)
        with self.adapter_set.lock.writing():
            self.base_model.merge(names, safe_merge, allow_quantized)

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter again (restores weights to float rounding)."""
        if not self.base_model.merged_names():
            warnings.warn("No adapter is merged; nothing to unmerge.", stacklevel=2)
        with self.adapter_set.lock.writing():
            self.base_model.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None,
        allow_quantized_merge: bool = False,
    ) -> nn.Module:
        """Merge (the active or given adapters) and return the plain base model with those weights.

        A quantized base is refused unless `allow_quantized_merge` (see `lorakit merge` for the
        faithful way: merge into a full-precision base, then requantize if wanted).
        """
        names = list(adapter_names) if adapter_names is not None else self.active_adapters
        merged = self.base_model.merged_names()
        pending = [n for n in names if n not in merged]
        if pending:
            self._merge(pending, safe_merge, allow_quantized=allow_quantized_merge)
        return self.base_model.unwrap(keep_trained_copies=True)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the original base model.

        Differs from PEFT on purpose: merged adapters are subtracted first and saved-module
        wrappers give back the *original* module, so this really is the model you started with.
        """
        self.base_model.unmerge()
        return self.base_model.unwrap(keep_trained_copies=False)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    # -- files ---------------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | os.PathLike, selected_adapters: Sequence[str] | None = None,
        safe_serialization: bool = True, is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
    ) -> None:
        """Write adapters in PEFT's layout ("default" at the root, others in subdirectories).

        `path_initial_model_for_weight_conversion`: for a PiSSA/OLoRA adapter, the directory where
        it was saved right after initialisation; the adapter is then written as a plain LoRA
        adapter (rank 2r) that works on the original, untouched base — PEFT's conversion.
        """
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        self.adapter_set.check_known(names)
        if is_main_process:
            save_adapters(self.get_base_model(), {n: self.peft_config[n] for n in names}, self.base_fingerprint,
                          save_directory, safe_serialization, path_initial_model_for_weight_conversion)

    def load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
        verify_base: bool = True, verify_integrity: bool = True, **peft_options,
    ) -> None:
        """Load a saved adapter (ours or PEFT's) next to the existing ones; all-or-nothing. On a serving
        model this is a write into the layers' banks between two forwards (see the module docstring).
        Also takes PEFT's loading keywords (`subfolder`, `config`, …: see `loading.LoadOptions`)."""
        self.adapter_set.check_new_name(adapter_name)
        first = next(iter(self.peft_config.values()))
        config, plan = checked_load(self.get_base_model(), self.base_fingerprint, model_id, is_trainable, verify_base,
                                    verify_integrity, peft_options, first.task_type)
        self.base_model.install(adapter_name, config, plan)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False,
        verify_base: bool = True, verify_integrity: bool = True, **peft_options,
    ) -> PeftModel:
        """Wrap `model` with a saved adapter (ours or PEFT's); nothing is changed if any check fails.
        Also takes PEFT's loading keywords (`subfolder`, `config`, …: see `loading.LoadOptions`)."""
        if isinstance(model, PeftModel):
            raise AdapterStateError("The model is already a PeftModel; use model.load_adapter(path, name) instead.")
        config, plan = checked_load(model, base_fingerprint(model), model_id, is_trainable, verify_base,
                                    verify_integrity, peft_options)
        return cls(model, config, adapter_name, _load_plan=plan)

    # -- running -------------------------------------------------------------------------------
    def forward(
        self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, *,
        position_ids=None, token_type_ids=None, adapter_names: Sequence[str] | Routing | None = None, **kwargs,
    ):
        """The base model's forward, with the adapters (and per-row `adapter_names`, or a per-token
        `Routing(names, per_token=True)` for a packed batch) applied.

        The common inputs are named (PEFT's PeftModelForCausalLM signature) because HF Trainer
        reads this signature: it finds `labels` there (without it, evaluation computes no loss)
        and drops dataset columns not named here. Only the inputs given are passed on, and the
        first one positionally, so a plain `nn.Module` base still gets `model(x)`.

        A causal LM's training call (labels, grad enabled, train mode) computes its loss with
        `fused_loss.linear_cross_entropy` — no full logits, so the output's `logits` is None;
        `model.set_fast_path(False)` gives the reference path (same loss and gradients, tested).
        """
        named = {"attention_mask": attention_mask, "inputs_embeds": inputs_embeds,
                 "position_ids": position_ids, "token_type_ids": token_type_ids}
        kwargs |= {key: value for key, value in named.items() if value is not None}
        base = self.get_base_model()
        with self.base_model.running(adapter_names):
            if self.fast_path and fused_loss_applies(base, labels, kwargs):
                return causal_lm_loss_forward(base, input_ids, labels, kwargs)
            if labels is not None:
                kwargs["labels"] = labels
            return base(*((input_ids,) if input_ids is not None else ()), **kwargs)

    def generate(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        if adapter_names is not None:  # generate repeats each row for beams / returned sequences
            config = kwargs.get("generation_config") or getattr(self.get_base_model(), "generation_config", None)
            beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
            returns = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", 1) or 1
            adapter_names = [n for n in adapter_names for _ in range(max(beams, returns))]
        with self.base_model.running(adapter_names):
            return self.get_base_model().generate(*args, **kwargs)

    def set_fast_path(self, enabled: bool) -> None:
        """The fused training path (fused LoRA linear op, loss without full logits) on or off.

        On by default; off gives the plain reference path — the same numbers (tested against
        it and against PEFT), more time and memory, and `logits` in a training forward's output.
        """
        self.adapter_set.fast_path = enabled

    # -- reporting ---------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, counted as PEFT counts them (4-bit storage unpacked)."""
        return count_parameters(self.named_parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )


def get_peft_model(model: nn.Module, peft_config: AdapterConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap `model` with a new adapter; the base weights are frozen in place."""
    if isinstance(model, PeftModel):
        raise AdapterStateError("The model is already a PeftModel; use model.add_adapter(name, config) instead.")
    return PeftModel(model, peft_config, adapter_name=adapter_name)
