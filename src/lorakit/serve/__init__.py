"""Serving: the continuous-batching engine (engine.py) and its parts."""

from lorakit.serve.engine import Engine, RequestHandle
from lorakit.serve.outputs import RequestOutput
from lorakit.serve.sampling import SamplingParams

__all__ = ["Engine", "RequestHandle", "RequestOutput", "SamplingParams"]
