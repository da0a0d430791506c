"""Adapted layers, one file per method: `base` (shared bookkeeping), `lora`, `modules_to_save`."""

from lorakit.layers.base import AdapterLayer
from lorakit.layers.lora import LoraEmbedding, LoraLinear
from lorakit.layers.modules_to_save import ModulesToSaveWrapper

__all__ = ["AdapterLayer", "LoraEmbedding", "LoraLinear", "ModulesToSaveWrapper"]
