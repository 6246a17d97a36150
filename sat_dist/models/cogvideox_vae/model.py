"""diffusers' `AutoencoderKLCogVideoX` built on the meta device (shapes only) for sat_dist's loader:
state-dict names are diffusers' own, every tensor replicated (`collect_specs` default), so each
rank plans and reads the whole VAE file once (huggingface/diffusers
src/diffusers/models/autoencoders/autoencoder_kl_cogvideox.py).

diffusers is imported only when a VAE is built: `sat_dist.models` stays importable without it.
"""
from __future__ import annotations

from torch import nn

from ..layers import TPInfo
from .config import VAEConfig


def build_vae(cfg: VAEConfig, tp: TPInfo) -> nn.Module:
    """The family's builder (called under the meta device by models.build_meta_model)."""
    from diffusers import AutoencoderKLCogVideoX

    model = AutoencoderKLCogVideoX(**cfg.kwargs())
    model.requires_grad_(False)
    return model
