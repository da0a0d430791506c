"""What an import from another tool's config records, key by key: mapped (to which of our
keys), ignored (and why), default (their default written out, where ours differs), or refused.
`lorakit config import` prints the rows as a table.

A dialect module gives, for every key of its tool's schema, a handler: `to("train.batch_size")`,
`ignore(why)`, `at_default(default, why)` (a setting lorakit does not implement: fine at the
tool's default, refused with `why` otherwise), or a function of (mapper, value, key) that sets
our keys itself. All of a file's problems are reported at once — every unknown key (with the
closest known one: a typo must not vanish into a silent default) and every refused one.
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
TRACKING = "experiment trackers are not wired in; metrics.jsonl, loss.png and report.md hold the run"
KERNELS = "a kernel or attention implementation: the same computation, done lorakit's own way"
MEMORY = "memory or device placement only: what is trained does not change"
PIPELINE = "how data is prepared, cached or loaded: lorakit tokenizes in memory, in one process"
HUB = "lorakit never uploads or downloads (push to the registry with register:)"
REPORTING = "evaluation and reporting extras: lorakit's report is the before/after table and the samples"
# Optimizer names HF TrainingArguments / Axolotl / LLaMA-Factory use, as ours.
OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw": "adamw",
              "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit",
              "paged_adamw_32bit": "paged_adamw_32bit"}
# Scheduler names (HF's SchedulerType), as ours.
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant",
              "constant_with_warmup": "constant_with_warmup", "cosine_with_restarts": "cosine_with_restarts",
              "polynomial": "polynomial"}


@dataclass
class Row:
    key: str  # theirs
    value: Any
    status: str  # mapped | ignored | default
    target: str | None = None  # ours, dotted
    note: str = ""


@dataclass
class Mapper:
    """The config being built (our raw dict), a row per key of theirs, and what was refused."""

    dialect: str
    folder: Path  # the foreign file's folder: its relative data paths start here (then the working directory)
    config: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def set(self, target: str, value: Any, key: str, given: Any = None, note: str = "") -> None:
        node, leaf = self._section(target)
        node[leaf] = value
        self.rows.append(Row(key, value if given is None else given, "mapped", target, note))

    def ignore(self, key: str, value: Any, why: str) -> None:
        self.rows.append(Row(key, value, "ignored", None, why))

    def refuse(self, key: str, value: Any, why: str) -> None:
        self.refused.append(f"{key}: {_short(value)}: {why}")

    def default(self, target: str, value: Any, why: str) -> None:
        """One of their defaults that differs from ours, written out so the run matches theirs."""
        node, leaf = self._section(target)
        if leaf not in node:
            node[leaf] = value
            self.rows.append(Row(f"({target})", value, "default", target, why))

    def drop(self, target: str, key: str, why: str) -> None:
        """Take a key back out (a later rule overrides it), saying so in its row."""
        node, leaf = self._section(target)
        if leaf in node:
            del node[leaf]
            for row in self.rows:
                if row.target == target:
                    row.status, row.note = "ignored", why
            self.rows.append(Row(key, None, "ignored", target, why))

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
        """A data path of theirs as an absolute path to a file that exists here (we never download): relative to
        the config's folder, else to the working directory (where their tools resolve it); a folder holding one
        JSON / JSONL / CSV file is that file (as `load_dataset` reads a local folder)."""
        for anchor in (self.folder, Path.cwd()):
            path = (anchor / Path(str(value)).expanduser()).resolve()
            if path.is_dir():
                files = [p for p in sorted(path.iterdir()) if p.suffix in (".json", ".jsonl", ".csv")]
                path = files[0] if len(files) == 1 else path
            if path.is_file():
                return str(path)
        raise ConfigError(
            f"{key}: {value!r} is not a file here (looked beside the config, in {self.folder}, and in the working "
            f"directory); lorakit reads local JSON, JSONL or CSV files and never downloads data. For a Hub dataset, "
            f"download it once where there is internet (e.g. `huggingface-cli download {value} --repo-type dataset "
            "--local-dir data/`) and give the file's path.")


Handler = Callable[[Mapper, Any, str], None]


def to(target: str, convert: Callable[[Any], Any] | None = None, note: str = "") -> Handler:
    def handle(mapper: Mapper, value: Any, key: str = "") -> None:
        mapper.set(target, convert(value) if convert else value, key, given=value, note=note)
    return handle


def ignore(why: str) -> Handler:
    def handle(mapper: Mapper, value: Any, key: str = "") -> None:
        mapper.ignore(key, value, why)
    return handle


def is_unset(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""


def at_default(default: Any, why: str) -> Handler:
    """A setting lorakit does not implement: a no-op at the tool's own default (or unset), refused otherwise."""
    def handle(mapper: Mapper, value: Any, key: str = "") -> None:
        if is_unset(value) or value == default:
            mapper.ignore(key, value, f"at {mapper.dialect}'s default: nothing to do")
        else:
            mapper.refuse(key, value, why)
    return handle


