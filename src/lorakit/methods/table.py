"""The adapter methods lorakit knows, by PEFT type. Adding a method is one line here."""

from __future__ import annotations

from typing import Any

from lorakit.errors import ConfigError
from lorakit.methods.adalora.method import ADALORA
from lorakit.methods.adapter_layer import AdapterLayer
from lorakit.methods.bottleneck.method import BOTTLENECK
from lorakit.methods.ia3.method import IA3
from lorakit.methods.lora.method import LORA
from lorakit.methods.protocol import AdapterMethod, VirtualTokenMethod
from lorakit.methods.virtual_tokens.method import P_TUNING, PREFIX_TUNING, PROMPT_TUNING

METHODS: dict[str, AdapterMethod | VirtualTokenMethod] = {
    method.peft_type: method for method in (LORA, IA3, ADALORA, BOTTLENECK, PROMPT_TUNING, P_TUNING, PREFIX_TUNING)}


def method_for(peft_type: str) -> AdapterMethod:
    try:
        return METHODS[peft_type]
    except KeyError:
        raise ConfigError(f"peft_type is {peft_type!r}; lorakit reads {sorted(METHODS)} adapters.") from None


def method_of(config: Any) -> AdapterMethod:
    """The method of a config object (LoraConfig, …)."""
    return method_for(config.peft_type)


def acts_on_inputs(config: Any) -> bool:
    """Whether the config's method adds virtual tokens (no layers wrapped)."""
    return method_of(config).acts_on == "inputs"


def method_of_layer(layer: AdapterLayer) -> AdapterMethod:
    return method_for(layer.peft_type)


def config_from_dict(data: dict[str, Any], strict: bool = False) -> Any:
    """adapter_config.json's dict as its method's config (LORA when the file names none, as PEFT's oldest)."""
    return method_for(data.get("peft_type", "LORA")).config_class.from_dict(data, strict=strict)


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter name belongs to an adapter (any method), not to the base model."""
    return any(method.param_marker in name for method in METHODS.values())
