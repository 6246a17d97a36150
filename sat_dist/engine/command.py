"""`sat-dist sample`: load the whole CogVideoX engine across the group, sample, write mp4s.

    torchrun --nproc_per_node=4 -m sat_dist sample --model CogVideoX-5b/ --tp 4 --prompt "..." --out panda.mp4
    torchrun --nproc_per_node=8 -m sat_dist sample --model CogVideoX-5b/ --tp 4 --prompts prompts.txt --out-dir videos/
    torchrun --nproc_per_node=4 -m sat_dist sample --config configs/cogvideox_5b_i2v.yaml --tp 4 --image first.png --prompt "..."
    torchrun --nproc_per_node=4 -m sat_dist sample --model CogVideoX-5b/ --tp 4 --lora style.safetensors:0.8 --prompt "..."

Every rank runs the same command. Every argument is checked against the model before anything is loaded
(engine/check.py); `--dry-run` stops there and prints the resolved run. Rank 0 prints the load table and
progress (tqdm); each work group's leader writes its videos at the release's fps; `--report` gets the JSON
run report (rank 0).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from . import adapters, check
from .check import SampleRun
from .layout import check_pipeline_folder, components_for


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
    p.add_argument("--sp", type=int, default=1,
                   help="sequence-parallel (Ulysses) size: the DiT's video tokens split over SP ranks inside each "
                        "TP rank's heads; must divide heads / tp, each replica is tp x sp ranks (default 1)")
    p.add_argument("--dtype", default=None, help="fp32|fp16|bf16 for every component (default: as stored)")
    p.add_argument("--device", default=None, help="default cuda:LOCAL_RANK when CUDA is present, else cpu")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--guidance", type=float, default=6.0, help="classifier-free guidance scale (default 6)")
    p.add_argument("--dynamic-cfg", choices=["auto", "on", "off"], default="auto",
                   help="the pipelines' dynamic guidance schedule (auto: on with the DPM scheduler)")
    p.add_argument("--frames", type=int, default=None,
                   help="frames, 8N + 1 (default: the model's, 49 / 81)")
    p.add_argument("--height", type=int, default=None,
                   help="1.0 models: only their configured size (480x720); 1.5: a multiple of 16 (default 768)")
    p.add_argument("--width", type=int, default=None, help="as --height (1.5 default 1360)")
    p.add_argument("--layout", choices=["auto"], default=None,
                   help="auto: pick --tp/--sp/CFG parallel for this world from `sat-dist plan --engine --gpus`: "
                        "the layout that fits --gpu-memory with the fewest bytes sent per step (see README)")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE", help="with --layout auto: memory per GPU, e.g. 24GiB")
    p.add_argument("--no-cfg-parallel", action="store_true",
                   help="with 2 x tp ranks or more, do not pair DP replicas for the two CFG passes")
    p.add_argument("--report", default=None, metavar="PATH", help="write the JSON run report here (rank 0)")
    p.add_argument("--dry-run", action="store_true",
                   help="check every argument against the model, print the resolved run (components, sizes, "
                        "per-rank weights, outputs) and load nothing")
    p.add_argument("--timeout", type=float, default=None, dest="timeout_s",
                   help="seconds before a missing peer fails the load (default 300)")
    p.add_argument("--runtime-timeout", type=float, default=None, dest="runtime_timeout_s",
                   help="the groups' timeout once loaded: bounds every wait of sampling, e.g. a work group idle "
                        "while another renders (default 7200)")


def resolve(args: argparse.Namespace) -> SampleRun:
    """Every argument checked against the model, in seconds, before any component is loaded (at real
    size a load takes minutes): the prompts file, the --model folder, each component's config, the
    sizes, steps and image (engine/check.py), the TP split, and the output folder(s) writable."""
    prompts, loras = adapters.per_prompt(check.read_prompts(args.prompt, args.prompts), args.lora)
    if args.model is not None:
        check_pipeline_folder(args.model)
    common = {"tp": args.tp, "dtype": args.dtype, "device": args.device, "timeout_s": args.timeout_s,
              "runtime_timeout_s": args.runtime_timeout_s}
    parts = components_for(args.model or args.config, common)
    dynamic = {"auto": None, "on": True, "off": False}[args.dynamic_cfg]
    spec = check.sample_run(parts, image=args.image, num_frames=args.frames, height=args.height, width=args.width,
                            num_steps=args.steps, guidance_scale=args.guidance, use_dynamic_cfg=dynamic, cli=True)
    check.check_tp(parts)
    adapters.check_adapters(parts, loras, args.lora_alpha)  # a LoRA for another model: refused before any load
    from ..launch import rank_and_world

    world = rank_and_world()[1]  # under a launcher: whole tp x sp replicas (one process, e.g. a dry run: not yet)
    check.check_sp(parts, args.sp, world if world and world > 1 else None, not args.no_cfg_parallel)
    single = args.prompt is not None
    spec.prompts, spec.sp, spec.loras = prompts, args.sp, loras
    spec.outputs = [args.out] if single else [os.path.join(args.out_dir, check.video_name(i, p))
                                              for i, p in enumerate(prompts)]
    check.check_outputs(spec.outputs, None if single else args.out_dir, create=not args.dry_run)
    return spec


def dry_run(args: argparse.Namespace, run: SampleRun) -> int:
    """`--dry-run`: print the resolved run (rank 0 under a launcher) and load nothing."""
    from ..launch import rank_and_world
    from .capacity import rank_weights

    if rank_and_world()[0] <= 0:
        weights = {name: rank_weights(cfg) for name, cfg in run.components.models.items()}
        print(run.summary(weights, args.dtype, args.device), flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    from .. import loader
    from .engine import load_engine

    spec = resolve(args)
    if args.dry_run:
        return dry_run(args, spec)
    groups = adapters.batches(spec.loras)  # prompts of equal adapters run together; set_loras between groups
    engine = load_engine(spec.components, tp=args.tp, sp=args.sp, dtype=args.dtype, device=args.device,
                         timeout_s=args.timeout_s, runtime_timeout_s=args.runtime_timeout_s,
                         cfg_parallel=not args.no_cfg_parallel, lora=groups[0][0], lora_merge=not args.lora_unmerged,
                         lora_alpha=args.lora_alpha)
    rank = engine.rt.rank
    if rank == 0:
        print(engine.report.table(), flush=True)
    single, prompts = args.prompt is not None, spec.prompts

    def out(i: int) -> Optional[str]:
        return spec.outputs[i]  # checked writable by `resolve`

    dynamic = {"auto": None, "on": True, "off": False}[args.dynamic_cfg]
    kwargs = dict(negative_prompt=args.negative_prompt, num_steps=args.steps, seed=args.seed,
                  guidance_scale=args.guidance, use_dynamic_cfg=dynamic, num_frames=args.frames, height=args.height,
                  width=args.width, image=args.image, progress=True)
    if single:  # every group computes it; rank 0's group decodes it (together), rank 0 (its leader) writes it
        frames, _ = engine.run(prompts[0], out=args.out if rank == 0 else None, decode=engine.group == 0, **kwargs)
        done = [(0, frames)] if rank == 0 else []
    else:
        done = []
        for n, (loras, indices) in enumerate(groups):
            if n:
                stats = engine.set_loras(loras)
                if rank == 0:
                    print(f"[rank 0] LoRA switched to {adapters.short(loras)}: "
                          f"read {stats.bytes_read:,} B ({stats.bytes_base:,} B of base rows) in {stats.seconds:.2f} s",
                          flush=True)
            got = engine.sample_many([prompts[i] for i in indices], out=lambda j: out(indices[j]), **kwargs)
            done += [(indices[j], frames) for j, frames in got]
    for i, frames in done:  # write_mp4 raised if a file was not written whole: each line is a real file
        sys.stdout.write(f"[rank {rank}] wrote {out(i)}: {frames.shape[0]} frames {frames.shape[1]}x"
                         f"{frames.shape[2]} at {engine.parts.fps} fps\n")
    sys.stdout.flush()
    engine.finish(args.report)
    loader.shutdown()
    return 0
