"""`load_engine`: CogVideoX's whole video engine — SAT's DiT and the T5 encoder tensor-parallel, the
VAE on every rank — loaded through the loader's one path (meta skeleton -> plan -> each rank reads
only its bytes -> materialize -> one group agreement for all components), and `Engine.sample`, the
pipeline's sampling on top of it (THUDM/CogVideo sat/sample_video.py does the same with
`model_parallel_size = 1`: get_model -> load_checkpoint -> conditioner -> sampler -> VAE decode -> mp4).

Ranks form work groups: a TP group, or with CFG parallel a pair of TP groups (two DP replicas,
`Runtime.cfg_group`, made by `collectives.setup`) that run the unconditional and conditional passes at once. Every rank
of a group runs the same sampler on the same numbers; the whole group decodes, each rank a share of
the VAE's tiles (engine/decode.py), and the group's leader (TP rank 0 of its first replica) blends
them and gets the frames. `sample` runs one prompt on every group (rank 0 returns the
frames); `sample_many` deals prompts out to the groups.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .. import collectives as C
from .. import commcount
from ..errors import ConfigError
from ..launch import detect_launch
from ..config import parse_lora_arg
from ..loader import keep_runtime, load_components
from ..lora import switch as lora_switch
from ..pause import pause_point
from . import check, sat_sampler, video
from .decode import WorkGroup
from .layout import Components, components_for
from .report import EngineReport, RunRecord, max_reserved_bytes, peak_device_bytes
from .sampler import Conditioning, Guidance, RowShard, denoise, initial_noise, make_scheduler
from .text import encode_prompt, load_tokenizer

V15_DEFAULT = check.V15_DEFAULT  # CogVideoX1.5's frames, height, width (CogVideo inference/cli_demo.py)


class Engine:
    def __init__(self, rt, parts: Components, models: dict, report: EngineReport, pair_group, tokenizer):
        self.rt, self.parts, self.report, self.tokenizer = rt, parts, report, tokenizer
        self.dit, self.text_encoder, self.vae = models["transformer"], models["text_encoder"], models["vae"]
        self.pair_group = pair_group
        # the DiT's replicas (tp x sp ranks each; at sp = 1 the DP replicas); with CFG parallel, pairs of them
        replicas, replica = rt.mesh.replicas, rt.mesh.replica(rt.rank)
        self.groups = replicas // 2 if pair_group is not None else replicas
        self.group = replica // 2 if pair_group is not None else replica
        self.pair_index = replica % 2 if pair_group is not None else 0
        self.sp_group = rt.sp_group  # sequence parallel: this rank's SP group (None at sp = 1)
        self.leader = rt.tp_rank == 0 and rt.sp_rank == 0 and self.pair_index == 0
        self.comm: list[dict] = []  # this rank's bytes sent per run, by phase and kind (RunRecord.comm_bytes)

    # -- sizes -------------------------------------------------------------------------------------

    @property
    def spatial(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def temporal(self) -> int:
        return int(self.vae.config.temporal_compression_ratio)

    def default_size(self) -> tuple[int, int, int]:
        """(frames, height, width): the SAT YAML's args.sampling_num_frames / sampling_image_size when
        set; else the 1.0 DiT's configured size, or CogVideoX1.5's recommended one (engine/check.py)."""
        return check.default_size(self.parts)

    # -- sampling ----------------------------------------------------------------------------------

    def sample(self, prompt: str, **kwargs) -> Optional[np.ndarray]:
        """One video for `prompt`, computed by every work group; rank 0 gets [F, H, W, 3] frames in
        [0, 1] (None elsewhere). Every rank must call it with the same arguments. Keyword arguments:
        those of `run`."""
        frames, _ = self.run(prompt, **kwargs)
        return frames if self.rt.rank == 0 else None

    def sample_many(self, prompts: Sequence[str], out: Callable[[int], Optional[str]] = lambda i: None,
                    **kwargs) -> list[tuple[int, np.ndarray]]:
        """Prompt i goes to work group i % groups; each group's leader decodes its videos (and writes
        them to `out(i)` when that gives a path). Returns the leader's [(i, frames)]."""
        done = []
        for i, prompt in enumerate(prompts):
            if i % self.groups == self.group:
                frames, _ = self.run(prompt, out=out(i), **kwargs)
                if self.leader:
                    done.append((i, frames))
        return done

    def run(self, prompt: str, *, negative_prompt: str = "", num_steps: int = 50, seed: int = 42,
            guidance_scale: Optional[float] = None, use_dynamic_cfg: Optional[bool] = None,
            num_frames: Optional[int] = None, height: Optional[int] = None, width: Optional[int] = None,
            image: Any = None, on_step: Optional[Callable] = None, decode: bool = True, out: Optional[str] = None,
            progress: bool = False) -> tuple[Optional[np.ndarray], torch.Tensor]:
        """This work group's sample: returns (frames on the group leader when `decode`, else None; the
        final latents on every rank). `decode` must be the same on every rank of the work group: its
        ranks decode together. diffusers layout: as diffusers' CogVideoX(ImageToVideo)Pipeline
        computes it (guidance 6; `use_dynamic_cfg` None: on with the DPM scheduler, as CogVideo's
        inference/cli_demo.py runs the 5B models). SAT layout: CogVideo's own sampler as the YAML
        configures it (engine/sat_sampler.py; guidance and dynamic CFG from the guider unless given).
        `on_step(i, t, latents)` sees every step's latents (with sequence parallel, this rank's latent
        rows: `RowShard`, dim 3; the returned latents are whole). Every argument is checked before any
        work (engine/check.py: sizes against the model, steps, image, the output folder)."""
        spec = check.sample_run(self.parts, image=image, num_frames=num_frames, height=height, width=width,
                                num_steps=num_steps, guidance_scale=guidance_scale, use_dynamic_cfg=use_dynamic_cfg)
        if out and decode and self.leader:
            check.check_writable(os.path.dirname(os.path.abspath(out)), f"out={out!r}")
        num_frames, height, width = spec.frames, spec.height, spec.width
        shard = self._row_shard(height // self.spatial)  # sequence parallel: this rank's latent rows (else None)
        guidance_scale, dynamic = spec.guidance, spec.dynamic_cfg
        sat, sched = self.parts.layout == "sat", self.parts.scheduler
        if sat:  # CogVideo's guider as resolved (the YAML's unless given)
            sched = {**sched, "scale": guidance_scale, "guider": "DynamicCFG" if dynamic else "VanillaCFG"}
        else:
            sched = make_scheduler(sched)
        rec = RunRecord(prompt, seed, num_steps, num_frames, height, width, guidance_scale, dynamic,
                        self.pair_group is not None, self.rt.rank, out=out)
        dev, cfg_on = self.rt.device, guidance_scale > 1.0
        t = time.perf_counter()
        sent = commcount.snapshot()
        length = self.parts.max_text_length or self.dit.arch.text_length
        pos = encode_prompt(self.tokenizer, self.text_encoder, prompt, length, dev)
        neg = None
        if cfg_on:  # CogVideo's SAT sampler: all-zero unconditional embeddings (force_uc_zero_embeddings)
            neg = torch.zeros_like(pos) if sat else encode_prompt(self.tokenizer, self.text_encoder,
                                                                  negative_prompt, length, dev)
        rec.seconds_encode = round(time.perf_counter() - t, 4)
        encode_bytes, sent = commcount.since(sent), commcount.snapshot()
        _say(progress and self.leader, f"encoded the prompt{' and the unconditional text' if cfg_on else ''} in "
                                       f"{rec.seconds_encode:.2f}s")

        dtype, gen = (torch.float32 if sat else pos.dtype), torch.Generator().manual_seed(seed)
        patch_t = None if self.dit.arch.v1 else self.dit.arch.patch[0]
        latent_frames = (num_frames - 1) // self.temporal + 1
        extra = 0  # CogVideoX1.5: latent frames padded up to the time patch, dropped before decoding
        if patch_t is not None and latent_frames % patch_t:
            extra = patch_t - latent_frames % patch_t
            latent_frames += extra
        shape = [1, latent_frames, self.dit.arch.in_channels, height // self.spatial, width // self.spatial]
        cond = Conditioning(pos, neg)
        if self.parts.i2v:
            shape[2] //= 2
            scale = 1.0 if sat else None  # SAT: encode_first_stage * scale_factor / scale_factor
            cond.image_latents = video.image_latents(self.vae, image, height, width, latent_frames, patch_t, gen,
                                                     dev, dtype, scale)
            if patch_t is not None:
                shape[1] += shape[1] % patch_t
            if self.dit.arch.ofs_dim is not None:
                cond.ofs = torch.full((1,), 2.0, device=dev, dtype=dtype)
        latents = initial_noise(tuple(shape), gen, dev, dtype, None if sat else sched)
        if shard is not None:  # sequence parallel: this rank's latent rows from here to the gather
            latents = shard.take(latents)
            if cond.image_latents is not None:
                cond.image_latents = shard.take(cond.image_latents)

        bar = _bar(num_steps, progress and self.leader)
        last = [time.perf_counter()]

        def step(i, ts, lat):
            now = time.perf_counter()
            rec.seconds_per_step.append(round(now - last[0], 4))
            last[0] = now
            bar.update()
            if on_step is not None:
                on_step(i, ts, lat)

        guidance = Guidance(self.dit, cond, self.pair_group, self.pair_index, shard)
        if sat:
            latents = sat_sampler.denoise(guidance, latents, num_steps, sched, gen, cfg_on, step, shard)
        else:
            latents = denoise(guidance, sched, latents, num_steps, guidance_scale, dynamic, gen, step, shard)
        bar.close()
        step_bytes, sent = commcount.since(sent), commcount.snapshot()
        if shard is not None:  # the SP group's rows joined, once, on every rank of it
            latents = shard.gather(latents)
        frames = None
        if decode:  # the whole work group decodes (its tiles dealt out); the leader blends and gets the frames
            if self.leader:
                pause_point("decode", self.rt.rank)
            t = time.perf_counter()
            frames = video.decode(self.vae, latents[:, extra:], WorkGroup.of(self.rt, self.pair_group, self.pair_index))
        rec.comm_bytes = {"rank": self.rt.rank, "encode": encode_bytes,
                          "per_step": {k: v // max(num_steps, 1) for k, v in step_bytes.items()},
                          "steps_total": step_bytes, "decode": commcount.since(sent)}
        self.comm.append(rec.comm_bytes)
        if frames is not None:
            frames = frames[0]
            rec.seconds_decode = round(time.perf_counter() - t, 4)
            _say(progress, f"decoded {frames.shape[0]} frames {frames.shape[1]}x{frames.shape[2]} in "
                           f"{rec.seconds_decode:.1f}s")
            if out:
                video.write_mp4(frames, out, self.parts.fps)
        if self.leader:
            self.report.runs.append(rec)
        return frames, latents

    def _row_shard(self, height: int) -> Optional[RowShard]:
        """Sequence parallel: this rank's latent rows of a latent `height` rows high (the DiT's split);
        None at sp = 1. Every SP rank needs a whole token row."""
        sp = self.rt.mesh.sp
        if sp == 1:
            return None
        rows = height // self.dit.arch.patch[1]
        if rows < sp:
            raise ConfigError(f"--sp {sp} splits the latent's {rows} token rows (latent height {height} / patch "
                              f"{self.dit.arch.patch[1]}); use --sp {rows} or less, or a taller video")
        return RowShard(tuple(self.dit.latent_rows(height)), self.rt.sp_rank, height, self.sp_group)

    # -- adapters ------------------------------------------------------------------------------------

    def set_loras(self, loras: Sequence = ()):
        """Switch the DiT's LoRA adapters (PATH[:STRENGTH] or (path, strength); [] for none) on every rank
        (collective: each calls it alike, between videos). Each rank re-reads only its rows of the base
        tensors the old or new adapters touch, and the adapters' rank parts; the base is not reloaded and
        the weights equal a fresh load's bit for bit (lora/switch.py). Returns this rank's SwitchStats."""
        return lora_switch.switch(self.dit, loras)

    # -- the end -------------------------------------------------------------------------------------

    def finish(self, report: Optional[str] = None) -> EngineReport:
        """Collective: gather every rank's peak memory, bytes sent per run (`comm_bytes`: RunRecord's,
        each rank's own) and every leader's run records into rank 0's report (written to `report` there)."""
        mine = {"rank": self.rt.rank, "device": str(self.rt.device), "comm_bytes": self.comm,
                "peak_device_bytes": peak_device_bytes(self.rt.device),
                "max_memory_reserved": max_reserved_bytes(self.rt.device), "runs": self.report.runs}
        gathered = C.all_gather_objects(mine, self.rt.ctrl_group)
        self.report.ranks = [{k: v for k, v in g.items() if k != "runs"} for g in gathered]
        self.report.runs = [r for g in gathered for r in g["runs"]]
        if report and self.rt.rank == 0:
            self.report.write(report)
        return self.report


def with_loras(parts: Components, lora: Sequence, merge: bool, alpha: Optional[float]) -> None:
    """The DiT's LoadConfig with the adapters (checked to exist, strengths parsed) before anything loads."""
    dit = parts.models["transformer"]
    parts.models["transformer"] = dataclasses.replace(
        dit, lora=[parse_lora_arg(x) for x in lora], lora_merge=bool(merge),
        lora_alpha=dit.lora_alpha if alpha is None else float(alpha))


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _say(show: bool, line: str) -> None:
    if show:
        from tqdm import tqdm

        tqdm.write(line)


def _bar(total: int, show: bool):
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="denoise", unit="step")


def load_engine(path_or_config: str | Sequence[str] | Components, tp: Optional[int] = None, *, sp: Optional[int] = None,
                dtype: Optional[str] = None, device: Optional[str] = None, report: Optional[str] = None,
                timeout_s: Optional[float] = None, runtime_timeout_s: Optional[float] = None, cfg_parallel: bool = True,
                vae_tiling: Optional[dict] = None, staging_mib: Optional[int] = None, lora: Sequence = (),
                lora_merge: bool = True, lora_alpha: Optional[float] = None) -> Engine:
    """Load every component of a CogVideoX release on every rank of the job (see module docstring).

    `path_or_config`: a diffusers pipeline folder, or CogVideo SAT YAML file(s) (or their resolved Components,
    whose LoadConfigs then already carry tp, dtype, device and the timeouts). `sp`: sequence
    parallel (Ulysses) size: each replica is tp x sp ranks, the video tokens split over the sp ranks
    inside each TP rank's heads (must divide num_attention_heads / tp; default 1). `cfg_parallel`: with
    an even number of replicas, pair them for CFG (world = 2 x tp x sp: one pair). `vae_tiling`:
    `AutoencoderKLCogVideoX.enable_tiling` arguments (default: diffusers' tile sizes). `lora`: adapters for
    the DiT, each `PATH[:STRENGTH]` or (path, strength), merged into each rank's shard (`lora_merge=False`:
    the low-rank path in the forward); a SAT YAML with `lora_config` loads its LoraMixin fine-tune merged.
    `lora_alpha`: SAT LoRAs' lora_alpha when no YAML says it. `Engine.set_loras` switches them later."""
    t0 = time.perf_counter()
    common = {"tp": tp, "dtype": dtype, "device": device, "timeout_s": timeout_s, "staging_mib": staging_mib,
              "runtime_timeout_s": runtime_timeout_s}
    # `sample` passes the Components its argument checks resolved (read once, not twice)
    parts = path_or_config if isinstance(path_or_config, Components) else components_for(path_or_config, common)
    with_loras(parts, lora, lora_merge, lora_alpha)
    sp = 1 if sp is None else int(sp)
    first = parts.models["transformer"]
    launch = detect_launch(timeout_s=first.timeout_s)
    check.check_sp(parts, sp, launch.world_size, cfg_parallel)  # before anything is loaded, on every rank alike
    tokenizer = load_tokenizer(parts.tokenizer)  # before the group forms: a bad folder fails every rank alike
    rt = C.setup(launch, first.tp, first.device, first.timeout_s, cfg_parallel=cfg_parallel,
                 runtime_timeout_s=first.runtime_timeout_s, sp=sp)
    try:
        loaded = load_components(rt, list(parts.models.values()), t0, names=list(parts.models))
        models = {name: model for name, (model, _) in zip(parts.models, loaded)}
        if sp > 1:  # the SP group made by setup with the other groups, inside the load's bound
            models["transformer"].set_sequence_parallel(sp, rt.sp_rank, rt.sp_group)
        tiled = video.enable_bounded_decode(models["vae"], vae_tiling)
        pair = rt.cfg_group  # made by setup with the other groups, inside the load's bound
        C.enter_runtime(rt)  # sampling is bounded by --runtime-timeout, not the load's --timeout
    except BaseException:
        C.teardown(rt)
        raise
    keep_runtime(rt)
    rep = EngineReport(parts.layout, parts.root, rt.world_size, rt.tp, rt.mesh.dp, pair is not None,
                       round(time.perf_counter() - t0, 4), {n: r for n, (_, r) in zip(parts.models, loaded)},
                       vae_tiling=tiled, sp=rt.mesh.sp)
    engine = Engine(rt, parts, models, rep, pair, tokenizer)
    if report and rt.rank == 0:
        rep.write(report)
    return engine
