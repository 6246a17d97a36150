"""`sat-dist` / `python -m sat_dist`: load, demo, env.

Every rank runs the same command. On success rank 0 prints the per-rank table; on failure every
rank prints the same agreed error to stderr and exits 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from .errors import SatDistError


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
    p.set_defaults(overrides=[])  # key=value words anywhere on the line, e.g. model.num_layers=4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sat-dist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_load_args(sub.add_parser("load", help="load a checkpoint on every rank and agree on it"))
    demo = sub.add_parser("demo", help="write a tiny SAT checkpoint (once) and load it")
    _add_load_args(demo, checkpoint=False)
    sub.add_parser("env", help="print what the launcher told this rank")
    return parser


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Like parse_args, but `key=value` config overrides may appear anywhere on the line."""
    args, rest = parser.parse_known_args(argv)
    overrides = [w for w in rest if "=" in w and not w.startswith("-")]
    unknown = [w for w in rest if w not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    cp = getattr(args, "checkpoint", None)
    if cp and "=" in cp and not os.path.exists(cp):  # argparse took an override for the path
        overrides.insert(0, cp)
        args.checkpoint = None
    args.overrides = list(getattr(args, "overrides", [])) + overrides
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
    )
    import torch.distributed as dist

    _print_result(report, dist.get_rank() if dist.is_initialized() else 0)
    loader.shutdown()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import ensure_demo_checkpoint
    from .runtime import detect_launch

    launch = detect_launch()
    path = ensure_demo_checkpoint(writer=launch.local_rank == 0)
    return cmd_load(args, path)


def cmd_env(_: argparse.Namespace) -> int:
    import torch

    from .runtime import detect_launch, pick_backend, pick_device

    info = detect_launch().to_dict()
    dev = pick_device(info["local_rank"])
    info.update(device=str(dev), backend=pick_backend(dev), cuda_available=torch.cuda.is_available())
    print(json.dumps(info, sort_keys=True), flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(build_parser(), argv)
    try:
        if args.command == "env":
            return cmd_env(args)
        if args.command == "demo":
            return cmd_demo(args)
        return cmd_load(args, args.checkpoint)
    except SatDistError as exc:
        rank = os.environ.get("RANK", "0")
        print(f"[rank {rank}] {exc}", file=sys.stderr, flush=True)
        return 1
