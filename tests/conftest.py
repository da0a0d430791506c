"""Tiny random models built in code (nothing is downloaded) and a PEFT twin-maker.

`twin(builder, **config)` wraps two copies of the same base: one with lorakit, one with
PEFT, with `init_lora_weights=False` (B random, so adapters change outputs), then copies
PEFT's whole state dict into ours with strict=True — which also proves our parameter
names are PEFT's, key for key.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit

warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
VOCAB = 61


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def small_llama(seed: int = 0) -> nn.Module:
    """A tiny Llama whose layers are all 64+ wide: bitsandbytes' CPU 4-bit inference kernel
    refuses narrower ones ("N must be divisible by block_n"); training mode does not mind."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def tiny_bert_classifier(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(24, 24)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        return self.head(self.fc2(self.act(self.fc1(x))))


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyMLP().eval()


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A float model with the quantized model's exact (dequantized) weights: the reference."""
    from lorakit.quant import float_weight

    reference = small_llama()
    state = {}
    for name, module in model.named_modules():
        if hasattr(module, "weight") and isinstance(module.weight, torch.Tensor) and "lora_" not in name:
            key = name.replace(".base_layer", "").removeprefix("base_model.model.")
            state[f"{key}.weight"] = float_weight(module).clone()
    reference.load_state_dict(state, strict=False)
    return reference


def inputs_for(model: nn.Module, batch: int = 3, seq: int = 7, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    if isinstance(model, TinyMLP):
        return {"x": torch.randn(batch, 12, generator=gen)}
    ids = torch.randint(1, VOCAB, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def output_of(model: nn.Module, inputs: dict, **kwargs) -> torch.Tensor:
    out = model(**inputs, **kwargs)
    return out if isinstance(out, torch.Tensor) else out.logits


def assert_rows_equal_alone(model, base: nn.Module, inputs: dict, names: list[str], atol: float = 1e-5,
                            last: int | None = None) -> None:
    """A mixed batch (one adapter per row) equals each row run alone with its adapter (or the base); `last`: only
    the input's own last positions compared (a virtual-token adapter puts its tokens in front of its row)."""
    keep = slice(-last, None) if last else slice(None)
    with torch.no_grad():
        mixed = output_of(model, inputs, adapter_names=names)
        for row, name in enumerate(names):
            one = {k: v[row:row + 1] for k, v in inputs.items()}
            if name == "__base__":
                alone = output_of(base, one)
            else:
                model.set_adapter(name)
                alone = output_of(model, one)
            torch.testing.assert_close(mixed[row:row + 1, keep], alone[:, keep], atol=atol, rtol=0, msg=name)


def twin(builder, adapter_name: str = "default", **config):
    """(ours, peft's, base copy) wrapped from the same base with identical adapter weights."""
    import peft

    base = builder()
    config.setdefault("init_lora_weights", False)
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**config), adapter_name)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config), adapter_name)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs, base


@pytest.fixture
def llama():
    return tiny_llama()


# -- the training job's tiny chat model (tests/chat_model.py) ------------------------------------
@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> Path:
    from chat_model import build_chat_model

    return build_chat_model(tmp_path_factory.mktemp("tiny-chat-model"))


@pytest.fixture(scope="session")
def wide_chat_model_dir(tmp_path_factory) -> Path:
    """64 wide: bitsandbytes' CPU 4-bit inference kernel refuses narrower layers (see small_llama)."""
    from chat_model import build_chat_model

    return build_chat_model(tmp_path_factory.mktemp("wide-chat-model"), hidden=64)
