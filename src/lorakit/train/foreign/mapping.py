"""What an import from another tool's config records, key by key: mapped (to which of our
keys), ignored (and why), or refused. `lorakit config import` prints the rows as a table.

A dialect module gives, for each of its keys, a handler: `to("train.batch_size")`, `ignore(why)`,
or a function of (mapper, value) that sets our keys itself. A key with no handler is refused,
naming the closest known one: a typo must not vanish into a silent default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError, closest

# Their launcher / sharding keys: not translated (their DeepSpeed and FSDP settings are their own files and lists).
DISTRIBUTED = ("launch settings are not translated: `lorakit train --nproc N` or torchrun runs DDP; for FSDP or "
               "DeepSpeed set train.fsdp / train.deepspeed in the lorakit config (GPUs)")
# Optimizer names HF TrainingArguments / Axolotl / LLaMA-Factory use, as ours.
OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw": "adamw",
              "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit",
              "paged_adamw_32bit": "paged_adamw_32bit"}


@dataclass
class Row:
    key: str  # theirs
    value: Any
    status: str  # mapped | ignored | default
    target: str | None = None  # ours, dotted
    note: str = ""


@dataclass
class Mapper:
    """The config being built (our raw dict) and a row per key of theirs."""

    dialect: str
    folder: Path  # the foreign file's folder: its relative data paths start here
    config: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)

    def set(self, target: str, value: Any, key: str, given: Any = None, note: str = "") -> None:
        node, leaf = self._section(target)
        node[leaf] = value
        self.rows.append(Row(key, value if given is None else given, "mapped", target, note))

    def ignore(self, key: str, value: Any, why: str) -> None:
        self.rows.append(Row(key, value, "ignored", None, why))

    def default(self, target: str, value: Any, why: str) -> None:
        """One of their defaults that differs from ours, written out so the run matches theirs."""
        node, leaf = self._section(target)
        if leaf not in node:
            node[leaf] = value
            self.rows.append(Row(f"({target})", value, "default", target, why))

    def _section(self, target: str) -> tuple[dict[str, Any], str]:
        """(the mapping that holds `target`'s last key, made if missing, that key)."""
        *sections, leaf = target.split(".")
        node = self.config
        for part in sections:
            node = node.setdefault(part, {})
        return node, leaf

    def get(self, target: str) -> Any:
        node: Any = self.config
        for part in target.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    def local_file(self, key: str, value: str) -> str:
        """A data path of theirs as an absolute path to a file that exists here (we never download)."""
        path = (self.folder / Path(str(value)).expanduser()).resolve()
        if not path.is_file():
            raise ConfigError(
                f"{key}: {value!r} is not a file here ({path}); lorakit reads local JSON, JSONL or CSV files and never "
                f"downloads data. For a Hub dataset, download it once where there is internet (e.g. `huggingface-cli "
                f"download {value} --repo-type dataset --local-dir data/`) and give the file's path.")
        return str(path)


Handler = Callable[[Mapper, Any, str], None]


def to(target: str, convert: Callable[[Any], Any] | None = None, note: str = "") -> Handler:
    def handle(mapper: Mapper, value: Any, key: str = "") -> None:
        mapper.set(target, convert(value) if convert else value, key, given=value, note=note)
    return handle


def ignore(why: str) -> Handler:
    def handle(mapper: Mapper, value: Any, key: str = "") -> None:
        mapper.ignore(key, value, why)
    return handle


def refuse_unless(allowed: Callable[[Any], bool], why: str) -> Handler:
    """A key we honour only at its harmless values (e.g. stage: sft); otherwise a ConfigError."""
    def handle(mapper: Mapper, value: Any, key: str = "") -> None:
        if not allowed(value):
            raise ConfigError(f"{mapper.dialect} {key}: {value!r}: {why}")
        mapper.ignore(key, value, "the only value lorakit runs")
    return handle


def optimizer(mapper: Mapper, value: Any, key: str = "") -> None:
    ours = OPTIMIZERS.get(str(value), value)
    note = "needs a CUDA GPU (on CPU: --set train.optimizer=adamw)" if str(ours).startswith("paged_") else ""
    mapper.set("train.optimizer", ours, key, given=value, note=note)


def eval_fraction(mapper: Mapper, value: Any, key: str) -> None:
    """Axolotl's val_set_size, LLaMA-Factory's val_size: the held-out share (0: none)."""
    if not value:
        mapper.ignore(key, value, "0: lorakit still holds out data.eval_fraction (0.1) for its before/after table")
    elif 0 < float(value) < 1:
        mapper.set("data.eval_fraction", float(value), key)
    else:
        raise ConfigError(f"{mapper.dialect} {key}: {value!r}: give a fraction of the data set between 0 and 1.")


def apply(mapper: Mapper, raw: dict[str, Any], handlers: dict[str, Handler]) -> None:
    """Run every key of `raw` through its handler; empty values (Axolotl writes `key:` for "unset")
    are recorded and skipped; an unknown key is refused with the closest known one."""
    for key, value in raw.items():
        handler = handlers.get(key)
        if handler is None:
            raise ConfigError(f"{mapper.dialect} config: unknown key {key!r}.{closest(key, handlers)} lorakit maps "
                              f"the {mapper.dialect} keys listed by `lorakit config import --keys {mapper.dialect}`; "
                              "remove the key, or write a lorakit config (`lorakit schema`).")
        if value is None:
            mapper.rows.append(Row(key, None, "ignored", None, "empty"))
            continue
        handler(mapper, value, key)
