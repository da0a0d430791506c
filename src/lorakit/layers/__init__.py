"""Adapted layers, one file per method: `base` (shared bookkeeping), `lora`, `modules_to_save`."""

from lorakit.layers.base import AdapterLayer
from lorakit.layers.lora import LoraEmbedding, LoraLinear
from lorakit.layers.modules_to_save import ModulesToSaveWrapper

__all__ = ["AdapterLayer", "LoraEmbedding", "LoraLinear", "ModulesToSaveWrapper", "inner_module"]


def inner_module(module):
    """The module a wrapper stands for: an adapted layer's base layer, a saved-module wrapper's
    original; any other module is itself."""
    while isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
        module = module.base_layer if isinstance(module, AdapterLayer) else module.original_module
    return module
