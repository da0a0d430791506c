"""lorakit's exception types.

Errors are part of the interface: each says what was wrong and what to do. Every type
derives from `LorakitError`, and also from the builtin a PEFT user would catch
(`ValueError`, `KeyError`, `RuntimeError`), so code written against PEFT keeps working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose."""


class ConfigError(LorakitError, ValueError):
    """A configuration value is invalid: names the field and what is allowed."""


class TargetModulesError(ConfigError):
    """`target_modules` (or `modules_to_save`) matched nothing, or matched a module we cannot adapt."""


class AdapterNameError(LorakitError, KeyError):
    """An adapter name is unknown, reserved, or already taken."""

    def __str__(self) -> str:  # KeyError would otherwise print the message in quotes
        return str(self.args[0]) if self.args else ""


class AdapterStateError(LorakitError, RuntimeError):
    """The requested operation does not fit the adapters' current state (e.g. merging twice)."""


class MergeError(LorakitError, RuntimeError):
    """A merge cannot be done safely (non-finite result, quantized base weights)."""


class AdapterError(LorakitError, ValueError):
    """Base class of errors about adapter files and their contents."""


def closest(name: str, choices: Iterable[str], synonyms: dict[str, str] | None = None) -> str:
    """A ' Did you mean X?' suffix naming the closest valid choice, or '' when none is close.

    `synonyms` maps words people use from other tools (e.g. "rank") to our name ("r").
    """
    if synonyms and name.lower() in synonyms:
        return f" Did you mean {synonyms[name.lower()]!r}?"
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {match[0]!r}?" if match else ""


class RoutingError(LorakitError, ValueError):
    """A per-row adapter choice (`adapter_names`) does not fit the batch or the model's state."""


class AdapterFileNotFoundError(AdapterError, FileNotFoundError):
    """The adapter directory or one of its files is missing."""


class PickleRefusedError(AdapterError):
    """The adapter is stored as a pickle (adapter_model.bin); lorakit never unpickles a file it is handed."""


class AdapterConfigError(AdapterError):
    """adapter_config.json is unreadable, truncated, or describes something we cannot load."""


class AdapterWeightsError(AdapterError):
    """adapter_model.safetensors is corrupt, or a tensor in it does not fit the config or the base model."""


class AdapterBaseMismatch(AdapterError):
    """The adapter was trained on a different base model than the one it is being loaded onto."""


class DataError(ConfigError):
    """A training/eval data file is missing, unreadable, empty, or fits no known format."""


class TrainingInterrupted(LorakitError):
    """A training run was interrupted (Ctrl-C); says where it stopped and what can be resumed."""

    def __init__(self, output_dir, step: int, max_steps: int, checkpoint, save_steps: int):
        self.output_dir, self.step, self.checkpoint = output_dir, step, checkpoint
        if checkpoint is not None:
            where = f"the newest complete checkpoint is {checkpoint} (step {str(checkpoint).rsplit('-', 1)[-1]})"
        else:
            where = (f"no checkpoint was written yet (the first comes at step train.save_steps={save_steps}), so "
                     "there is nothing to resume: start again with --overwrite")
        super().__init__(f"Interrupted at step {step} of {max_steps} in {output_dir}; {where}.")


class RequestError(LorakitError, ValueError):
    """A generation request the engine cannot serve (too long, unknown adapter, bad sampling settings);
    `param`: the request field at fault, when one is (a server's 400 names it)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(RequestError):
    """A request's prompt plus its max_tokens exceed the model's context (OpenAI's wording, so clients that
    parse it for a retry with a shorter prompt keep working)."""

    def __init__(self, prompt_tokens: int, max_tokens: int, max_model_len: int):
        self.prompt_tokens, self.max_tokens, self.max_model_len = prompt_tokens, max_tokens, max_model_len
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the completion). "
            "Please reduce the length of the messages or completion.")


class AdapterLoadError(LorakitError, RuntimeError):
    """A registered adapter could not be loaded; carries the loader's own message."""


class RegistryError(LorakitError, ValueError):
    """A registry operation was refused: unknown reference, alias in the way, a failed gate."""


class RegistryNotFound(RegistryError, KeyError):
    """No adapter, version or alias by that reference."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RegistryUnavailable(RegistryError):
    """The registry's database cannot be reached right now (a server answers 503: retry later)."""


class BlobIntegrityError(RegistryError):
    """A stored adapter's files no longer hash to the digest they were pushed with (tampered or damaged)."""
