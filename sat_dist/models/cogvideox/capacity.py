"""The DiT's activation-memory estimate for `sat-dist plan` (the family's `activation`).

It lives with the model because only the model knows its sample size: the CogVideoX 1.0 DiT runs at
its configured latent size only, while a 1.5 config gives just the RoPE table's maximum, so its
sample size must be passed (`latent`: latent frames, height, width, i.e. after the VAE, before
patching).
"""
from __future__ import annotations

from typing import Optional

from ...errors import ConfigError
from ..family import ActivationEstimate, Latent
from .config import DiTConfig

NEEDS_LATENT = ("n/a: a CogVideoX 1.5 config gives only the RoPE table's maximum; pass --latent T H W "
                "(e.g. 22 96 170 for 81 frames at 768x1360)")


def activation_estimate(cfg: DiTConfig, tp: int, itemsize: int, batch: int,
                        latent: Optional[Latent]) -> ActivationEstimate:
    """Rough peak activation memory of one DiT forward per TP rank (inference, flash/efficient
    SDPA, layer by layer): replicated [b,S,h] residual/LN/output tensors plus the widest sharded
    temporaries (MLP [b,S,4h/tp] in and out of GELU). No bytes, only a note saying what to pass,
    when the sample size is unknown (a 1.5 config without `latent`)."""
    a = cfg.arch
    if latent is None:
        if not a.v1:
            return ActivationEstimate(None, NEEDS_LATENT)
        latent = (a.grid[0], a.grid[1] * a.patch[1], a.grid[2] * a.patch[2])
    elif a.v1 and (latent[1] != a.grid[1] * a.patch[1] or latent[2] != a.grid[2] * a.patch[2]):
        raise ConfigError(f"--latent {list(latent)}: the CogVideoX 1.0 DiT runs only at its configured latent size "
                          f"{a.grid[1] * a.patch[1]}x{a.grid[2] * a.patch[2]}")
    t, h, w = (-(-n // p) for n, p in zip(latent, a.patch))  # SAT pads the frames to the time patch
    s = a.text_length + t * h * w
    per_token = (4 * a.hidden + 2 * a.ffn // tp + 3 * a.hidden // tp) * itemsize
    what = (f"estimated for batch {batch} x {s} tokens ({a.text_length} text + {t}x{h}x{w} patches of latent "
            f"{latent[0]}x{latent[1]}x{latent[2]}), flash/mem-efficient attention")
    return ActivationEstimate(batch * s * per_token, what)
