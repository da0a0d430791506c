"""`PromptTuningConfig`: PEFT's names and defaults. The prompt is `num_virtual_tokens` learned embeddings
in front of the input; RANDOM starts them as nn.Embedding does, SAMPLE_VOCAB from random vocabulary
embeddings, TEXT from the embeddings of `prompt_tuning_init_text` (repeated or cut to length)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lorakit.errors import ConfigError
from lorakit.methods.config_fields import reject_unknown_fields
from lorakit.methods.virtual_tokens.config import VirtualTokenConfig

INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@reject_unknown_fields()
@dataclass
class PromptTuningConfig(VirtualTokenConfig):
    peft_type: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None  # a local tokenizer directory (TEXT)
    tokenizer_kwargs: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_tuning_init = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init))
        if self.prompt_tuning_init not in INITS:
            raise ConfigError(f"prompt_tuning_init must be one of {list(INITS)}, got {self.prompt_tuning_init!r}.")
        if self.prompt_tuning_init == "TEXT" and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            raise ConfigError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text and tokenizer_name_or_path "
                              "(the tokenizer that turns the text into the tokens whose embeddings start the prompt).")
