"""`sat-dist` / `python -m sat_dist`: load, inspect, plan, manifest, demo, env, convert, sample.

Every rank runs the same command. On success rank 0 prints the per-rank table; on failure every
rank exits 1 (130 when interrupted): rank 0 prints the agreed error in full, the others one line.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Optional, Sequence

from .convert_cli import add_convert_parser, cmd_convert
from .errors import CheckpointError, ConfigError, SatDistError


def _add_load_args(p: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    if checkpoint:
        p.add_argument("checkpoint", nargs="?", help="checkpoint folder (holds 'latest')")
    p.add_argument("--config", nargs="+", default=[], metavar="YAML", help="YAML files, merged in order (later wins)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default 1); must divide the world size")
    p.add_argument("--dtype", default=None, help="cast to fp32|fp16|bf16 (default: the stored dtype)")
    p.add_argument("--device", default=None, help="default cuda:LOCAL_RANK when CUDA is present, else cpu")
    p.add_argument("--tag", default=None, help="iteration folder to load instead of what 'latest' says")
    p.add_argument("--report", default=None, metavar="PATH", help="write the JSON load report here (rank 0)")
    p.add_argument("--timeout", type=float, default=None, dest="timeout_s",
                   help="seconds before a missing peer or rendezvous fails the load (default 300)")
    p.add_argument("--runtime-timeout", type=float, default=None, dest="runtime_timeout_s",
                   help="the groups' timeout once loaded, for forwards and sampling (default 7200)")
    p.add_argument("--exchange", choices=["auto", "on", "off"], default=None,
                   help="on: ranks that need the same bytes split the reads and broadcast them; off: every rank "
                        "reads all it needs; auto (default): on when the job spans several hosts or uses CUDA")
    p.add_argument("--digest", action="store_true", default=None,
                   help="put the SHA-256 state-dict digest in the report (default: only with --report)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(overrides=[])  # key=value words anywhere on the line, e.g. model.num_layers=4


def add_lora_args(p: argparse.ArgumentParser) -> None:
    """--lora / --lora-alpha / --lora-unmerged, shared by load and sample."""
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]",
                   help="a LoRA merged into each rank's shard: a PEFT/diffusers .safetensors or a SAT LoRA "
                        "checkpoint folder; repeat to sum several (strength default 1)")
    p.add_argument("--lora-alpha", type=float, default=None,
                   help="SAT LoRAs: LoraMixin's lora_alpha (scale lora_alpha / r), when no YAML lora_config says it")
    p.add_argument("--lora-unmerged", action="store_true",
                   help="keep the low-rank path in the forward instead of merging (many adapters, fast switching)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sat-dist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load", help="load a checkpoint on every rank and agree on it")
    _add_load_args(load)
    add_lora_args(load)
    load.add_argument("--verify", nargs="?", const=True, default=None, metavar="MANIFEST",
                      help="check every block this rank reads against the checkpoint's manifest (sat-dist manifest), "
                           "or against MANIFEST")
    load.add_argument("--weights", choices=["auto", "module", "fp32"], default=None,
                      help="DeepSpeed ZeRO-1/2: module weights (auto, default) or the fp32 master partitions; "
                           "ZeRO-3 always reads the fp32 partitions")
    insp = sub.add_parser("inspect", help="what a checkpoint holds, any format (no tensor data read)")
    insp.add_argument("checkpoint", help="checkpoint folder (holds 'latest') or a tag folder")
    insp.add_argument("--tag", default=None, help="tag folder to inspect instead of what 'latest' says")
    insp.add_argument("--json", action="store_true", help="print JSON instead of text")
    man = sub.add_parser("manifest", help="write SHA-256 per block of every checkpoint file (for load --verify)")
    man.add_argument("checkpoint", help="checkpoint folder (every file under it) or one file")
    man.add_argument("--out", default=None, help="manifest path (default: CHECKPOINT/sat-dist-manifest.json)")
    man.add_argument("--block-mib", type=int, default=4, help="block size in MiB (default 4)")
    demo = sub.add_parser("demo", help="load a tiny SAT checkpoint, then sample a tiny CogVideoX pipeline to an mp4")
    _add_load_args(demo, checkpoint=False)
    demo.add_argument("--out", default="demo.mp4", help="the demo video (default demo.mp4)")
    demo.add_argument("--no-video", action="store_true", help="only the load table")
    sub.add_parser("env", help="print what the launcher told this rank")
    plan = sub.add_parser("plan", help="per-rank bytes and device memory at each TP size, from configs and headers")
    plan.add_argument("path", nargs="?", default=None,
                      help="a checkpoint or release folder any reader recognises (its config; no tensor data read); "
                           "with --engine a CogVideoX pipeline folder")
    plan.add_argument("--config", nargs="+", default=[], metavar="YAML", help="YAML files, merged in order")
    plan.add_argument("--tp", nargs="+", type=int, default=[1, 2, 4, 8], help="TP sizes to plan (default 1 2 4 8)")
    plan.add_argument("--dtype", default=None, help="fp32|fp16|bf16 (default: the config's, else fp32)")
    plan.add_argument("--batch", type=int, default=2, help="batch for the activation estimate (2: CFG)")
    plan.add_argument("--latent", nargs=3, type=int, default=None, metavar=("T", "H", "W"),
                      help="CogVideoX sample size after the VAE (latent frames, height, width) for the activation "
                           "estimate; required for 1.5 (e.g. 22 96 170 for 81 frames at 768x1360)")
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plan.add_argument("--engine", action="store_true",
                      help="CogVideoX: the whole engine per rank (DiT and T5 at TP, the VAE replicated)")
    plan.add_argument("--gpus", type=int, default=None,
                      help="with --engine: every valid (tp, sp, cfg) layout for N GPUs, its memory and bytes sent per step")
    plan.add_argument("--gpu-memory", default=None, help="with --gpus: the memory of one GPU (e.g. 80GiB): which fit")
    plan.set_defaults(overrides=[])
    add_convert_parser(sub)
    from .engine.command import add_arguments as add_sample_arguments

    sample = sub.add_parser("sample", help="CogVideoX: load DiT + T5 + VAE across the group, sample, write mp4s")
    add_sample_arguments(sample)
    add_lora_args(sample)
    sample.set_defaults(overrides=[])
    from .bench import add_parser as add_bench_parser

    add_bench_parser(sub)
    from .bench.sample import add_parser as add_bench_sample_parser

    add_bench_sample_parser(sub)
    return parser


def cmd_plan(args: argparse.Namespace) -> int:
    from .capacity import capacity_plan, engine_plan

    if not args.path and not args.config:
        raise ConfigError("sat-dist plan needs a checkpoint or release folder (PATH) or --config YAML")
    if args.path and not os.path.exists(args.path):
        raise CheckpointError(f"sat-dist plan {args.path}: no such file or folder (a checkpoint, a diffusers or HF "
                              f"folder, a .safetensors file, or with --engine a CogVideoX pipeline folder)")
    if args.gpus is not None:
        from .capacity import engine_layouts, layouts_table, parse_bytes

        if not args.engine or args.gpus < 1:
            raise ConfigError("--gpus N (N >= 1) plans the CogVideoX engine's layouts: pass --engine too")
        memory = parse_bytes(args.gpu_memory) if args.gpu_memory else None
        rows = engine_layouts(args.config, args.gpus, args.dtype, args.overrides, memory,
                              tuple(args.latent) if args.latent else None, checkpoint=args.path)
        print(json.dumps(rows, indent=2) if args.json else layouts_table(rows, args.gpus, memory), flush=True)
        return 0
    result = (engine_plan if args.engine else capacity_plan)(args.config, args.tp, args.dtype, args.overrides, args.batch,
                                                               tuple(args.latent) if args.latent else None,
                                                               checkpoint=args.path)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table(), flush=True)
    return 0


OVERRIDE = re.compile(r"^(model|load)\.[^=\s]+=")


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Like parse_args, but `key=value` config overrides may appear anywhere on the line, also
    right after a many-valued option (`--config a.yaml model.num_layers=2`, `--tp 1 2 model.x=1`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    early = [w for w in argv if OVERRIDE.match(w) and not os.path.exists(w)]
    args, rest = parser.parse_known_args([w for w in argv if w not in early])
    overrides = [w for w in rest if "=" in w and not w.startswith("-")]
    unknown = [w for w in rest if w not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    cp = getattr(args, "checkpoint", None)
    if cp and "=" in cp and not os.path.exists(cp):  # argparse took an override for the path
        overrides.insert(0, cp)
        args.checkpoint = None
    args.overrides = early + overrides
    return args


def _print_result(report, rank: int) -> None:
    if rank != 0:
        return
    print(report.table())
    print(f"eval mode agreed on {len(report.ranks)}/{report.world_size} ranks "
          f"(tp={report.tp} x dp={report.dp}, {report.seconds:.2f}s)", flush=True)


def cmd_load(args: argparse.Namespace, checkpoint: Optional[str]) -> int:
    from . import loader

    model, report = loader.load_model(
        checkpoint, args.config, tp=args.tp, dtype=args.dtype, device=args.device, report=args.report,
        overrides=args.overrides, tag=args.tag, timeout_s=args.timeout_s, return_report=True,
        runtime_timeout_s=getattr(args, "runtime_timeout_s", None), weights=getattr(args, "weights", None),
        exchange=args.exchange, digest=args.digest,
        progress=False if args.quiet else None, verify=getattr(args, "verify", None),
        lora=args.lora, lora_merge=False if args.lora_unmerged else None, lora_alpha=args.lora_alpha,
    )
    import torch.distributed as dist

    _print_result(report, dist.get_rank() if dist.is_initialized() else 0)
    loader.shutdown()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The load table of a tiny SAT checkpoint, then (unless --no-video) a tiny CogVideoX pipeline
    sampled across the same ranks — DiT and T5 at --tp, the two CFG passes on two replicas when the
    world is 2 x tp — into an mp4 (rank 0 writes it and says where)."""
    from . import loader
    from .demo import ensure_demo_checkpoint, ensure_demo_pipeline
    from .launch import detect_launch

    launch = detect_launch()
    path = ensure_demo_checkpoint(writer=launch.local_rank == 0)
    pipeline = None if args.no_video else ensure_demo_pipeline(writer=launch.local_rank == 0)
    out = None
    if not args.no_video:  # checked before anything loads, as `sample` checks --out
        from .engine.check import check_outputs

        out = os.path.abspath(args.out)
        check_outputs([out], None)
    _, report = loader.load_model(path, args.config, tp=args.tp, dtype=args.dtype, device=args.device,
                                  report=args.report, overrides=args.overrides, timeout_s=args.timeout_s,
                                  return_report=True, exchange=args.exchange, digest=args.digest,
                                  progress=False if args.quiet else None)
    rank = launch.rank
    _print_result(report, rank)
    if pipeline is not None:
        from .demo_pipeline import PROMPT
        from .engine.engine import load_engine

        engine = load_engine(pipeline, tp=args.tp, dtype=args.dtype, device=args.device, timeout_s=args.timeout_s)
        frames, _ = engine.run(PROMPT, num_steps=4, seed=42, out=out if rank == 0 else None, decode=engine.group == 0)
        if rank == 0:
            how = f"TP {engine.rt.tp}" + (" x CFG parallel 2" if engine.pair_group is not None else "")
            print(f"[rank 0] sampled \"{PROMPT}\" on {engine.rt.world_size} ranks ({how}), 4 steps: wrote {out}: "
                  f"{frames.shape[0]} frames {frames.shape[1]}x{frames.shape[2]} (random weights: noise-like)",
                  flush=True)
        engine.finish()
    loader.shutdown()
    return 0


