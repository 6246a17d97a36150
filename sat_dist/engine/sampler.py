"""The denoising loop of diffusers' CogVideoX pipelines, driving sat_dist's TP DiT.

Followed line by line from huggingface/diffusers src/diffusers/pipelines/cogvideo/pipeline_cogvideox.py
and pipeline_cogvideox_image2video.py (`__call__`, `prepare_latents`): the scheduler is diffusers' own
`CogVideoXDDIMScheduler` / `CogVideoXDPMScheduler` built from the release's `scheduler_config.json`
(v-prediction, zero-terminal-SNR rescale, `snr_shift_scale`, trailing spacing: whatever it says), so
its timesteps, DPM-Solver++(2M) update and per-step noise are diffusers' exactly. Random numbers come
from one CPU `torch.Generator` in the pipeline's order (I2V image latents, then the initial noise, then
the scheduler's per-step noise), so every rank draws the same numbers and a seed gives the pipeline's
video. The DiT takes SAT's arguments (`x` [B, T, C, H, W], `timesteps`, `context`, `concat_images`,
`ofs`) and computes its own RoPE/position tables, equal to those the pipeline passes diffusers' model
(`_prepare_rotary_positional_embeddings`; tests/test_cogvideox_forward.py).

Classifier-free guidance: the unconditional and conditional passes run as one batch of 2 (as the
pipeline does), or, with a CFG pair (`Runtime.cfg_group`: two DP replicas), each replica runs
one half and one all-gather per step exchanges them (`collectives.all_gather_pair`).

Sequence parallel (`RowShard`: an SP group, `Runtime.sp_group`): each rank of the group holds its
latent rows (dim 3 of [B, T, C, H, W], the DiT's split: CogVideoXDiT.latent_rows) through the whole
loop, the DiT's Ulysses all-to-alls being the only exchange per step. The random numbers stay the
pipeline's: every rank draws the whole initial noise (and image latents) from the same generator and
keeps its rows, and each scheduler step — elementwise, but drawing its noise with the sample's shape —
runs on whole-latent buffers holding this rank's rows (zeros elsewhere, never read back), so the
generator advances and the noise falls exactly as at sp = 1. `RowShard.gather` joins the rows once,
after the last step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .. import collectives as C

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step index, timestep, latents)


def make_scheduler(config: dict):
    """A fresh diffusers CogVideoX scheduler from `scheduler_config.json` (it keeps per-run state)."""
    import diffusers

    return getattr(diffusers, config["_class_name"]).from_config(config)


def dynamic_guidance(scale: float, steps: int, t: int) -> float:
    """The pipelines' `use_dynamic_cfg` schedule: 1 + w (1 - cos(pi ((N - t) / N)^5)) / 2 for timestep t."""
    return 1 + scale * ((1 - math.cos(math.pi * ((steps - t) / steps) ** 5.0)) / 2)


@dataclass(frozen=True)
class RowShard:
    """This rank's latent rows `rows[index]` ([start, stop) of a latent `height` rows high, dim 3) in
    its SP group `group` (`rows`: every SP rank's, in group order)."""

    rows: tuple[tuple[int, int], ...]
    index: int
    height: int
    group: object = None

    @property
    def sizes(self) -> list[int]:
        return [stop - start for start, stop in self.rows]

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole-latent tensor [B, T, C, H, W]."""
        start, stop = self.rows[self.index]
        return x[:, :, :, start:stop].contiguous()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows `x` in a whole-latent buffer (zeros in the other ranks' rows)."""
        start, stop = self.rows[self.index]
        out = x.new_zeros((*x.shape[:3], self.height, *x.shape[4:]))
        out[:, :, :, start:stop] = x
        return out

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every SP rank's rows joined (one all-gather over the SP group), on every rank of it."""
        return C.all_gather_rows(x, self.sizes, 3, self.group)


