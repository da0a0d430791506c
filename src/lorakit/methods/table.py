"""The one table of adapter methods: each method's spec (methods/protocol.py) — its PEFT type, its config
class, its name and defaults in the training job — is read by the file format, the tuner, the job's schema
(train/config.py), `method:` (train/methods.py) and the public API (lorakit/__init__.py). Adding a method is
its folder plus one entry in `METHODS` (tests/methods/test_method_matrix.py then runs it through every case).
"""

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

METHODS: dict[str, AdapterMethod | VirtualTokenMethod] = {  # by adapter_config.json's peft_type
    method.peft_type: method for method in (LORA, IA3, ADALORA, BOTTLENECK, PROMPT_TUNING, P_TUNING, PREFIX_TUNING)}
JOB_NAMES = tuple(method.job_name for method in METHODS.values())  # the job's `method:` values, "lora" first


def method_for(peft_type: str) -> AdapterMethod:
    try:
        return METHODS[peft_type]
    except KeyError:
        raise ConfigError(f"peft_type is {peft_type!r}; lorakit reads {sorted(METHODS)} adapters.") from None


def job_method(job_name: str) -> AdapterMethod:
    """The method a training job's `method:` names."""
    found = next((m for m in METHODS.values() if m.job_name == job_name), None)
    if found is None:
        raise ConfigError(f"method: {job_name!r}; use one of {', '.join(JOB_NAMES)}.")
    return found


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
