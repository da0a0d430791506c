"""lorakit's layers (lorakit/layering.py): every import points down or sideways, and no module graph cycle —
also through imports inside functions, where cycles hide. A failure names the import to move."""

from __future__ import annotations

import subprocess
import sys

from lorakit import layering


def test_every_import_points_down_and_there_is_no_cycle():
    layering.check()


def test_every_module_is_in_a_layer():
    for module in layering.graph():
        layering.layer_of(module)  # raises for a module no layer names


def test_the_check_finds_an_upward_import_and_a_cycle():
    edges = {"lorakit.errors": {"lorakit.cli"}, "lorakit.cli": set(),
             "lorakit.train.job": {"lorakit.train.data"}, "lorakit.train.data": {"lorakit.train.job"}}
    found = layering.problems(edges)
    assert any("upward import: lorakit.errors (core) imports lorakit.cli (cli)" in p for p in found)
    assert any("import cycle among: lorakit.train.data, lorakit.train.job" in p for p in found)


def test_python_m_prints_the_layer_graph():
    done = subprocess.run([sys.executable, "-m", "lorakit.layering"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok: every import points down" in done.stdout
    assert done.stdout.splitlines()[0].startswith("core")
