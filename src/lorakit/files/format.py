"""Adapter files on disk, in PEFT's layout — written atomically, read without trusting them.

    <dir>/adapter_config.json        the LoraConfig, as PEFT writes it
    <dir>/adapter_model.safetensors  tensors under PEFT's names, plus metadata
    <dir>/<name>/…                   every adapter other than "default", as PEFT lays them out

The safetensors metadata (strings; PEFT ignores it) carries lorakit's facts:
`lorakit.format_version`, `lorakit.version`, `lorakit.created`, `lorakit.base_model`,
`lorakit.base_fingerprint` (see fingerprint.py), and two integrity checks —
`lorakit.checksum` (CRC-32 of every tensor's bytes and of the metadata) and
`lorakit.config_digest` (SHA-256 of the config fields that change the adapter's numbers,
the config class's `digest_fields`: for LoRA r, alpha, dropout, targets, patterns, …). A flipped byte or a hand-edited rank then fails loudly
instead of loading wrong numbers. Fields that do not change numbers
(`base_model_name_or_path`, `revision`, `task_type`, `inference_mode`) may be edited.
PEFT-made files have neither check; reading them checks everything else.

Writes go to temporary files in the target directory, are fsync'ed, then renamed over
the old ones (weights first, config last): an interrupted save leaves the previous
adapter readable. Pickle files are never opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lorakit.errors import (
    AdapterConfigError,
    AdapterFileNotFoundError,
    AdapterWeightsError,
    ConfigError,
    PickleRefusedError,
)
from lorakit.filemode import publish_mode
from lorakit.methods.table import config_from_dict

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
FORMAT_VERSION = "1"
CHECKSUM_KEY = "lorakit.checksum"
DIGEST_KEY = "lorakit.config_digest"
FINGERPRINT_KEY = "lorakit.base_fingerprint"


@dataclass
class AdapterFiles:
    """What one adapter directory holds, read and checked."""

    directory: Path
    config: Any
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @property
    def fingerprint(self) -> dict | None:
        raw = self.metadata.get(FINGERPRINT_KEY)
        if raw is None:
            return None
        try:
            value = json.loads(raw)
            assert isinstance(value, dict) and {"version", "arch", "samples"} <= value.keys()
            return value
        except (ValueError, AssertionError):
            raise AdapterWeightsError(f"{self.directory / WEIGHTS_NAME}: the base fingerprint in the metadata is unreadable.") from None


def adapter_dir(root: str | os.PathLike, adapter_name: str) -> Path:
    """PEFT's layout: "default" at the root, any other adapter in a subdirectory of its name."""
    return Path(root) if adapter_name == "default" else Path(root) / adapter_name


