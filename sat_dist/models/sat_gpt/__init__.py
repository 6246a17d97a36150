"""The SAT `BaseModel` / `GPT2Model` family (THUDM/SwissArmyTransformer sat/model/base_model.py):
a plain decoder stack whose config is SAT's own `model_config.json`."""
from __future__ import annotations

from ..family import ModelFamily
from .config import TransformerConfig
from .model import SATModel

FAMILY = ModelFamily(name="sat_gpt", model_classes=("BaseModel", "GPT2Model"), config_cls=TransformerConfig,
                     build=SATModel)

__all__ = ["FAMILY", "SATModel", "TransformerConfig"]
