"""Eval gates for `promote`: "exact_match>=0.9", "loss<0.5" — a metric of `lorakit eval`'s adapter
side, a comparison, a number. The same gates decide the regression check: the candidate must
do at least as well as the version the alias holds now on each gated metric (higher is better
for `>`/`>=` gates, lower for `<`/`<=`)."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from lorakit.errors import RegistryError

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq}
_GATE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|>|<)\s*(-?[0-9.]+(?:e-?\d+)?)\s*$")
METRICS = ("exact_match", "contains_match", "loss", "perplexity")


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Gate:
        match = _GATE.match(text)
        if not match:
            raise RegistryError(f"Gate {text!r}: write METRIC OP NUMBER, e.g. 'exact_match>=0.9'.")
        metric, op, value = match.groups()
        if metric not in METRICS:
            raise RegistryError(f"Gate {text!r}: unknown metric {metric!r}; use one of {', '.join(METRICS)}.")
        return cls(metric, op, float(value))

    def passes(self, scores: dict) -> bool:
        value = scores.get(self.metric)
        return value is not None and _OPS[self.op](value, self.value)

    def better_or_equal(self, candidate: dict, current: dict) -> bool:
        a, b = candidate.get(self.metric), current.get(self.metric)
        if a is None or b is None:
            return True
        return a <= b if self.op in ("<", "<=") else a >= b

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def check_gates(gates: list[Gate], scores: dict) -> list[str]:
    """The failed gates, each with the score that failed it."""
    return [f"{gate} (got {scores.get(gate.metric)})" for gate in gates if not gate.passes(scores)]
