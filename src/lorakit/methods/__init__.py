"""Adapter methods, one folder each (`lora/`, …), behind the protocol in `protocol.py`;
`registry.py` maps a config or PEFT type to its method. Shared here: the adapted-layer
bookkeeping (`adapter_layer.py`) and whole-module copies (`modules_to_save.py`)."""

from lorakit.methods.adapter_layer import AdapterLayer
from lorakit.methods.modules_to_save import ModulesToSaveWrapper

__all__ = ["AdapterLayer", "ModulesToSaveWrapper", "inner_module", "layer_chain", "layer_of", "no_weight_conversion"]


def inner_module(module):
    """The module a wrapper stands for: an adapted layer's base layer, a saved-module wrapper's
    original; any other module is itself."""
    while isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
        module = module.base_layer if isinstance(module, AdapterLayer) else module.original_module
    return module


def layer_chain(module) -> list[AdapterLayer]:
    """The adapted layers stacked on one module, outermost first: a module may hold several methods'
    adapters (LoRA and IA3 on one q_proj), each method's layer wrapping the one before it. Each layer
    applies only the adapters it holds, so a row routed to one adapter passes the others untouched."""
    chain = []
    while isinstance(module, AdapterLayer):
        chain.append(module)
        module = module.base_layer
    return chain


def layer_of(module, peft_type: str) -> AdapterLayer | None:
    """The layer of method `peft_type` on `module` (wherever it sits in the chain), or None."""
    return next((layer for layer in layer_chain(module) if layer.peft_type == peft_type), None)


def no_weight_conversion(method: str):
    """The `convert_weight_init` error of a method that takes nothing out of the base weight (all but PiSSA/OLoRA)."""
    from lorakit.errors import ConfigError

    return ConfigError(f"{method} adapters take nothing out of the base weight; save them without "
                       "path_initial_model_for_weight_conversion.")
