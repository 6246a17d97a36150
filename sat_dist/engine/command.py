"""`sat-dist sample`: load the whole CogVideoX engine across the group, sample, write mp4s.

    torchrun --nproc_per_node=4 -m sat_dist sample --model CogVideoX-5b/ --tp 4 --prompt "..." --out panda.mp4
    torchrun --nproc_per_node=8 -m sat_dist sample --model CogVideoX-5b/ --tp 4 --prompts prompts.txt --out-dir videos/
    torchrun --nproc_per_node=4 -m sat_dist sample --config configs/cogvideox_5b_i2v.yaml --tp 4 --image first.png --prompt "..."

Every rank runs the same command. Rank 0 prints the load table and progress (tqdm); each work group's
leader writes its videos at the release's fps; `--report` gets the JSON run report (rank 0).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Optional

from ..errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="FOLDER", help="a diffusers CogVideoX pipeline folder (model_index.json, ...)")
    src.add_argument("--config", nargs="+", metavar="YAML", help="CogVideo's SAT YAML(s) (the SAT release layout)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one prompt")
    what.add_argument("--prompts", metavar="FILE", help="a text file, one prompt per line (blank lines skipped)")
    p.add_argument("--out", default="output.mp4", help="the mp4 for --prompt (default output.mp4)")
    p.add_argument("--out-dir", default="videos", help="folder for --prompts' mp4s, NNN_<words>.mp4 (default videos)")
    p.add_argument("--image", default=None, help="I2V: the first frame (png/jpg)")
    p.add_argument("--negative-prompt", default="", help="the unconditional prompt (default empty)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size of the DiT and T5 (default 1)")
    p.add_argument("--dtype", default=None, help="fp32|fp16|bf16 for every component (default: as stored)")
    p.add_argument("--device", default=None, help="default cuda:LOCAL_RANK when CUDA is present, else cpu")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--guidance", type=float, default=6.0, help="classifier-free guidance scale (default 6)")
    p.add_argument("--dynamic-cfg", choices=["auto", "on", "off"], default="auto",
                   help="the pipelines' dynamic guidance schedule (auto: on with the DPM scheduler)")
    p.add_argument("--frames", type=int, default=None, help="frames (default: the model's, 49 / 81)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--no-cfg-parallel", action="store_true",
                   help="with 2 x tp ranks or more, do not pair DP replicas for the two CFG passes")
    p.add_argument("--report", default=None, metavar="PATH", help="write the JSON run report here (rank 0)")
    p.add_argument("--timeout", type=float, default=None, dest="timeout_s",
                   help="seconds before a missing peer fails the load (default 300)")
    p.add_argument("--runtime-timeout", type=float, default=None, dest="runtime_timeout_s",
                   help="the groups' timeout once loaded: bounds every wait of sampling, e.g. a work group idle "
                        "while another renders (default 7200)")


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    try:
        with open(args.prompts) as f:
            lines = [line.strip() for line in f]
    except OSError as exc:
        raise ConfigError(f"--prompts {args.prompts}: {exc}") from exc
    prompts = [line for line in lines if line]
    if not prompts:
        raise ConfigError(f"--prompts {args.prompts} holds no prompt")
    return prompts


def _name(i: int, prompt: str) -> str:
    words = "_".join(re.findall(r"[A-Za-z0-9]+", prompt)[:6]).lower() or "video"
    return f"{i:03d}_{words}.mp4"


def run(args: argparse.Namespace) -> int:
    from .. import loader
    from .engine import load_engine

    prompts = _prompts(args)
    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    engine = load_engine(args.model or args.config, tp=args.tp, dtype=args.dtype, device=args.device,
                         timeout_s=args.timeout_s, runtime_timeout_s=args.runtime_timeout_s,
                         cfg_parallel=not args.no_cfg_parallel)
    rank = engine.rt.rank
    if rank == 0:
        print(engine.report.table(), flush=True)
    single = args.prompt is not None

    def out(i: int) -> Optional[str]:
        return args.out if single else os.path.join(args.out_dir, _name(i, prompts[i]))

    dynamic = {"auto": None, "on": True, "off": False}[args.dynamic_cfg]
    kwargs = dict(negative_prompt=args.negative_prompt, num_steps=args.steps, seed=args.seed,
                  guidance_scale=args.guidance, use_dynamic_cfg=dynamic, num_frames=args.frames, height=args.height,
                  width=args.width, image=args.image, progress=True)
    if single:  # every group computes it; rank 0 (a leader) writes it
        frames, _ = engine.run(prompts[0], out=args.out if rank == 0 else None, decode=rank == 0, **kwargs)
        done = [(0, frames)] if rank == 0 else []
    else:
        done = engine.sample_many(prompts, out=out, **kwargs)
    for i, frames in done:
        sys.stdout.write(f"[rank {rank}] wrote {out(i)}: {frames.shape[0]} frames {frames.shape[1]}x"
                         f"{frames.shape[2]} at {engine.parts.fps} fps\n")
    sys.stdout.flush()
    engine.finish(args.report)
    loader.shutdown()
    return 0