def refuse_unless(allowed: Callable[[Any], bool], why: str) -> Handler:
    """A key we honour only at its harmless values (e.g. stage: sft); otherwise refused with `why`."""
    def handle(mapper: Mapper, value: Any, key: str = "") -> None:
        if not allowed(value):
            mapper.refuse(key, value, why)
        else:
            mapper.ignore(key, value, "the only value lorakit runs")
    return handle


def named(table: dict[str, str], target: str, what: str) -> Handler:
    """A name of theirs (an optimizer, a scheduler) as ours; one lorakit does not have is refused."""
    def handle(mapper: Mapper, value: Any, key: str = "") -> None:
        ours = table.get(str(value))
        if ours is None:
            mapper.refuse(key, value, f"lorakit has no {what} {value!r} (it has {', '.join(sorted(set(table)))}).")
            return
        note = "needs a CUDA GPU (on CPU: --set train.optimizer=adamw)" if str(ours).startswith("paged_") else ""
        mapper.set(target, ours, key, given=value, note=note)
    return handle


optimizer = named(OPTIMIZERS, "train.optimizer", "optimizer")
scheduler = named(SCHEDULERS, "train.lr_scheduler", "learning-rate schedule")


def eval_split(mapper: Mapper, value: Any, key: str) -> None:
    """Axolotl's val_set_size, LLaMA-Factory's val_size: 0 (none, both tools' default), a fraction of the data
    set, or (1 and more) a number of examples."""
    number = float(value)
    if number == 0:
        mapper.set("data.eval_fraction", 0.0, key, given=value, note="no held-out set, as the tool")
    elif 0 < number < 1:
        mapper.set("data.eval_fraction", number, key, given=value)
    elif number >= 1 and number == int(number):
        mapper.set("data.eval_count", int(number), key, given=value, note="a number of examples")
    else:
        mapper.refuse(key, value, "give a fraction of the data set (below 1) or a number of examples.")


def apply(mapper: Mapper, raw: dict[str, Any], handlers: dict[str, Handler]) -> None:
    """Run every key of `raw` through its handler; empty values (Axolotl writes `key:` for "unset") are
    recorded and skipped; then one error lists every unknown key and every refusal, if there are any."""
    unknown = []
    for key, value in raw.items():
        handler = handlers.get(key)
        if handler is None:
            hint = closest(key, handlers).strip()  # " Did you mean 'x'?" or ""
            unknown.append(f"{key!r}" + (f" ({hint[0].lower()}{hint[1:]})" if hint else ""))
            continue
        if value is None:
            mapper.rows.append(Row(key, None, "ignored", None, "empty"))
            continue
        try:
            handler(mapper, value, key)
        except ConfigError as error:  # a handler's own check (a data file, a dataset entry)
            mapper.refused.append(str(error))
    problems = []
    if unknown:
        problems.append(f"unknown key(s) {', '.join(unknown)}: `lorakit config keys {mapper.dialect}` lists the keys "
                        "lorakit maps or knowingly ignores")
    problems += mapper.refused
    if problems:
        raise ConfigError(f"{mapper.dialect} config: {len(problems)} problem(s) —\n  - " + "\n  - ".join(problems))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
