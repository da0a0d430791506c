"""Configs from other tools, read as ours: `lorakit train axolotl.yml` / `llamafactory.yaml`
detect the dialect and map it; `lorakit config import FILE` writes the lorakit YAML and shows
the mapping table (mapped, ignored and why, their defaults written out).

A file is foreign when it has its tool's hallmark keys and none of our sections (so a lorakit
config with one stray `base_model:` gets our "did you mean 'model'?" instead). Files of those
tools that are not a training config of theirs — LLaMA-Factory's v1 schema, an accelerate launch
config — are refused as such.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError
from lorakit.train.foreign import axolotl, llamafactory
from lorakit.train.foreign.mapping import Mapper, Row, apply
from lorakit.train.methods import METHOD_NAMES

DIALECTS = {"axolotl": axolotl, "llamafactory": llamafactory}
OUR_SECTIONS = (*METHOD_NAMES, "data", "train", "eval", "register")
ACCELERATE_HALLMARKS = ("compute_environment", "distributed_type", "mixed_precision", "num_processes")


@dataclass
class Imported:
    dialect: str  # lorakit | axolotl | llamafactory
    config: dict[str, Any]  # ours, raw (validated by load_job_config)
    rows: list[Row]


def detect(raw: dict[str, Any]) -> str:
    if any(isinstance(raw.get(section), dict) for section in OUR_SECTIONS):
        return "lorakit"
    if any(key in raw for key in llamafactory.V1_HALLMARKS):
        raise ConfigError("This is a LLaMA-Factory v1 config (model:, peft_config:, train_dataset:, …: "
                          "`llamafactory-cli v1`), another schema than its training YAML; lorakit reads the "
                          "`llamafactory-cli train` YAML (model_name_or_path, stage, finetuning_type, …).")
    if sum(key in raw for key in ACCELERATE_HALLMARKS) >= 2:
        raise ConfigError("This is an accelerate launch config (compute_environment, distributed_type, …), not a "
                          "training config: lorakit launches processes with `lorakit train --nproc N` or torchrun.")
    for name in ("llamafactory", "axolotl"):  # LLaMA-Factory first: Axolotl has no model_name_or_path
        if any(key in raw for key in DIALECTS[name].HALLMARKS):
            return name
    return "lorakit"


def to_lorakit(raw: dict[str, Any], path: Path) -> Imported:
    dialect = detect(raw)
    if dialect == "lorakit":
        return Imported(dialect, raw, [])
    module = DIALECTS[dialect]
    mapper = Mapper(dialect, Path(path).resolve().parent)
    apply(mapper, _ordered(raw), module.handlers())
    module.finish(mapper)
    config = {k: v for k, v in mapper.config.items() if not k.startswith("_")}  # handlers' notes to each other
    return Imported(dialect, config, mapper.rows)


def _ordered(raw: dict[str, Any]) -> dict[str, Any]:
    """Keys that others read first (dataset_dir before dataset, pissa_iter before pissa_init, the
    load_in_* bits before adapter)."""
    first = ("dataset_dir", "pissa_iter", "load_in_4bit", "load_in_8bit", "quantization_bit")
    return {**{k: raw[k] for k in first if k in raw}, **{k: v for k, v in raw.items() if k not in first}}


def known_keys(dialect: str) -> list[str]:
    return sorted(DIALECTS[dialect].handlers())
