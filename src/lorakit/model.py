"""`PeftModel` and `get_peft_model`: wrap a model, freeze it, switch/merge/unload adapters.

The object users hold, with HF PEFT's method names. It owns the policy — which adapters
exist (`peft_config`), which are active, what is trainable — and delegates the tree
surgery to `LoraModel` (`self.base_model`) and the maths to the adapted layers.

    model = get_peft_model(base, LoraConfig(r=16, target_modules="all-linear"))
    model(input_ids, adapter_names=["default", "__base__"])   # a different adapter per row
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

from torch import nn

from lorakit.batching import BASE_ADAPTER, adapter_routing
from lorakit.config import LoraConfig
from lorakit.errors import AdapterNameError, AdapterStateError, ConfigError, RoutingError
from lorakit.targets import SEQ_CLS_HEADS
from lorakit.tuner import LoraModel


class PeftModel(nn.Module):
    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default"):
        super().__init__()
        self.base_model = LoraModel(model)
        self.peft_config: dict[str, LoraConfig] = {}
        self._active: list[str] = [adapter_name]
        self.add_adapter(adapter_name, peft_config)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "peft_config", "_active"):
                raise
            return getattr(self.base_model, name)  # e.g. .config, .generation_config, .device

    # -- adapters --------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        return self._active[0] if len(self._active) == 1 else self.active_adapters  # PEFT's shape

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig) -> None:
        """Add a new (inactive unless it is the first) adapter; the base stays frozen."""
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise AdapterNameError(f"Adapter names must be non-empty strings without '.', got {adapter_name!r}.")
        if adapter_name == BASE_ADAPTER:
            raise AdapterNameError(f"{BASE_ADAPTER!r} is reserved for rows that use no adapter.")
        if adapter_name in self.peft_config:
            raise AdapterNameError(f"An adapter named {adapter_name!r} exists; delete it first or pick another name.")
        if not isinstance(peft_config, LoraConfig):
            raise ConfigError(f"Expected a lorakit.LoraConfig, got {type(peft_config).__name__}.")
        config = copy.deepcopy(peft_config)
        model = self.get_base_model()
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        if config.task_type == "SEQ_CLS":  # PEFT trains a classification model's fresh head in full
            heads = [h for h in SEQ_CLS_HEADS if isinstance(getattr(model, h, None), nn.Module)]
            config.modules_to_save = list(dict.fromkeys((config.modules_to_save or []) + heads)) or None
        self.base_model.inject(config, adapter_name)
        self.peft_config[adapter_name] = config
        self._freeze_base()
        self._apply_active()

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
        if any(adapter_name in m.merged_adapters for m in self.base_model.adapter_layers()):
            raise AdapterStateError(f"Adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it.")
        self.base_model.remove_adapter(adapter_name)
        del self.peft_config[adapter_name]
        self._active = [a for a in self._active if a != adapter_name] or list(self.peft_config)[:1]
        self._apply_active()

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the plain base model inside the block (adapters are kept, just skipped)."""
        if any(m.merged_adapters for m in self.base_model.adapter_layers()):
            raise AdapterStateError("Adapters are merged into the weights; call unmerge_adapter() before disabling.")
        modules = self.base_model.tuner_modules()
        for m in modules:
            m.disable_adapters = True
        try:
            yield
        finally:
            for m in modules:
                m.disable_adapters = False

    def _check_known(self, names: Sequence[str]) -> None:
        for name in names:
            if name not in self.peft_config:
                raise AdapterNameError(f"Unknown adapter {name!r}; loaded adapters: {sorted(self.peft_config)}.")

    def _freeze_base(self) -> None:
        """Freeze everything but adapters and saved-module copies; then apply the bias rules."""
        self.get_base_model().requires_grad_(False)
        for active in self._active:
            bias = self.peft_config[active].bias if active in self.peft_config else "none"
            if bias == "all":
                for pname, param in self.get_base_model().named_parameters():
                    if pname == "bias" or pname.endswith(".bias"):
                        param.requires_grad_(True)
            elif bias == "lora_only":
                for layer in self.base_model.adapter_layers():
                    if layer.bias is not None:
                        layer.bias.requires_grad_(True)

    def _apply_active(self) -> None:
        trainable = not any(self.peft_config[a].inference_mode for a in self._active if a in self.peft_config)
        for module in self.base_model.tuner_modules():
            module.set_adapter(self._active, trainable)

    # -- merge / unload ----------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights (W += s·BA); all-or-nothing across the model."""
        names = list(adapter_names) if adapter_names is not None else self.active_adapters
        self._check_known(names)
        layers = self.base_model.adapter_layers()
        for layer in layers:  # every check on every layer before the first weight changes
            layer.check_merge(names, check_finite=safe_merge)
        for layer in layers:
            layer.merge(names, checked=True)

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter again (restores weights to float rounding)."""
        layers = self.base_model.adapter_layers()
        if not any(layer.merged_adapters for layer in layers):
            warnings.warn("No adapter is merged; nothing to unmerge.", stacklevel=2)
        for layer in layers:
            layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
    ) -> nn.Module:
        """Merge (the active or given adapters) and return the plain base model with those weights."""
        names = list(adapter_names) if adapter_names is not None else self.active_adapters
        merged = {n for layer in self.base_model.adapter_layers() for n in layer.merged_adapters}
        pending = [n for n in names if n not in merged]
        if pending:
            self.merge_adapter(pending, safe_merge=safe_merge)
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

    # -- running -------------------------------------------------------------------------------
    def _routing(self, adapter_names: Sequence[str] | None):
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
        if any(layer.merged_adapters for layer in self.base_model.adapter_layers()):
            raise AdapterStateError("Adapters are merged, so rows cannot choose adapters; call unmerge_adapter() first.")
        return adapter_routing(adapter_names)

    def forward(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        with self._routing(adapter_names):
            return self.get_base_model()(*args, **kwargs)

    def generate(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        if adapter_names is not None:  # generate repeats each row for beams / returned sequences
            config = kwargs.get("generation_config") or getattr(self.get_base_model(), "generation_config", None)
            beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
            returns = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", 1) or 1
            adapter_names = [n for n in adapter_names for _ in range(max(beams, returns))]
        with self._routing(adapter_names):
            return self.get_base_model().generate(*args, **kwargs)

    # -- reporting ---------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, counted as PEFT counts them (4-bit storage unpacked)."""
        trainable = total = 0
        for _, param in self.named_parameters():
            count = param.numel()
            if type(param).__name__ == "Params4bit":  # two 4-bit values per stored byte
                itemsize = getattr(getattr(param, "quant_storage", None), "itemsize", 1)
                count = count * 2 * itemsize
            total += count
            trainable += count if param.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap `model` with a new LoRA adapter; the base weights are frozen in place."""
    if isinstance(model, PeftModel):
        raise AdapterStateError("The model is already a PeftModel; use model.add_adapter(name, config) instead.")
    return PeftModel(model, peft_config, adapter_name=adapter_name)
