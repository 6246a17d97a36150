"""The VAE's decode-memory estimate for `sat-dist plan --engine` (the family's `activation`).

The engine decodes with diffusers' tiling and frame batching on (`AutoencoderKLCogVideoX.
enable_tiling()`: tiles of `sample_height/2 x sample_width/2` pixels, 2 latent frames per decoder
call plus a 2-frame conv cache), so the peak is one tile's widest decoder activations — the last
up block works at full tile resolution with `block_out_channels[0]` channels, about six such maps
alive at once (resnet input, norm, conv, spatial-norm zq, residual, upsample) — plus the decoded
video kept as tiles until they are blended. `latent` is (latent frames, height, width).
"""
from __future__ import annotations

from typing import Optional

from ..family import ActivationEstimate, Latent
from .config import VAEConfig

LIVE_MAPS = 6  # feature maps of the last up block alive at once (see module docstring)
FRAMES_PER_CALL = 2  # diffusers' num_latent_frames_batch_size


def decode_estimate(cfg: VAEConfig, tp: int, itemsize: int, batch: int, latent: Optional[Latent]) -> ActivationEstimate:
    """Peak decode activation bytes on the decoding rank (TP does not split the VAE)."""
    if latent is None:
        return ActivationEstimate(None, "n/a: the VAE decode estimate needs the sample's latent size")
    t, h, w = latent
    s, tc = cfg.spatial_scale, int(cfg.temporal_compression_ratio)
    frames = (FRAMES_PER_CALL + 2) * tc  # decoded frames of one call, incl. the conv cache
    tile_h, tile_w = min(h * s, cfg.sample_height // 2), min(w * s, cfg.sample_width // 2)
    tile = frames * tile_h * tile_w * cfg.block_out_channels[0] * LIVE_MAPS * itemsize
    video = batch * cfg.out_channels * (1 + (t - 1) * tc) * (h * s) * (w * s) * 4  # fp32 tiles + blend
    note = (f"decode of {t}x{h}x{w} latents with tiling ({tile_h}x{tile_w} px tiles, {FRAMES_PER_CALL} latent "
            f"frames per call)")
    return ActivationEstimate(tile + 2 * video, note)
