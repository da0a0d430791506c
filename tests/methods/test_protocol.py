"""The method protocol: shared code asks a method (methods/registry.py), and a method's own
names — layer classes, PEFT tensor names — appear only in its folder."""

from __future__ import annotations

import re
from pathlib import Path

import peft
import pytest

import lorakit
from conftest import tiny_llama
from lorakit.errors import ConfigError
from lorakit.methods.table import (
    config_from_dict,
    is_adapter_parameter,
    method_for,
    method_of,
    method_of_layer,
)
from lorakit.targets import named_candidates

SRC = Path(lorakit.__file__).parent
# Each method's own names (layer classes, PEFT tensor names) and the folders they may appear in
# (AdaLoRA's file uses LoRA's lora_A / lora_B names, as PEFT's does).
OWN_NAMES = {
    "lora": (re.compile(r"\b(LoraLinear|LoraEmbedding|LoraLayer)\b|lora_(embedding_A|embedding_B|magnitude_vector)\b"),
             ("methods/lora",)),
    "lora_factors": (re.compile(r"\blora_(A|B)\b"), ("methods/lora", "methods/adalora")),
    "adalora": (re.compile(r"\bSVDLinear\b|\blora_E\b|\bRankAllocator\b"), ("methods/adalora",)),
    "ia3": (re.compile(r"\bIA3Linear\b|\bia3_l\b"), ("methods/ia3",)),
    "bottleneck": (re.compile(r"\bBottleneckLinear\b|\badapter_(down|up)\b"), ("methods/bottleneck",)),
    "virtual_tokens": (re.compile(r"\b(PromptEmbedding|PromptEncoder|PrefixEncoder|VirtualTokenTable)\b|prompt_embeddings"),
                       ("methods/virtual_tokens", "methods/prompt_tuning", "methods/p_tuning", "methods/prefix_tuning")),
}


@pytest.mark.parametrize("method", OWN_NAMES)
def test_a_methods_names_live_only_in_its_folder(method):
    pattern, folders = OWN_NAMES[method]
    outside = [f"{path.relative_to(SRC)}:{number}" for path in SRC.rglob("*.py")
               if not any(folder in path.as_posix() for folder in folders)
               for number, line in enumerate(path.read_text().splitlines(), start=1)
               if pattern.search(line) and not line.lstrip().startswith(("#", '"'))]
    assert not outside, outside


def test_the_registry_dispatches_by_peft_type():
    config = lorakit.LoraConfig(r=2, target_modules=["q_proj"])
    assert method_of(config) is method_for("LORA")
    assert type(config_from_dict(config.to_dict())) is lorakit.LoraConfig
    with pytest.raises(ConfigError, match=r"peft_type is 'NOPE'; lorakit reads \[.*'IA3', 'LORA', 'PREFIX_TUNING'.*\]"):
        method_for("NOPE")
    assert is_adapter_parameter("model.layers.0.q_proj.lora_A.default.weight")
    assert not is_adapter_parameter("model.layers.0.q_proj.base_layer.weight")


@pytest.mark.parametrize("extra", [{}, {"use_dora": True}], ids=["lora", "dora"])
def test_expected_tensors_are_pefts_names_and_shapes(extra):
    """What the method says a file holds, for every target module, is what PEFT's state dict holds."""
    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens"], **extra)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**settings))
    ours = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(**settings))
    config = ours.peft_config["default"]
    method = method_of(config)
    peft_shapes = {k.replace(".default", ""): tuple(v.shape) for k, v in theirs.state_dict().items() if "lora_" in k}
    expected, live = {}, {}
    for path, module in named_candidates(ours.get_base_model()):
        if isinstance(module, lorakit.methods.AdapterLayer):
            assert method_of_layer(module) is method
            for suffix, shape in method.expected_tensors(module, config, path).items():
                key = f"base_model.model.{path}.{suffix}"
                expected[key] = shape
                live[key] = tuple(method.tensors_of(module, "default")[suffix].shape)
    peft_shapes = {k.removesuffix(".weight") if "magnitude" in k else k: v for k, v in peft_shapes.items()}
    assert expected == live == peft_shapes
