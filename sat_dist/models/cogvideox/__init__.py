"""The CogVideoX family: SAT's `DiffusionTransformer` (THUDM/CogVideo sat/dit_video_concat.py),
read from CogVideo's own YAML layout, with a `sat-dist plan` activation estimate.

config (schema) -> modules (nn.Modules, each with its forward) -> model (the DiT and its builder);
tables holds the parameter-free formulas, sequence the Ulysses sequence-parallel split and attention,
yaml the CogVideo layout adapter.
"""
from __future__ import annotations

from ..family import ModelFamily
from .capacity import activation_estimate
from .config import MODEL_CLASS, DiTArch, DiTConfig
from .model import CHECKPOINT_PREFIX, CogVideoXDiT, build_cogvideox
from .sequence import SeqShard, SPInfo, split_rows, ulysses_attention
from .tables import rope_freqs_3d, sincos_3d, timestep_embedding
from .yaml import cogvideo_layout

FAMILY = ModelFamily(name="cogvideox", model_classes=(MODEL_CLASS,), config_cls=DiTConfig, build=build_cogvideox,
                     adapt_yaml=cogvideo_layout, activation=activation_estimate)

__all__ = ["CHECKPOINT_PREFIX", "FAMILY", "MODEL_CLASS", "CogVideoXDiT", "DiTArch", "DiTConfig", "SPInfo", "SeqShard",
           "build_cogvideox", "cogvideo_layout", "rope_freqs_3d", "sincos_3d", "split_rows", "timestep_embedding",
           "ulysses_attention"]