@dataclass
class Conditioning:
    """What every DiT call of one sample gets besides the latents and the timestep."""

    prompt: torch.Tensor  # [1, L, d] T5 embeddings of the prompt
    negative: Optional[torch.Tensor]  # the negative prompt's; None without guidance
    image_latents: Optional[torch.Tensor] = None  # I2V: [1, T, C, H, W], concatenated on channels
    ofs: Optional[torch.Tensor] = None  # 1.5 I2V: the pipelines' ofs (2.0)


class Guidance:
    """The DiT's guided noise prediction (float32), sequential (batch 2) or across a CFG pair."""

    def __init__(self, dit: nn.Module, cond: Conditioning, pair_group=None, pair_index: int = 0,
                 shard: Optional[RowShard] = None):
        self.dit, self.cond, self.group, self.index, self.shard = dit, cond, pair_group, pair_index, shard

    def _dit(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        img = self.cond.image_latents
        if img is not None and img.shape[0] != x.shape[0]:
            img = torch.cat([img] * x.shape[0])
        extra = {} if self.shard is None else {"height": self.shard.height}  # x: this rank's rows
        return self.dit(x, t.expand(x.shape[0]), context, concat_images=img, ofs=self.cond.ofs, **extra)

    def pair(self, latents: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(unconditional, conditional) DiT outputs in float32."""
        c = self.cond
        if self.group is not None:  # CFG parallel: this replica's half, then one exchange
            mine = self._dit(latents, t, (c.negative, c.prompt)[self.index])
            uncond, text = C.all_gather_pair(mine, self.group).float().unbind(0)
            return uncond, text
        uncond, text = self._dit(torch.cat([latents] * 2), t, torch.cat([c.negative, c.prompt])).float().chunk(2)
        return uncond, text

    def __call__(self, latents: torch.Tensor, t: torch.Tensor, scale: float) -> torch.Tensor:
        if self.cond.negative is None:
            return self._dit(latents, t, self.cond.prompt).float()
        uncond, text = self.pair(latents, t)
        return uncond + scale * (text - uncond)


def denoise(guidance: Guidance, scheduler, latents: torch.Tensor, steps: int, guidance_scale: float,
            use_dynamic_cfg: bool, generator: torch.Generator, on_step: Optional[StepCallback] = None,
            shard: Optional[RowShard] = None) -> torch.Tensor:
    """The pipelines' loop: `steps` scheduler steps from `latents` (already scaled by init_noise_sigma).
    `shard`: `latents` are this rank's rows (sequence parallel), and so are the result and what
    `on_step` sees; each step runs on whole-latent buffers (see the module docstring)."""
    whole = (lambda z: z) if shard is None else shard.embed
    mine = (lambda z: z) if shard is None else shard.take
    dtype = latents.dtype
    scheduler.set_timesteps(steps, device=latents.device)
    timesteps = scheduler.timesteps
    dpm = type(scheduler).__name__ == "CogVideoXDPMScheduler"
    old_pred = None
    scale = guidance_scale
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            x = scheduler.scale_model_input(latents, t)
            if use_dynamic_cfg:
                scale = dynamic_guidance(guidance_scale, steps, t.item())
            noise_pred = guidance(x, t, scale)
            if dpm:
                latents, old_pred = scheduler.step(whole(noise_pred), None if old_pred is None else whole(old_pred), t,
                                                   timesteps[i - 1] if i > 0 else None, whole(latents), eta=0.0,
                                                   generator=generator, return_dict=False)
                old_pred = mine(old_pred)
            else:
                latents = scheduler.step(whole(noise_pred), t, whole(latents), eta=0.0, generator=generator,
                                         return_dict=False)[0]
            latents = mine(latents).to(dtype)
            if on_step is not None:
                on_step(i, t, latents)
    return latents


def initial_noise(shape: tuple[int, ...], generator: torch.Generator, device, dtype, scheduler=None) -> torch.Tensor:
    """diffusers' `randn_tensor` (CPU generator: drawn on the CPU, then moved) times the scheduler's
    init_noise_sigma (none: CogVideo's SAT sampler starts from plain N(0, 1) noise)."""
    from diffusers.utils.torch_utils import randn_tensor

    noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    return noise if scheduler is None else noise * scheduler.init_noise_sigma
