"""`lorakit config import`'s work: an Axolotl or LLaMA-Factory config written as a lorakit job YAML,
checked as `lorakit train` would check it, never over the file it came from."""

from __future__ import annotations

from pathlib import Path

import yaml


def write_import(file: Path, out: Path | None, force: bool = False):
    """(rows, the file written, the dialect). What is written is checked as `lorakit train` would check it
    (schema, the adapter config) first; an existing file is replaced only with `force`, the source never."""
    from lorakit.errors import ConfigError
    from lorakit.files.format import write_text_atomic
    from lorakit.train.config import JobConfig, check_config, read_yaml
    from lorakit.train.config_errors import validated
    from lorakit.train.foreign import to_lorakit

    imported = to_lorakit(read_yaml(file), file)
    if imported.dialect == "lorakit":
        raise ConfigError(f"{file} is not an Axolotl or LLaMA-Factory config (it has none of their keys, or has "
                          "lorakit's sections); `lorakit train` reads it as it is.")
    target = out or file.with_name(f"{file.stem}.lorakit.yaml")
    if target.exists() and target.resolve() == file.resolve():
        raise ConfigError(f"{target} is the file being imported; write the lorakit config elsewhere (-o).")
    if target.exists() and not force:
        raise ConfigError(f"{target} exists; pass --force to replace it, or choose another -o.")
    check_config(validated(JobConfig, imported.config))
    header = f"# lorakit job, imported from the {imported.dialect} config {file.resolve()} (`lorakit config import`)\n"
    write_text_atomic(target, header + yaml.safe_dump(imported.config, sort_keys=False))
    return imported.rows, target, imported.dialect