def cmd_env(_: argparse.Namespace) -> int:
    """One JSON line per rank: what the launcher told us and where the rendezvous will be.

    The first thing to run when a job hangs: every rank should print a distinct rank, the same
    world size and the same master address/port, and that address must be reachable.
    """
    import socket

    import torch

    from .launch import detect_launch
    from .runtime import pick_backend, pick_device

    info = detect_launch().to_dict()
    try:
        dev = pick_device(info["local_rank"], info["local_world_size"])
        info.update(device=str(dev), backend=pick_backend(dev))
        if dev.type == "cuda":
            info.update(gpu_uuid=str(torch.cuda.get_device_properties(dev).uuid), gpu=torch.cuda.get_device_name(dev))
    except ConfigError as exc:  # the reason a load would refuse this rank's device
        info.update(device=None, device_error=str(exc), backend="nccl")
    info.update(host=socket.gethostname(), cuda_available=torch.cuda.is_available(),
                cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    # One write per line: mpirun/srun merge the ranks' stdout, and a JSON line split into two
    # writes (print's text, then its newline, when Python is unbuffered) can interleave.
    sys.stdout.write(json.dumps(info, sort_keys=True) + "\n")
    sys.stdout.flush()
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    from .integrity import checkpoint_files, manifest_path, write_manifest

    if not os.path.exists(args.checkpoint):
        raise CheckpointError(f"checkpoint path {args.checkpoint} does not exist")
    if args.block_mib < 1:
        raise ConfigError(f"--block-mib must be >= 1, got {args.block_mib}")
    out = args.out or manifest_path(args.checkpoint)
    m = write_manifest(checkpoint_files(args.checkpoint), out, args.block_mib << 20)
    total = sum(e["bytes"] for e in m["files"].values())
    print(f"{out}: {len(m['files'])} files, {total:,} bytes, {sum(len(e['sha256']) for e in m['files'].values())} "
          f"blocks of {args.block_mib} MiB", flush=True)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import formats

    from .lora import files as lora_files

    if lora_files.is_peft_lora(args.checkpoint):
        info = lora_files.describe(args.checkpoint)
    else:
        info = formats.describe(args.checkpoint, args.tag)
        if info.get("format") == "sat":  # a LoraMixin fine-tune: say what its LoRA is
            info["summary"] += lora_files.describe_sat(args.checkpoint, args.tag)
    print(json.dumps(info, indent=2, default=str) if args.json else formats.render(info), flush=True)
    return 0


def _cmd_load(args: argparse.Namespace) -> int:
    return cmd_load(args, args.checkpoint)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import cmd_bench

    return cmd_bench(args)


def _cmd_bench_sample(args: argparse.Namespace) -> int:
    from .bench.sample import cmd_bench_sample

    return cmd_bench_sample(args)


def _cmd_sample(args: argparse.Namespace) -> int:
    from .engine.command import run

    if args.layout == "auto":
        _auto_layout(args)
    return run(args)


def _auto_layout(args: argparse.Namespace) -> None:
    """`sample --layout auto`: --tp/--sp/--no-cfg-parallel from `capacity.auto_layout`, before any load."""
    from .capacity import auto_layout
    from .engine.check import read_prompts
    from .launch import rank_and_world

    if args.tp is not None or args.sp != 1 or args.no_cfg_parallel:
        raise ConfigError("--layout auto chooses --tp, --sp and CFG parallel itself: drop them, or drop --layout")
    rank, world = rank_and_world()
    latent = ((args.frames - 1) // 4 + 1, args.height // 8, args.width // 8) \
        if args.frames and args.height and args.width else None
    best = auto_layout(args.model, args.config or [], world or 1, len(read_prompts(args.prompt, args.prompts)),
                       args.dtype, args.gpu_memory, latent)
    args.tp, args.sp, args.no_cfg_parallel = best["tp"], best["sp"], best["cfg"] == 1
    if rank == 0:
        print(f"--layout auto: {best['layout']} x DP {best['dp']} on {world or 1} ranks, "
              f"{best['bytes_per_step'] / (1 << 20):.1f} MiB sent per step per rank", flush=True)


# Subcommand -> handler; heavy modules (bench, engine) are imported only by their own command.
_COMMANDS = {"env": cmd_env, "plan": cmd_plan, "inspect": cmd_inspect, "demo": cmd_demo, "convert": cmd_convert,
             "bench": _cmd_bench, "bench-sample": _cmd_bench_sample, "sample": _cmd_sample, "manifest": cmd_manifest,
             "load": _cmd_load}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(build_parser(), argv)
    try:
        return _COMMANDS[args.command](args)
    except SatDistError as exc:
        _print_error(exc, _rank_for_messages())
        return _failed(1)
    except KeyboardInterrupt:
        print(f"[rank {_rank_for_messages()}] interrupted (SIGINT); exiting", file=sys.stderr, flush=True)
        return _failed(130)


def _failed(code: int) -> int:
    """Exit code of a failed command. Under MPI the process exits at once: MPI_Finalize (which
    mpi4py runs at exit) waits for every rank, and a stopped or dead peer would hold it for ever."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _print_error(exc: SatDistError, rank: str) -> None:
    """Rank 0 prints an agreed group error in full; the other ranks, which hold the same text, print
    one line pointing to it (one SLURM log, not N copies). Errors not agreed are printed in full."""
    text = str(exc)
    if getattr(exc, "agreed", False) and rank not in ("0", "?"):
        first = text.splitlines()[0] if text else type(exc).__name__
        text = f"{first} (the same error on every rank; rank 0 prints it in full)"
    sys.stderr.write(f"[rank {rank}] {text}\n")
    sys.stderr.flush()


def _rank_for_messages() -> str:
    """This process's rank as the launcher numbered it (srun/mpirun set no RANK), for error lines;
    from the launcher's variables alone, so a failed MPI exchange is not started again."""
    from .launch import rank_and_world

    rank = rank_and_world()[0]
    return "?" if rank < 0 else str(rank)
