"""Model registry: model_class -> builder. Models are always built under the meta device."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigError
from .layers import TPInfo, TensorSpec, collect_specs
from .cogvideox import build_cogvideox  # also registers its config class and CogVideo's YAML layout
from .sat_gpt import SATModel

BUILDERS: dict[str, Callable[[Any, TPInfo], nn.Module]] = {
    "BaseModel": SATModel,
    "GPT2Model": SATModel,
    "DiffusionTransformer": build_cogvideox,  # CogVideoX SAT DiT
}


def check_tp(cfg: Any, tp: int) -> None:
    """Refuse a TP size the architecture cannot be split by, before any byte is read."""
    cfg.check_tp(tp)


def build_meta_model(cfg: Any, tp: TPInfo) -> nn.Module:
    """Build on the meta device: no memory, no init kernels; shapes are this rank's shards."""
    builder = BUILDERS.get(cfg.model_class)
    if builder is None:
        raise ConfigError(f"no builder for model_class {cfg.model_class!r}; supported: {sorted(BUILDERS)}")
    with torch.device("meta"):
        return builder(cfg, tp)


__all__ = ["BUILDERS", "TPInfo", "TensorSpec", "build_meta_model", "check_tp", "collect_specs"]
