"""`PeftModel` and `get_peft_model`: wrap a model, freeze it, switch/merge/unload adapters.

The object users hold, with HF PEFT's method names. It owns the policy — which adapters
exist (`peft_config`), which are active, what is trainable — and delegates the tree
surgery to `LoraModel` (`self.base_model`) and the maths to the adapted layers.

    model = get_peft_model(base, LoraConfig(r=16, target_modules="all-linear"))
    model(input_ids, adapter_names=["default", "__base__"])   # a different adapter per row
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from lorakit.errors import AdapterNameError, AdapterStateError, RoutingError
from lorakit.files.fingerprint import base_fingerprint
from lorakit.files.save import save_adapters
from lorakit.files.tensors import LoadPlan, apply_biases
from lorakit.fused_loss import causal_lm_loss_forward, fused_loss_applies
from lorakit.loading import checked_load, resolve_config
from lorakit.methods.lora.blend import add_weighted_adapter
from lorakit.methods.protocol import AdapterConfig
from lorakit.routing import BASE_ADAPTER, adapter_routing, gradient_checkpointing_on
from lorakit.status import TunerLayerStatus, TunerModelStatus, count_parameters, layer_status, model_status
from lorakit.tuner import LoraModel


class PeftModel(nn.Module):
    # Tells transformers' Trainer that this (possibly quantized) model carries trainable
    # adapters; it otherwise refuses to fine-tune a quantized model it does not know as PEFT's.
    _hf_peft_config_loaded = True
    fast_path = True  # fused LoRA op and the loss without full logits, where they apply (set_fast_path)

    def __init__(
        self, model: nn.Module, peft_config: AdapterConfig, adapter_name: str = "default", *, _load_plan: LoadPlan | None = None
    ):
        super().__init__()
        # Fingerprint the base now, before any merge can change its weights (see fingerprint.py).
        self.base_fingerprint = base_fingerprint(model)
        self.base_model = LoraModel(model)
        self.peft_config: dict[str, AdapterConfig] = {}
        self._active: list[str] = [adapter_name]
        self._check_new_name(adapter_name)
        self._install(adapter_name, resolve_config(model, peft_config), _load_plan)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "peft_config", "_active"):
                raise
        try:
            return getattr(self.base_model, name)  # e.g. .config, .generation_config, .device
        except AttributeError:
            raise AttributeError(f"'lorakit.PeftModel' object has no attribute {name!r} (nor has the wrapped "
                                 f"{type(self.get_base_model()).__name__})") from None

    # -- adapters --------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        return self._active[0] if len(self._active) == 1 else self.active_adapters  # PEFT's shape

    def add_adapter(self, adapter_name: str, peft_config: AdapterConfig) -> None:
        """Add a new (inactive unless it is the first) adapter; the base stays frozen."""
        self._check_new_name(adapter_name)
        self._install(adapter_name, self._resolve(peft_config))

    def _check_new_name(self, adapter_name: str) -> None:
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise AdapterNameError(f"Adapter names must be non-empty strings without '.', got {adapter_name!r}.")
        if adapter_name == BASE_ADAPTER:
            raise AdapterNameError(f"{BASE_ADAPTER!r} is reserved for rows that use no adapter.")
        if adapter_name in self.peft_config:
            raise AdapterNameError(f"An adapter named {adapter_name!r} exists; delete it first or pick another name.")

    def _resolve(self, peft_config: AdapterConfig) -> AdapterConfig:
        return resolve_config(self.get_base_model(), peft_config, self._model_task())

    def _model_task(self) -> str | None:
        """The task type of the first adapter: PEFT applies its SEQ_CLS rule to every later one."""
        first = next(iter(self.peft_config.values()), None)
        return first.task_type if first else None

    def _install(self, adapter_name: str, config: AdapterConfig, plan: LoadPlan | None = None) -> None:
        """Add a resolved config's adapter (with a checked file's tensors, if `plan`)."""
        first = not self.peft_config
        self.base_model.inject(config, adapter_name, plan)
        self._apply_fast_path()  # layers this adapter added follow the model's setting
        if plan is not None and plan.biases:
            apply_biases(self.get_base_model(), plan.biases)
        self.peft_config[adapter_name] = config
        if first:  # freeze once, at wrap time: later adds leave what the user unfroze alone
            self._freeze_base()
            self._apply_active()
        else:  # a new adapter is inactive, so it does not train (its saved-module copies start frozen)
            for layer in self.base_model.adapter_layers():
                for param in layer.adapter_parameters(adapter_name):
                    param.requires_grad_(False)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make these adapters active (several are summed: stacking); only they train."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if not names:
            raise AdapterNameError("set_adapter needs at least one adapter name.")
        self._check_known(names)
        self._active = names
        self._apply_active()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; layers left without adapters are unwrapped back to the original."""
        self._check_known([adapter_name])
        if adapter_name in self._merged_names():
            raise AdapterStateError(f"Adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it.")
        self.base_model.remove_adapter(adapter_name)
        del self.peft_config[adapter_name]
        self._active = [a for a in self._active if a != adapter_name] or list(self.peft_config)[:1]
        self._apply_active()

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
        if self._merged_names():
            raise AdapterStateError("Adapters are merged into the weights; call unmerge_adapter() before disabling.")
        for module in self.base_model.tuner_modules():
            module.disable_adapters = True

    def enable_adapter_layers(self) -> None:
        for module in self.base_model.tuner_modules():
            module.disable_adapters = False

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Train (or freeze) these adapters' parameters, active or not (PEFT's method)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_known(names)
        for module in self.base_model.tuner_modules():
            for name in names:
                if name in module.adapters:
                    module.set_requires_grad(name, requires_grad)

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """Each adapted layer's adapters, active/merged state, requires_grad and devices (PEFT's fields)."""
        return layer_status(self.base_model.named_tuner_modules())

    def get_model_status(self) -> TunerModelStatus:
        """The model-wide summary of `get_layer_status()`, "irregular" where layers disagree (PEFT's fields)."""
        return model_status(self.get_base_model(), {name: "LORA" for name in self.peft_config},
                            self.get_nb_trainable_parameters(), self.get_layer_status())

    def _merged_names(self) -> set[str]:
        """Adapters merged into the weights of at least one layer."""
        return {name for layer in self.base_model.adapter_layers() for name in layer.merged_adapters}

    def _check_known(self, names: Sequence[str]) -> None:
        for name in names:
            if name not in self.peft_config:
                raise AdapterNameError(f"Unknown adapter {name!r}; loaded adapters: {sorted(self.peft_config)}.")

    def _freeze_base(self) -> None:
        """Freeze everything but adapters and saved-module copies; then apply the bias rules."""
        self.get_base_model().requires_grad_(False)
        for active in self._active:
            config = self.peft_config.get(active)
            # A frozen (inference) adapter trains nothing, its biases included (PEFT leaves those trainable).
            bias = config.bias if config is not None and not config.inference_mode else "none"
            if bias == "all":
                for pname, param in self.get_base_model().named_parameters():
                    if pname == "bias" or pname.endswith(".bias"):
                        param.requires_grad_(True)
            elif bias == "lora_only":
                for layer in self.base_model.adapter_layers():
                    if layer.bias is not None:
                        layer.bias.requires_grad_(True)

    def _trainable(self) -> bool:
        return not any(self.peft_config[a].inference_mode for a in self._active if a in self.peft_config)

    def _apply_active(self) -> None:
        for module in self.base_model.tuner_modules():
            module.set_adapter(self._active, self._trainable())

    def add_weighted_adapter(
        self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
        combination_type: str = "svd", svd_rank: int | None = None,
    ) -> None:
        """Blend adapters into a new one ("linear", "cat" or "svd"; see lorakit.methods.lora.blend)."""
        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank)

    # -- merge / unload ----------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights (W += s·BA); all-or-nothing across the model."""
        self._merge(adapter_names, safe_merge, allow_quantized=False)

    def _merge(self, adapter_names: Sequence[str] | None, safe_merge: bool, allow_quantized: bool) -> None:
        names = list(adapter_names) if adapter_names is not None else self.active_adapters
        self._check_known(names)
        layers = self.base_model.adapter_layers()
        for layer in layers:  # every check on every layer before the first weight changes
            layer.check_merge(names, check_finite=safe_merge, allow_quantized=allow_quantized)
        lost = {}
        for layer in layers:
            share = layer.merge(names, checked=True, allow_quantized=allow_quantized)
            if share is not None:
                lost[layer] = share
        if lost:
            worst = max(lost.values())
            warnings.warn(
                f"Merged into {len(lost)} quantized layers by dequantize -> merge -> requantize: the requantized "
                f"weights miss W+ΔW by {sum(lost.values()) / len(lost):.1%} of the adapter's update ΔW on average "
                f"(worst {worst:.1%}). That error is now baked into the model; for a faithful merge use "
                "`lorakit merge` with a full-precision base.",
                stacklevel=3,
            )

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter again (restores weights to float rounding)."""
        if not self._merged_names():
            warnings.warn("No adapter is merged; nothing to unmerge.", stacklevel=2)
        for layer in self.base_model.adapter_layers():
            layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None,
        allow_quantized_merge: bool = False,
    ) -> nn.Module:
        """Merge (the active or given adapters) and return the plain base model with those weights.

        A quantized base is refused unless `allow_quantized_merge` (see `lorakit merge` for the
        faithful way: merge into a full-precision base, then requantize if wanted).
        """
        names = list(adapter_names) if adapter_names is not None else self.active_adapters
        merged = self._merged_names()
        pending = [n for n in names if n not in merged]
        if pending:
            self._merge(pending, safe_merge, allow_quantized=allow_quantized_merge)
        return self.base_model.unwrap(keep_trained_copies=True)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the original base model.

        Differs from PEFT on purpose: merged adapters are subtracted first and saved-module
        wrappers give back the *original* module, so this really is the model you started with.
        """
        for layer in self.base_model.adapter_layers():
            layer.unmerge()
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
        self._check_known(names)
        if is_main_process:
            save_adapters(self.get_base_model(), {n: self.peft_config[n] for n in names}, self.base_fingerprint,
                          save_directory, safe_serialization, path_initial_model_for_weight_conversion)

    def load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
        verify_base: bool = True, verify_integrity: bool = True, **peft_options,
    ) -> None:
        """Load a saved adapter (ours or PEFT's) next to the existing ones; all-or-nothing.
        Also takes PEFT's loading keywords (`subfolder`, `config`, …: see `loading.LoadOptions`)."""
        self._check_new_name(adapter_name)
        config, plan = checked_load(self.get_base_model(), self.base_fingerprint, model_id, is_trainable, verify_base,
                                    verify_integrity, peft_options, self._model_task())
        self._install(adapter_name, config, plan)

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
    def _routing(self, adapter_names: Sequence[str] | None, reusable: bool = False):
        if adapter_names is None:
            return nullcontext()
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise RoutingError("adapter_names must be a list with one adapter name (or '__base__') per batch row.")
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise AdapterNameError(
                f"adapter_names has unknown adapter(s) {unknown}; loaded: {sorted(self.peft_config)} "
                f"(use {BASE_ADAPTER!r} for rows without an adapter)."
            )
        if self._merged_names():
            raise AdapterStateError("Adapters are merged, so rows cannot choose adapters; call unmerge_adapter() first.")
        if torch.is_grad_enabled() and gradient_checkpointing_on(self.get_base_model()):
            # Checkpointed blocks are re-run in backward, after this forward's routing is gone:
            # they would recompute with the active adapter and give wrong gradients.
            raise AdapterStateError(
                "Per-row adapter_names with gradient checkpointing is not supported yet; disable checkpointing "
                "or run the forward under torch.no_grad()."
            )
        return adapter_routing(adapter_names, reusable=reusable)

    def forward(
        self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, *,
        position_ids=None, token_type_ids=None, adapter_names: Sequence[str] | None = None, **kwargs,
    ):
        """The base model's forward, with the adapters (and per-row `adapter_names`) applied.

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
        with self._routing(adapter_names):
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
        with self._routing(adapter_names, reusable=True):  # one routing for every decode step
            return self.get_base_model().generate(*args, **kwargs)

    def set_fast_path(self, enabled: bool) -> None:
        """The fused training path (fused LoRA linear op, loss without full logits) on or off.

        On by default; off gives the plain reference path — the same numbers (tested against
        it and against PEFT), more time and memory, and `logits` in a training forward's output.
        """
        self.fast_path = enabled
        self._apply_fast_path()

    def _apply_fast_path(self) -> None:
        for layer in self.base_model.adapter_layers():
            layer.fused = self.fast_path

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
    """Wrap `model` with a new LoRA adapter; the base weights are frozen in place."""
    if isinstance(model, PeftModel):
        raise AdapterStateError("The model is already a PeftModel; use model.add_adapter(name, config) instead.")
    return PeftModel(model, peft_config, adapter_name=adapter_name)
