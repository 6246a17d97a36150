"""CogVideo's own SAT sampler, for the SAT release layout: `VPSDEDPMPP2MSampler` with
`ZeroSNRDDPMDiscretization`, `DiscreteDenoiser` + `VideoScaling` and `DynamicCFG` / `VanillaCFG`
(THUDM/CogVideo sat/sgm/modules/diffusionmodules/sampling.py, discretizer.py, denoiser.py,
denoiser_scaling.py, guiders.py; sat/diffusion_video.py `sample`; sat/sample_video.py).

The update is DPM-Solver++(2M) in SDE form, as diffusers' CogVideoXDPMScheduler, but CogVideo's
sampler differs from diffusers' pipelines in four ways, and here CogVideo is followed:

1. Timesteps: `np.linspace(999, 0, n, endpoint=False).astype(int)` (truncated), where diffusers'
   "trailing" spacing is `round(1000 - k * 1000 / n) - 1`: equal for n = 50, not for every n (n = 3:
   999, 666, 333 vs 999, 666, 332).
2. Zero terminal SNR: the sqrt(alpha_cumprod) rescale is applied to the n *selected* steps (the
   endpoints are the first and last selected timestep), diffusers rescales all 1000 first, so the
   alphas of the selected steps differ (slightly: the smallest selected timestep keeps its alpha).
3. Guidance is applied to the denoised x0 (c_skip x + c_out v of each half), not to v (the same up
   to rounding), and `DynamicCFG` divides by the guider's own `num_steps` (config), not the run's.
4. The unconditional pass gets all-zero text embeddings (`force_uc_zero_embeddings=["txt"]`), not
   the T5 embedding of an empty prompt; the 2B config samples with DPM++ too (diffusers' 2B: DDIM).

The last step returns the denoised x0 directly (`idx == 1`). Noise comes from the engine's seeded CPU
generator (SAT draws from the global torch RNG), two draws per step after the first, as SAT does.
With sequence parallel (`shard`) the state is this rank's latent rows; each draw is the whole latent's
noise, of which the rank keeps its rows, so the numbers are those of sp = 1.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .sampler import Guidance, RowShard, StepCallback


def schedule(cfg: dict, steps: int) -> tuple[torch.Tensor, list[int]]:
    """(sqrt(alpha_cumprod) per step, largest timestep first, with 1 appended; the timesteps):
    ZeroSNRDDPMDiscretization.get_sigmas + VideoDDIMSampler.prepare_sampling_loop."""
    n, shift = cfg["num_timesteps"], cfg["shift_scale"]
    betas = torch.linspace(cfg["linear_start"] ** 0.5, cfg["linear_end"] ** 0.5, n, dtype=torch.float64) ** 2
    ac = np.cumprod(1.0 - betas.numpy(), axis=0)
    ac = ac / (shift + (1 - shift) * ac)
    ts = np.linspace(n - 1, 0, steps, endpoint=False).astype(int)[::-1] if steps < n else np.arange(n)
    a = torch.tensor(ac[ts], dtype=torch.float32).sqrt()
    a0, at = a[0].clone(), a[-1].clone()
    a -= at
    a *= a0 / (a0 - at)
    a = torch.cat([torch.flip(a, (0,)), a.new_ones([1])])
    return a, [int(t) for t in ts[::-1]]


def guidance_scale(cfg: dict, steps: int, t: int) -> float:
    if cfg["guider"] != "DynamicCFG":
        return cfg["scale"]
    return 1 + cfg["scale"] * (1 - math.cos(math.pi * ((steps - t) / cfg["guider_steps"]) ** cfg["exp"])) / 2


def denoise(guidance: Guidance, latents: torch.Tensor, steps: int, cfg: dict, generator: torch.Generator,
            guided: bool = True, on_step: Optional[StepCallback] = None,
            shard: Optional[RowShard] = None) -> torch.Tensor:
    """VPSDEDPMPP2MSampler.__call__ from `latents` (pure noise, float32; with `shard`, this rank's rows,
    as are the result and what `on_step` sees)."""
    alphas, ts = schedule(cfg, steps)
    alphas = alphas.to(latents.device)
    x, old = latents.float(), None
    shape = x.shape if shard is None else (*x.shape[:3], shard.height, *x.shape[4:])

    def noise() -> torch.Tensor:
        z = torch.randn(shape, generator=generator, dtype=x.dtype)
        return (z if shard is None else shard.take(z)).to(x.device)

    with torch.no_grad():
        for i in range(steps):
            a, a_next = alphas[i], alphas[i + 1]
            t = torch.tensor(ts[i], device=x.device)
            c_out = -((1 - a**2) ** 0.5)
            if guided:
                v_u, v_c = guidance.pair(x, t)
                d_u, d_c = v_u * c_out + x * a, v_c * c_out + x * a
                denoised = d_u + guidance_scale(cfg, steps, ts[i]) * (d_c - d_u)
            else:
                denoised = guidance(x, t, 1.0) * c_out + x * a
            if i == steps - 1:
                x = denoised
            else:
                lamb = ((a**2 / (1 - a**2)) ** 0.5).log()
                h = ((a_next**2 / (1 - a_next**2)) ** 0.5).log() - lamb
                m1 = ((1 - a_next**2) / (1 - a**2)) ** 0.5 * (-h).exp()
                m2 = (-2 * h).expm1() * a_next
                m_noise = (1 - a_next**2) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5
                x_standard = m1 * x - m2 * denoised + m_noise * noise()
                if old is None:
                    x_new = x_standard
                else:
                    a_prev = alphas[i - 1]
                    r = (lamb - ((a_prev**2 / (1 - a_prev**2)) ** 0.5).log()) / h
                    d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
                    x_new = m1 * x - m2 * d + m_noise * noise()
                x, old = x_new, denoised
            if on_step is not None:
                on_step(i, t, x)
    return x
