"""References to registered adapters: `NAME` (its default alias, or its newest version), `NAME@N`
(version N), `NAME:alias` (what the alias points to now)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lorakit.errors import RegistryError

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
MAX_NAME = 100  # the width of the name and alias columns (PostgreSQL enforces it; SQLite would not)
_REF = re.compile(rf"^(?P<name>{_NAME})(?:@(?P<version>\d+)|:(?P<alias>{_NAME}))?$")


@dataclass(frozen=True)
class Ref:
    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return self.name + (f"@{self.version}" if self.version else f":{self.alias}" if self.alias else "")


def check_name(name: str, what: str = "adapter name") -> str:
    if not re.fullmatch(_NAME, name):
        raise RegistryError(f"{what} {name!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit.")
    if len(name) > MAX_NAME:
        raise RegistryError(f"{what} {name[:20]}… is {len(name)} characters long; the limit is {MAX_NAME}.")
    return name


def parse_ref(text: str) -> Ref:
    match = _REF.match(text)
    if not match:
        raise RegistryError(f"{text[:120]!r} is not a reference: use NAME, NAME@N or NAME:alias.")
    check_name(match["name"])
    if match["alias"]:
        check_name(match["alias"], "alias")
    version = match["version"]
    if version and len(version) > 9:
        raise RegistryError(f"{text[:120]!r}: version {version[:12]}… is out of range.")
    return Ref(match["name"], int(version) if version else None, match["alias"])
