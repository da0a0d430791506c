"""Optimizers by name: torch's AdamW, bitsandbytes' 8-bit AdamW, paged ones refused without CUDA."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.optim import make_optimizer


def _step(optimizer, param):
    param.grad = torch.ones_like(param)
    before = param.detach().clone()
    optimizer.step()
    return not torch.equal(before, param.detach())


def test_adamw_and_8bit_adamw_step():
    for name in ("adamw", "adamw_8bit"):
        param = torch.nn.Parameter(torch.randn(64, 64))
        assert _step(make_optimizer(name, [param], lr=1e-2), param), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal is what this machine checks")
@pytest.mark.parametrize("name", ["paged_adamw_8bit", "paged_adamw_32bit"])
def test_paged_optimizers_are_refused_on_cpu_with_the_alternatives(name):
    with pytest.raises(ConfigError, match="no CUDA device.*'adamw'"):
        make_optimizer(name, [torch.nn.Parameter(torch.zeros(2))], lr=1e-3)


def test_unknown_optimizer_names_the_closest():
    with pytest.raises(ConfigError, match="Did you mean 'adamw'"):
        make_optimizer("adamv", [torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
