"""The CogVideoX VAE's config: the arguments of diffusers' `AutoencoderKLCogVideoX.__init__`
(huggingface/diffusers src/diffusers/models/autoencoders/autoencoder_kl_cogvideox.py), names and
defaults exactly as there, so a release's `vae/config.json` is read as written (its `_class_name`
becomes `model_class`; the other `_`-keys are diffusers' bookkeeping).

Every tensor is replicated: the VAE (~0.2 B parameters) is decoded on a rank, never TP-split, so any
TP size works.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from ...errors import ConfigError

MODEL_CLASS = "AutoencoderKLCogVideoX"
DOWN, UP = "CogVideoXDownBlock3D", "CogVideoXUpBlock3D"


@dataclass
class VAEConfig:
    """`AutoencoderKLCogVideoX` arguments (diffusers 0.42 defaults = CogVideoX-2b's VAE)."""

    model_class: str = MODEL_CLASS
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: list = field(default_factory=lambda: [DOWN] * 4)
    up_block_types: list = field(default_factory=lambda: [UP] * 4)
    block_out_channels: list = field(default_factory=lambda: [128, 256, 256, 512])
    latent_channels: int = 16
    layers_per_block: int = 3
    act_fn: str = "silu"
    norm_eps: float = 1e-6
    norm_num_groups: int = 32
    temporal_compression_ratio: float = 4
    sample_height: int = 480
    sample_width: int = 720
    scaling_factor: float = 1.15258426
    shift_factor: Optional[float] = None
    latents_mean: Optional[list] = None
    latents_std: Optional[list] = None
    force_upcast: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    invert_scale_latents: bool = False

    def validate(self) -> None:
        if self.model_class != MODEL_CLASS:
            raise ConfigError(f"VAEConfig is for {MODEL_CLASS}, got model_class {self.model_class!r}")
        blocks = list(self.block_out_channels)
        if not blocks or min(blocks) <= 0:
            raise ConfigError(f"vae block_out_channels must be positive sizes, got {blocks}")
        for name, kinds, want in (("down_block_types", self.down_block_types, DOWN),
                                  ("up_block_types", self.up_block_types, UP)):
            if len(kinds) != len(blocks) or any(k != want for k in kinds):
                raise ConfigError(f"vae {name} must be {len(blocks)} x {want!r} (one per block_out_channels), "
                                  f"got {list(kinds)}")
        bad = [c for c in blocks if c % self.norm_num_groups]
        if bad:
            raise ConfigError(f"vae norm_num_groups={self.norm_num_groups} does not divide block_out_channels {bad}")
        ratio = float(self.temporal_compression_ratio)
        if ratio < 1 or not math.log2(ratio).is_integer():
            raise ConfigError(f"vae temporal_compression_ratio must be a power of 2, got {ratio}")
        if self.use_quant_conv or self.use_post_quant_conv:
            raise ConfigError("vae use_quant_conv/use_post_quant_conv: no CogVideoX VAE uses them (diffusers sizes "
                              "them from out_channels, which cannot match the latents)")

    @property
    def spatial_scale(self) -> int:
        """Pixels per latent pixel (diffusers' pipelines: 2 ** (len(block_out_channels) - 1))."""
        return 2 ** (len(self.block_out_channels) - 1)

    def kwargs(self) -> dict:
        """The constructor arguments (everything but model_class)."""
        out = {k: v for k, v in self.__dict__.items() if k != "model_class"}
        out["down_block_types"], out["up_block_types"] = tuple(self.down_block_types), tuple(self.up_block_types)
        out["block_out_channels"] = tuple(self.block_out_channels)
        return out

    def check_tp(self, tp: int) -> None:
        """Replicated on every rank: any TP size >= 1 works."""
        if tp < 1:
            raise ConfigError(f"TP must be >= 1, got {tp}")
