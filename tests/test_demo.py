"""`make demo` runs `lorakit demo`: the real model, trained briefly, shown before and after."""

from __future__ import annotations

import pytest

from lorakit.demo import run_demo


@pytest.mark.slow
def test_demo_runs_end_to_end_and_the_adapter_learns():
    result = run_demo(steps=12, shown=2)
    assert len(result["before"]) == len(result["after"]) == 2
    assert result["final_loss"] < 0.5  # from ~2.4 at step 1 on the bundled made-up facts
    assert result["after"] != result["before"]
