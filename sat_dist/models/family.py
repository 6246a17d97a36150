"""A model family: everything sat_dist needs to know about one kind of model, in one value.

`models/__init__` holds the explicit table of families. A family owns its config schema, the
foreign YAML layout it accepts (CogVideo's), its meta-device builder and, for `sat-dist plan`, its
activation-memory estimate. Nothing registers itself by being imported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import nn

from ..errors import ConfigError
from .layers import TPInfo

Latent = tuple[int, int, int]


@dataclass(frozen=True)
class ActivationEstimate:
    """Peak activation bytes of one forward per TP rank, or None when the config alone cannot say
    (`note` then says what to pass)."""

    bytes: Optional[int]
    note: str


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_classes: tuple[str, ...]  # the `model_class` values this family builds
    config_cls: type  # dataclass with validate() and check_tp(tp); optional UNSUPPORTED = {key: only value}
    build: Callable[[Any, TPInfo], nn.Module]  # called under the meta device
    # A foreign YAML layout -> {"model": ..., "load": ...}, or None when it is not that layout.
    adapt_yaml: Optional[Callable[[dict], Optional[dict]]] = None
    # (config, tp, itemsize, batch, latent) -> estimate; None: the family offers none.
    activation: Optional[Callable[[Any, int, int, int, Optional[Latent]], ActivationEstimate]] = None


def check_tp_divides(tp: int, limits: dict[str, int]) -> None:
    """Refuse a TP size that does not divide every split dimension, saying which sizes work
    (shared by every family's `check_tp`)."""
    ok = [n for n in range(1, min(limits.values()) + 1) if all(v % n == 0 for v in limits.values())]
    if tp < 1:
        raise ConfigError(f"TP must be >= 1, got {tp}; TP sizes that work for this model: {ok}")
    bad = {k: v for k, v in limits.items() if v % tp}
    if bad:
        what = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise ConfigError(f"TP={tp} does not divide {what}; TP sizes that work for this model: {ok}")
