"""`PromptEmbedding`: the learned prompt itself, one embedding per virtual token (PEFT's module and names)."""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakit.methods.prompt_tuning.config import PromptTuningConfig


class PromptEmbedding(nn.Module):
    places = "inputs"  # in front of the input embeddings (virtual_tokens/inputs.py)

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Embedding):
        super().__init__()
        count = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(count, config.token_dim, device=word_embeddings.weight.device)
        ids = self._init_ids(config, count, word_embeddings.num_embeddings)
        if ids is not None:  # start from real tokens' embeddings, in fp32 (PEFT's rule)
            with torch.no_grad():
                start = word_embeddings(ids.to(word_embeddings.weight.device)).detach().clone().float()
            self.embedding.weight = nn.Parameter(start)

    @staticmethod
    def _init_ids(config: PromptTuningConfig, count: int, vocab_size: int) -> torch.Tensor | None:
        if config.inference_mode or config.prompt_tuning_init == "RANDOM":
            return None
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            return torch.randint(0, vocab_size, (count,), dtype=torch.long)
        from transformers import AutoTokenizer

        kwargs = dict(config.tokenizer_kwargs or {})
        kwargs.pop("trust_remote_code", None)  # a tokenizer must not run code from a config we were handed
        ids = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)(config.prompt_tuning_init_text)["input_ids"]
        ids = (ids * math.ceil(count / len(ids)))[:count]
        return torch.tensor(ids, dtype=torch.long)

    def virtual_tokens(self) -> torch.Tensor:
        """(num_virtual_tokens, token_dim): what goes in front of every row's embeddings."""
        return self.embedding.weight
