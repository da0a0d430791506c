"""Adapter methods, one folder each (`lora/`, …), behind the protocol in `protocol.py`;
`registry.py` maps a config or PEFT type to its method. Shared here: the adapted-layer
bookkeeping (`base_layer.py`) and whole-module copies (`modules_to_save.py`)."""

from lorakit.methods.base_layer import AdapterLayer
from lorakit.methods.modules_to_save import ModulesToSaveWrapper

__all__ = ["AdapterLayer", "ModulesToSaveWrapper", "inner_module", "no_weight_conversion"]


def inner_module(module):
    """The module a wrapper stands for: an adapted layer's base layer, a saved-module wrapper's
    original; any other module is itself."""
    while isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
        module = module.base_layer if isinstance(module, AdapterLayer) else module.original_module
    return module


def no_weight_conversion(method: str):
    """The `convert_weight_init` error of a method that takes nothing out of the base weight (all but PiSSA/OLoRA)."""
    from lorakit.errors import ConfigError

    return ConfigError(f"{method} adapters take nothing out of the base weight; save them without "
                       "path_initial_model_for_weight_conversion.")
