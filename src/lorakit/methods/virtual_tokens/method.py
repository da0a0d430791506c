"""Prompt tuning, P-tuning and prefix tuning as `VirtualTokenMethod`s (methods/protocol.py).

PEFT's file for all three holds one tensor, `prompt_embeddings`: the virtual tokens as the
model sees them — (num_virtual_tokens, token_dim) in front of the embeddings, or
(num_virtual_tokens, layers × 2 × token_dim) keys and values for prefix tuning. For P-tuning
and a projected prefix that is the encoder's *output*; loading gives back that table
(`VirtualTokenTable`), as PEFT does in inference mode. Differs from PEFT on purpose: PEFT
loading such a file for training puts the table under the freshly initialised MLP again
(changing every output); lorakit trains the loaded table itself and says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError, MergeError
from lorakit.methods import no_weight_conversion
from lorakit.methods.p_tuning.config import PromptEncoderConfig
from lorakit.methods.p_tuning.encoder import PromptEncoder
from lorakit.methods.prefix_tuning.config import PrefixTuningConfig
from lorakit.methods.prefix_tuning.encoder import PrefixEncoder
from lorakit.methods.prompt_tuning.config import PromptTuningConfig
from lorakit.methods.prompt_tuning.encoder import PromptEmbedding
from lorakit.methods.virtual_tokens.encoders import VirtualTokenTable

TENSOR = "prompt_embeddings"


class VirtualTokenMethod:
    acts_on = "inputs"  # not layers: the tuner keeps an encoder per adapter (virtual_tokens/encoders.py)
    param_marker = "prompt_encoder."

    def __init__(self, config_class: type, places: str, new_encoder: Callable[[nn.Module, Any], nn.Module],
                 reparameterised: Callable[[Any], bool], job_name: str, job_defaults: dict):
        self.config_class, self.peft_type, self.places = config_class, config_class.peft_type, places
        self._new_encoder, self._reparameterised = new_encoder, reparameterised
        self.job_name, self.job_defaults = job_name, job_defaults  # the training job's `method:` and its defaults

    def job_fields(self, fields: dict, model: str, total_steps: int | None) -> None:
        """A soft prompt initialised from TEXT reads it with the model's own tokenizer."""
        if fields.get("prompt_tuning_init") == "TEXT":
            fields.setdefault("tokenizer_name_or_path", model)

    def prepare_config(self, model: nn.Module, config: Any) -> None:
        config.prepare(model)

    def width(self, config: Any) -> int:
        return config.token_dim * (config.num_layers * 2 if self.places == "cache" else 1)

    def expected_model_tensors(self, config: Any) -> dict[str, tuple[int, ...]]:
        return {TENSOR: (config.num_virtual_tokens * config.num_transformer_submodules, self.width(config))}

    def new_encoder(self, model: nn.Module, config: Any, tensors: dict[str, torch.Tensor] | None) -> nn.Module:
        if tensors is None:
            return self._new_encoder(model, config)
        if self._reparameterised(config) and not config.inference_mode:
            warnings.warn(f"{self.peft_type}: the file holds the trained virtual tokens, not the encoder that made "
                          "them; training continues on the tokens themselves (PEFT would run them through a new, "
                          "untrained encoder).", stacklevel=4)
        return VirtualTokenTable(tensors[TENSOR], self.places, _device(model))

    def model_tensors(self, encoder: nn.Module) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {TENSOR: encoder.virtual_tokens().detach().clone()}

    def refuse_merge(self, name: str) -> MergeError:
        what = "keys and values in front of every layer's" if self.places == "cache" else "embeddings in front of the input"
        return MergeError(f"Adapter {name!r} ({self.peft_type}) adds learned {what}; there is no weight to merge it "
                          "into. Keep it as an adapter (it serves beside the others in one batch).")

    def convert_weight_init(self, tensors, config, initial, source):
        raise no_weight_conversion(self.peft_type)

    def add_weighted_adapter(self, model, adapters, weights, adapter_name, combination_type, svd_rank) -> None:
        raise ConfigError(f"Adapters {adapters} are {self.peft_type} adapters; add_weighted_adapter blends LoRA "
                          "adapters, as in PEFT.")

    def summarize(self, tensors: dict[str, torch.Tensor]) -> dict:
        shape = tuple(tensors[TENSOR].shape) if TENSOR in tensors else None
        return {"target_modules": [], "ranks": {}, "virtual_tokens": shape[0] if shape else 0}

    def module_deltas(self, tensors: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
        return {TENSOR: tensors[TENSOR].float()}


def _prompt(model: nn.Module, config: PromptTuningConfig) -> nn.Module:
    return PromptEmbedding(config, model.get_input_embeddings())


def _device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


# SAMPLE_VOCAB: real embeddings' scale (RANDOM draws N(0, 1), far above a trained embedding's)
PROMPT_TUNING = VirtualTokenMethod(PromptTuningConfig, "inputs", _prompt, lambda config: False, "prompt_tuning",
                                   {"num_virtual_tokens": 20, "prompt_tuning_init": "SAMPLE_VOCAB"})
P_TUNING = VirtualTokenMethod(PromptEncoderConfig, "inputs",
                              lambda model, config: PromptEncoder(config, _device(model)), lambda config: True,
                              "p_tuning", {"num_virtual_tokens": 20, "encoder_hidden_size": 128})
PREFIX_TUNING = VirtualTokenMethod(PrefixTuningConfig, "cache",
                                   lambda model, config: PrefixEncoder(config, _device(model)),
                                   lambda config: config.prefix_projection, "prefix_tuning", {"num_virtual_tokens": 20})
