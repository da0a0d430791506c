"""`PeftModel` and `get_peft_model`: PEFT's object and method names over lorakit's engine.

A façade: the adapters (names, configs, slots, active ones, the switches, the lock) are the
`AdapterSet` (adapters.py); the module tree and everything that walks every layer — install,
merge, trainability, running a forward — is the tuner (`self.base_model`, tuner.py); the
maths is in each method's layers (methods/). This class checks arguments and delegates.

    model = get_peft_model(base, LoraConfig(r=16, target_modules="all-linear"))
    model(input_ids, adapter_names=["default", "__base__"])   # a different adapter per row

Forwards hold the set's lock for reading, loads and deletes for writing: a model serving
requests in several threads can load, replace and delete adapters between two forwards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lorakit.adapters import AdapterSet
from lorakit.errors import AdapterNameError, AdapterStateError
from lorakit.files.fingerprint import base_fingerprint
from lorakit.files.save import save_adapters
from lorakit.files.tensors import LoadPlan
from lorakit.loading import checked_load, resolve_config
from lorakit.methods.protocol import AdapterConfig
from lorakit.methods.table import method_of
from lorakit.routing import Routing
from lorakit.status import TunerLayerStatus, TunerModelStatus, count_parameters, layer_status, model_status
from lorakit.tuner import AdapterModel


def _names(names: str | Sequence[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


class PeftModel(nn.Module):
    # Tells transformers' Trainer that this (possibly quantized) model carries trainable
    # adapters; it otherwise refuses to fine-tune a quantized model it does not know as PEFT's.
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module, peft_config: AdapterConfig | None, adapter_name: str = "default", *,
                 _load_plan: LoadPlan | None = None, _fingerprint: dict | None = None):
        super().__init__()
        # now, before any merge can change the weights (from_pretrained passes the one it checked against)
        self.base_fingerprint = _fingerprint or base_fingerprint(model)
        self.adapter_set = AdapterSet()
        self.base_model = AdapterModel(model, self.adapter_set)
        if peft_config is not None:  # None: no adapter yet (`for_serving`)
            self.adapter_set.check_new_name(adapter_name)
            self.base_model.install(adapter_name, resolve_config(model, peft_config), _load_plan)

    @classmethod
    def for_serving(cls, model: nn.Module, reserve: AdapterConfig) -> PeftModel:
        """A model with no adapter yet, for a server that loads them later: the modules `reserve` targets
        are wrapped now, so every later load within them is a tensor write, never module surgery. An adapter
        of another method (IA3, AdaLoRA, bottleneck) wraps its modules when it first loads — around what is
        there (methods.layer_chain), between two engine steps. Its LoRA adapters are for inference: they
        live in the layers' slot banks only (one copy; methods/bank.py), not as Parameters."""
        self = cls(model.eval(), None)
        self.adapter_set.serving = True  # LoRA factors in slot banks only (methods/bank.py): one copy, no training
        self.reserve_targets(reserve)
        self.base_model.wrap_between_forwards = True
        return self

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
        return self.active_adapters[0] if len(self.active_adapters) == 1 else self.active_adapters  # PEFT's shape

    def add_adapter(self, adapter_name: str, peft_config: AdapterConfig) -> None:
        """Add a new (inactive unless it is the first) adapter; the base stays frozen."""
        self.adapter_set.check_new_name(adapter_name)
        task = next((c.task_type for c in self.peft_config.values()), None)  # the first one's SEQ_CLS rule, as PEFT
        self.base_model.install(adapter_name, resolve_config(self.get_base_model(), peft_config, task))

    def reserve_targets(self, peft_config: AdapterConfig) -> list[str]:
        """Wrap the modules `peft_config` targets now, with no adapter: a serving model then loads any
        adapter within them as a tensor write, never changing its module tree."""
        return self.base_model.reserve(resolve_config(self.get_base_model(), peft_config))

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make these adapters active (several are summed: stacking); only they train."""
        names = _names(adapter_name)
        if not names:
            raise AdapterNameError("set_adapter needs at least one adapter name.")
        self.adapter_set.check_known(names)
        self.adapter_set.active = names
        self.base_model.set_trainable(names, self.adapter_set.trainable())

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter: its bank rows are freed; the module tree stays as it is (as in PEFT)."""
        self.adapter_set.check_known([adapter_name])
        self.base_model.remove_adapter(adapter_name)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the plain base model inside the block (adapters are kept, just skipped)."""
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self.enable_adapter_layers()

    def disable_adapter_layers(self) -> None:
        if self.base_model.merged_names():
            raise AdapterStateError("Adapters are merged into the weights; call unmerge_adapter() before disabling.")
        self.adapter_set.disabled = True

    def enable_adapter_layers(self) -> None:
        self.adapter_set.disabled = False

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Train (or freeze) these adapters' parameters, active or not."""
        self.adapter_set.check_known(_names(adapter_names))
        self.base_model.set_requires_grad(_names(adapter_names), requires_grad)

    def get_layer_status(self) -> list[TunerLayerStatus]:
        return layer_status(self.base_model.named_tuner_modules())

    def get_model_status(self) -> TunerModelStatus:
        return model_status(self.get_base_model(), {n: c.peft_type for n, c in self.peft_config.items()},
                            self.get_nb_trainable_parameters(), self.get_layer_status())

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None) -> None:
        """Blend adapters into a new one (the method's blend; LoRA's: methods/lora/blend.py)."""
        self.adapter_set.check_known(list(adapters)[:1])
        method_of(self.peft_config[adapters[0]]).add_weighted_adapter(
            self, list(adapters), list(weights), adapter_name, combination_type, svd_rank)

    # -- merge / unload ----------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights (W += s·BA); all-or-nothing across the model."""
        self.base_model.merge(self._known(adapter_names), safe_merge, allow_quantized=False)

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter again (restores weights to float rounding)."""
        self.base_model.unmerge(warn_if_none=True)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Sequence[str] | None = None, allow_quantized_merge: bool = False) -> nn.Module:
        """Merge (the active or given adapters) and return the plain base model with those weights.
        A quantized base is refused unless `allow_quantized_merge` (`lorakit merge` is the faithful way)."""
        pending = [n for n in self._known(adapter_names) if n not in self.base_model.merged_names()]
        if pending:
            self.base_model.merge(pending, safe_merge, allow_quantized=allow_quantized_merge)
        return self.base_model.unwrap(keep_trained_copies=True)

    def unload(self) -> nn.Module:
        """The original base model, adapters removed. Differs from PEFT on purpose: merged adapters are
        subtracted first and saved-module wrappers give back the *original* module."""
        self.base_model.unmerge()
        return self.base_model.unwrap(keep_trained_copies=False)

    def _known(self, adapter_names: Sequence[str] | None) -> list[str]:
        names = list(adapter_names) if adapter_names is not None else self.active_adapters
        self.adapter_set.check_known(names)
        return names

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    # -- files ---------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: Sequence[str] | None = None,
                        safe_serialization: bool = True, is_main_process: bool = True,
                        path_initial_model_for_weight_conversion: str | os.PathLike | None = None) -> None:
        """Write adapters in PEFT's layout ("default" at the root, others in subdirectories); with
        `path_initial_model_for_weight_conversion`, PiSSA/OLoRA adapters for the untouched base (files/save.py)."""
        names = self._known(selected_adapters if selected_adapters is not None else list(self.peft_config))
        if is_main_process:
            save_adapters(self.base_model.saved_tensors, {n: self.peft_config[n] for n in names}, self.base_fingerprint,
                          save_directory, safe_serialization, path_initial_model_for_weight_conversion)

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     verify_base: bool = True, verify_integrity: bool = True, **peft_options) -> None:
        """Load a saved adapter (ours or PEFT's) next to the others; all-or-nothing; on a serving model, a
        write into the banks between two forwards. PEFT's keywords too (`subfolder`, …: loading.LoadOptions)."""
        self.adapter_set.check_new_name(adapter_name)
        task = next((c.task_type for c in self.peft_config.values()), None)
        config, plan = checked_load(self.get_base_model(), self.base_fingerprint, model_id, is_trainable, verify_base,
                                    verify_integrity, peft_options, task)
        self.base_model.install(adapter_name, config, plan)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, verify_base: bool = True, verify_integrity: bool = True,
                        **peft_options) -> PeftModel:
        """Wrap `model` with a saved adapter (ours or PEFT's); nothing is changed if any check fails."""
        if isinstance(model, PeftModel):
            raise AdapterStateError("The model is already a PeftModel; use model.load_adapter(path, name) instead.")
        fingerprint = base_fingerprint(model)
        config, plan = checked_load(model, fingerprint, model_id, is_trainable, verify_base, verify_integrity,
                                    peft_options)
        return cls(model, config, adapter_name, _load_plan=plan, _fingerprint=fingerprint)

    # -- running -------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, *, position_ids=None,
                token_type_ids=None, adapter_names: Sequence[str] | Routing | None = None, **kwargs):
        """The base model's forward with the adapters; `adapter_names`: one per row, or a per-token
        `Routing(names, per_token=True)` for a packed batch. The inputs are named (PEFT's signature)
        because HF Trainer reads it: it finds `labels` here and drops dataset columns not named here."""
        named = {"attention_mask": attention_mask, "inputs_embeds": inputs_embeds,
                 "position_ids": position_ids, "token_type_ids": token_type_ids}
        kwargs |= {key: value for key, value in named.items() if value is not None}
        with self.base_model.running(adapter_names):
            return self.base_model(input_ids, labels, **kwargs)

    def generate(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        return self.base_model.generate(*args, adapter_names=adapter_names, **kwargs)

    def forward_packed(self, input_ids: torch.Tensor, position_ids: torch.Tensor, routing: Routing, *,
                       logits_to_keep: torch.Tensor | None = None, placed_embeddings=None):
        """One packed row `[1, T]` of several sequences end to end, each token routed to its own adapter — an
        engine step. Virtual-token adapters are the caller's to place (their slots are in the row already): a
        soft prompt's embeddings come as `placed_embeddings` = (packed indices, vectors), a prefix's keys and
        values go in the caller's KV cache. The attention is the caller's too (its cache, its backend)."""
        return self.base_model.forward_packed(input_ids, position_ids, routing, logits_to_keep, placed_embeddings)

    def virtual_tokens(self, adapter_name: str) -> tuple[str, torch.Tensor, object] | None:
        """(where they go: "inputs" | "keys", the tokens, the config) of a virtual-token adapter; None for any
        other adapter — for a caller that places them itself (`forward_packed`)."""
        return self.base_model.virtual_tokens(adapter_name)

    def set_fast_path(self, enabled: bool) -> None:
        """The fused training path (fused LoRA op, loss without full logits) on (default) or off: off
        is the plain reference path — the same numbers, more time and memory, `logits` in the output."""
        self.adapter_set.fast_path = enabled

    @property
    def fast_path(self) -> bool:
        return self.adapter_set.fast_path

    # -- reporting ---------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, counted as PEFT counts them (4-bit storage unpacked)."""
        return count_parameters(self.named_parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


def get_peft_model(model: nn.Module, peft_config: AdapterConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap `model` with a new adapter; the base weights are frozen in place."""
    if isinstance(model, PeftModel):
        raise AdapterStateError("The model is already a PeftModel; use model.add_adapter(name, config) instead.")
    return PeftModel(model, peft_config, adapter_name=adapter_name)