def config_digest(config: Any) -> str:
    data = config.to_dict()
    canonical = json.dumps({k: data.get(k) for k in config.digest_fields}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """CRC-32 over names, dtypes, shapes and bytes of every tensor, then the metadata."""
    crc = 0
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        crc = zlib.crc32(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode(), crc)
        crc = zlib.crc32(tensor.reshape(-1).view(torch.uint8).numpy(), crc)
    for key in sorted(metadata):
        if key != CHECKSUM_KEY:
            crc = zlib.crc32(f"{key}={metadata[key]}".encode(), crc)
    return f"{crc:08x}"


# -- writing -----------------------------------------------------------------------------------
@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block wrote it, fsync and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield staged
        with open(staged, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as staged:
        staged.write_text(text, encoding="utf-8")


def write_adapter(directory: Path, config: Any, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write one adapter directory atomically (see the module docstring)."""
    directory.mkdir(parents=True, exist_ok=True)
    # A copy: live adapter tensors are views of one bank (methods/bank.py), and safetensors refuses shared storage.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    metadata = {"format": "pt", "lorakit.format_version": FORMAT_VERSION, **metadata, DIGEST_KEY: config_digest(config)}
    metadata[CHECKSUM_KEY] = checksum(tensors, metadata)
    config_dict = {**config.to_dict(), "inference_mode": True}  # as PEFT saves it
    token = uuid.uuid4().hex[:8]
    staged = {WEIGHTS_NAME: directory / f".{WEIGHTS_NAME}.{token}.tmp", CONFIG_NAME: directory / f".{CONFIG_NAME}.{token}.tmp"}
    try:
        save_file(tensors, staged[WEIGHTS_NAME], metadata=metadata)
        staged[CONFIG_NAME].write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        for path in staged.values():
            publish_mode(path)
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(staged[name], directory / name)
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)


# -- reading -----------------------------------------------------------------------------------
def read_adapter(directory: str | os.PathLike, verify_integrity: bool = True) -> AdapterFiles:
    """Read and check one adapter directory; raise an AdapterError subclass naming what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileNotFoundError(
            f"{directory} is not a directory; an adapter is a directory with {CONFIG_NAME} and {WEIGHTS_NAME}."
        )
    weights, config_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    if not weights.is_file():
        pickles = [name for name in PICKLE_NAMES if (directory / name).is_file()]
        if pickles:
            raise PickleRefusedError(
                f"{directory / pickles[0]} is a pickle file, and lorakit never unpickles a file it is handed "
                f"(loading a pickle can run arbitrary code). Convert it once, if you trust it: "
                f"`lorakit convert --allow-pickle {directory}` (uses torch.load(weights_only=True))."
            )
        raise AdapterFileNotFoundError(f"{weights} is missing; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}.")
    if not config_path.is_file():
        raise AdapterFileNotFoundError(f"{config_path} is missing; it says how the tensors in {WEIGHTS_NAME} are applied.")
    tensors, metadata = _read_weights(weights)
    # A file we wrote never holds a key we do not know: there, one is an edit or corruption.
    config = read_config(config_path, strict="lorakit.format_version" in metadata)
    if verify_integrity:
        _check_integrity(weights, config, tensors, metadata)
    _check_values(weights, tensors)
    return AdapterFiles(directory, config, tensors, metadata)


def read_config(path: Path, strict: bool = False) -> Any:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise AdapterConfigError(f"{path} is not UTF-8 text; it is corrupt.") from None
    except json.JSONDecodeError as exc:
        raise AdapterConfigError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); it is truncated or was edited."
        ) from None
    if not isinstance(data, dict):
        raise AdapterConfigError(f"{path} must hold a JSON object (the adapter config), found {type(data).__name__}.")
    try:
        return config_from_dict(data, strict=strict)
    except (ConfigError, TypeError, ValueError) as exc:
        raise AdapterConfigError(f"{path}: {exc}") from None


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise AdapterWeightsError(f"{path} is not a readable safetensors file ({exc}); it is truncated or corrupt.") from None
    return tensors, metadata


def _check_integrity(path: Path, config: Any, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    stored = metadata.get(CHECKSUM_KEY)
    if stored is not None and stored != checksum(tensors, metadata):
        raise AdapterWeightsError(
            f"{path}: checksum mismatch — the tensors or metadata changed after saving (corrupted copy?). "
            "Re-copy the adapter, or pass verify_integrity=False to load it anyway."
        )
    digest = metadata.get(DIGEST_KEY)
    if digest is not None and digest != config_digest(config):
        raise AdapterConfigError(
            f"{path.parent / CONFIG_NAME} does not match the config these weights were saved with (a field among "
            f"{', '.join(config.digest_fields)} was edited or corrupted). Re-save the adapter with the intended config, or "
            "pass verify_integrity=False to load it anyway."
        )


def _check_values(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    for key, tensor in tensors.items():
        if not tensor.dtype.is_floating_point:
            raise AdapterWeightsError(f"{path}: tensor {key} has dtype {tensor.dtype}; adapter weights are floats.")
        # A NaN/Inf anywhere makes the sum NaN/Inf: one reduction instead of a mask per tensor. A
        # finite sum proves every value finite; a non-finite one is confirmed element by element
        # (huge but finite values can overflow the sum).
        if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise AdapterWeightsError(f"{path}: tensor {key} holds {bad} NaN/Inf value(s); the adapter is broken.")
