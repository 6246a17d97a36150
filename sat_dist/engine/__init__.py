"""The CogVideoX video engine: every component loaded across the group, and sampling on top.

`load_engine(path_or_config, tp=N)` -> `Engine`; `Engine.sample(prompt, ...)` -> frames on rank 0.
layout (where the parts are) -> loader.load_components (one plan, one agreement) -> engine (sampling:
text, sampler, video) -> report.
"""
from __future__ import annotations

from .engine import Engine, load_engine

__all__ = ["Engine", "load_engine"]
