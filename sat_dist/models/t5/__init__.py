"""The HF T5 encoder family: transformers' `T5EncoderModel` (huggingface/transformers
src/transformers/models/t5/modeling_t5.py), tensor-parallel, configured from a T5 `config.json`
(`formats.hf_t5`). CogVideoX's text encoder (t5-v1_1-xxl) is one.

config (schema) -> model (the nn.Modules, each with its forward, and the builder).
"""
from __future__ import annotations

from ..family import ModelFamily
from .config import MODEL_CLASS, T5Config
from .model import T5Encoder

FAMILY = ModelFamily(name="t5", model_classes=(MODEL_CLASS,), config_cls=T5Config, build=T5Encoder)

__all__ = ["FAMILY", "MODEL_CLASS", "T5Config", "T5Encoder"]
