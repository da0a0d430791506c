"""The `lorakit` command: typer app, `python -m lorakit`, version."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

import lorakit
from lorakit.cli import app


def test_help_lists_demo():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and lorakit.__version__ in result.output


def test_python_dash_m_is_the_same_entry_point():
    result = subprocess.run([sys.executable, "-m", "lorakit", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and f"lorakit {lorakit.__version__}" in result.stdout
