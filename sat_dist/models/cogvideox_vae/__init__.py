"""The CogVideoX VAE family: diffusers' `AutoencoderKLCogVideoX`, replicated on every rank, for the
video engine's decode (and I2V's encode). Config = a release's `vae/config.json`."""
from __future__ import annotations

from ..family import ModelFamily
from .capacity import decode_estimate
from .config import MODEL_CLASS, VAEConfig
from .model import build_vae

FAMILY = ModelFamily(name="cogvideox_vae", model_classes=(MODEL_CLASS,), config_cls=VAEConfig, build=build_vae,
                     activation=decode_estimate)

__all__ = ["FAMILY", "MODEL_CLASS", "VAEConfig", "build_vae", "decode_estimate"]
