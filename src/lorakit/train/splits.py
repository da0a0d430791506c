"""HF `datasets` split slices on a local file's records: "train", "train[:20%]", "train[10:100]".

Axolotl's `datasets[].split` and LLaMA-Factory's `split` pass these to `load_dataset`; a local
JSON / JSONL / CSV file has one split, "train". A percent bound is rounded to the closest
record (HF's default, `rounding="closest"`), negative bounds count from the end, as in Python.
"""

from __future__ import annotations

import math
import re

from lorakit.errors import DataError

_SLICE = re.compile(r"^\s*(?P<name>[A-Za-z0-9_.-]+)\s*(?:\[\s*(?P<start>-?\d+%?)?\s*:\s*(?P<end>-?\d+%?)?\s*\])?\s*$")


def parse_split(text: str) -> tuple[str, str | None, str | None]:
    match = _SLICE.match(text or "")
    if not match:
        raise DataError(f"split {text!r}: write NAME or NAME[start:end] (numbers of records or percentages), e.g. "
                        "train[:20%] or train[100:200].")
    return match["name"], match["start"], match["end"]


def _bound(value: str | None, size: int, default: int) -> int:
    if value is None:
        return default
    if value.endswith("%"):
        share = int(value[:-1])
        if not -100 <= share <= 100:
            raise DataError(f"split bound {value}: a percentage is between -100% and 100%.")
        return int(math.floor(size * share / 100 + 0.5)) if share >= 0 else -int(math.floor(size * -share / 100 + 0.5))
    return int(value)


def apply_split(records: list, split: str | None, where: str) -> list:
    """The records `split` selects from one local file (`where` names it in errors)."""
    if not split:
        return records
    name, start, end = parse_split(split)
    if name != "train":
        raise DataError(f"{where}: split {split!r}: a local data file has one split, 'train' (HF names a single "
                        f"file's records so); {name!r} exists only in a Hub dataset. Give that split's own file.")
    chosen = records[slice(_bound(start, len(records), 0), _bound(end, len(records), len(records)))]
    if not chosen:
        raise DataError(f"{where}: split {split!r} selects no record of its {len(records)}.")
    return chosen
