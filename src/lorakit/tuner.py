"""`LoraModel`: the surgery on a model's module tree — put adapted layers in, take them out.

It holds the user's model as `.model` (so parameter names read
`base_model.model.<module path>…`, exactly PEFT's) and knows nothing about which adapter
is active or trainable: that policy lives in `PeftModel`. Every check that can fail runs
before the first module is replaced, so a bad config leaves the model untouched.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lorakit.errors import ConfigError
from lorakit.files.tensors import LoadPlan
from lorakit.methods import inner_module
from lorakit.methods.base_layer import AdapterLayer
from lorakit.methods.modules_to_save import ModulesToSaveWrapper
from lorakit.methods.registry import method_of, method_of_layer
from lorakit.targets import find_modules_to_save, find_target_modules, named_candidates


class LoraModel(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # -- what is in the tree ---------------------------------------------------------------
    def adapter_layers(self) -> list[AdapterLayer]:
        return [m for m in self.model.modules() if isinstance(m, AdapterLayer)]

    def saved_module_wrappers(self) -> list[ModulesToSaveWrapper]:
        return [m for m in self.model.modules() if isinstance(m, ModulesToSaveWrapper)]

    def tuner_modules(self) -> list[AdapterLayer | ModulesToSaveWrapper]:
        return [m for _, m in self.named_tuner_modules()]

    def named_tuner_modules(self) -> list[tuple[str, AdapterLayer | ModulesToSaveWrapper]]:
        """(name, module) of adapted layers and saved-module wrappers, named as PEFT names them ("model.…")."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))]

    # -- in ----------------------------------------------------------------------------------
    def inject(self, config: Any, adapter_name: str, plan: LoadPlan | None = None) -> None:
        """Add adapter `adapter_name` to every module `config` targets (validated first).

        With a `plan` (a checked adapter file), layers take its tensors instead of an init.
        The method (methods/registry.py) wraps modules and adds the adapter; this only walks the tree.
        """
        method = method_of(config)
        if plan is not None:  # already resolved and checked against this model
            targets, to_save = list(plan.layers), list(plan.saved_modules)
        else:
            targets = find_target_modules(self.model, config)
            to_save = find_modules_to_save(self.model, config.modules_to_save or [])
        modules = dict(named_candidates(self.model))
        taken = [n for n in targets if isinstance(modules[n], AdapterLayer) and method_of_layer(modules[n]) is not method]
        if taken:
            raise ConfigError(f"{taken[0]} already holds {modules[taken[0]].peft_type} adapters; one module holds one "
                              f"method's adapters. Leave it out of this {config.peft_type} adapter's target_modules.")
        method.check_targets(modules, targets, config)
        fresh = {n: method.new_layer(modules[n], config) for n in targets if not isinstance(modules[n], AdapterLayer)}
        for name in targets:  # from here on nothing raises on a config error
            layer = fresh[name] if name in fresh else modules[name]
            method.add_adapter(layer, adapter_name, config, name, plan.layers[name] if plan else None)
            if name in fresh:
                self._replace(name, layer)
        for name in to_save:
            wrapper = modules[name]
            if not isinstance(wrapper, ModulesToSaveWrapper):
                wrapper = ModulesToSaveWrapper(wrapper)
                self._replace(name, wrapper)
            wrapper.update(adapter_name, plan.saved_modules[name] if plan else None)

    # -- out ---------------------------------------------------------------------------------
    def remove_adapter(self, adapter_name: str) -> None:
        """Drop one adapter; a layer left with no adapter is unwrapped, so the tree is as before."""
        for name, module in list(named_candidates(self.model)):
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)) and adapter_name in module.adapters:
                module.delete_adapter(adapter_name)
                if not module.adapters:
                    self._replace(name, inner_module(module))

    def unwrap(self, keep_trained_copies: bool) -> nn.Module:
        """Replace every wrapper by what it wraps; return the plain model.

        Adapted layers give back their base layer as it is now (merged or not). Saved-module
        wrappers give back the active trained copy (`keep_trained_copies`, as after a merge)
        or the untouched original.
        """
        for name, module in list(named_candidates(self.model)):
            if isinstance(module, AdapterLayer):
                if not keep_trained_copies:
                    module.restore_base()  # PiSSA/OLoRA moved part of W into the adapter
                self._replace(name, module.base_layer)
            elif isinstance(module, ModulesToSaveWrapper):
                self._replace(name, module.active_module() if keep_trained_copies else module.original_module)
        return self.model

    def _replace(self, name: str, new: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent_name), child, new)
