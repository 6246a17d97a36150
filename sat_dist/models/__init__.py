"""The explicit table of model families, and what the loader asks of a model: its family, a
TP-size check, and the model built on the meta device (shapes only: no memory, no init kernels).

A new family is one entry in FAMILIES; nothing registers itself by being imported.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..placement import TensorSpec
from . import cogvideox, cogvideox_vae, sat_gpt, t5
from .family import ModelFamily
from .layers import TPInfo, collect_specs

FAMILIES: tuple[ModelFamily, ...] = (sat_gpt.FAMILY, cogvideox.FAMILY, t5.FAMILY, cogvideox_vae.FAMILY)


def family_for(model_class: str) -> ModelFamily:
    """The family that builds `model_class`; a ConfigError naming the supported classes otherwise."""
    for family in FAMILIES:
        if model_class in family.model_classes:
            return family
    supported = sorted(c for f in FAMILIES for c in f.model_classes)
    raise ConfigError(f"no builder for model_class {model_class!r}; supported: {supported}")


def check_tp(cfg: Any, tp: int) -> None:
    """Refuse a TP size the architecture cannot be split by, before any byte is read."""
    cfg.check_tp(tp)


def build_meta_model(cfg: Any, tp: TPInfo) -> nn.Module:
    """Build on the meta device: no memory, no init kernels; shapes are this rank's shards."""
    build = family_for(cfg.model_class).build
    with torch.device("meta"):
        return build(cfg, tp)


__all__ = ["FAMILIES", "ModelFamily", "TPInfo", "TensorSpec", "build_meta_model", "check_tp", "collect_specs",
           "family_for"]
