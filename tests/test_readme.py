"""The README's Python examples must run as written, and show what they claim."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


SERVER_SECTION = "## The server: `lorakit serve`"  # its examples need a running server: tests/serve/test_server.py


def python_blocks() -> list[str]:
    text = README.read_text()
    before, _, after = text.partition(SERVER_SECTION)
    rest = after.split("\n## ", 1)[1] if "\n## " in after else ""
    return re.findall(r"```python\n(.*?)```", before + rest, flags=re.S)


def test_readme_examples_run_and_print_what_they_claim():
    blocks = python_blocks()
    assert blocks, "the README should have at least one Python example"
    for block in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, str(README), "exec"), {"__name__": "readme"})
        for claimed in re.findall(r"^# (trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: [\d.]+)", block, flags=re.M):
            assert claimed in out.getvalue()


def test_readme_gives_the_two_setup_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
