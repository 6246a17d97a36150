"""Benchmark: load a full-width CogVideoX-5B-shaped SAT checkpoint (2 layers, bf16, shipped layout)
at TP=1 and TP=4 with sat_dist, and report per-rank load time, bytes read and peak RSS.

    .venv/bin/python bench/cogvideox_bench.py [--dir /tmp/cvx_bench] [--layers 2] [--tp 1 4] [--cold]

The checkpoint is written once (in a child process, so the parent's memory does not inflate the
forked ranks' RSS) as `transformer/latest` -> `1000/mp_rank_00_model_states.pt` with keys
`model.diffusion_model.*`, exactly the released folder layout. Ranks are forked gloo processes on
this CPU (no GPU: materialization target is host memory, so peak RSS includes the loaded shard).
`--cold` drops the page cache before each run (root only). Numbers are measurements, not tests.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
from sat_dist.testing.dist import run_ranks, values  # noqa: E402

CONFIG = os.path.join(HERE, "..", "configs", "cogvideox_5b.yaml")


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _write(root: str, layers: int) -> None:
    """Child process: build the 5B meta model, fill bf16 weights, save in the shipped layout."""
    from sat_dist.config import resolve
    from sat_dist.models import TPInfo, build_meta_model

    cfg = resolve(None, [CONFIG], [f"model.num_layers={layers}"])
    model = build_meta_model(cfg.model, TPInfo())
    g = torch.Generator().manual_seed(0)
    module = {"model.diffusion_model." + k: torch.randn(v.shape, generator=g, dtype=torch.bfloat16)
              for k, v in model.state_dict().items()}
    it = os.path.join(root, "1000")
    os.makedirs(it, exist_ok=True)
    torch.save({"module": module}, os.path.join(it, "mp_rank_00_model_states.pt"))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("1000")


def _load(rank: int, root: str, tp: int, layers: int) -> dict:
    import sat_dist

    base = rss_now()
    t0 = time.perf_counter()
    model, rep = sat_dist.load_model(root, CONFIG, tp=tp, overrides=[f"model.num_layers={layers}"],
                                     return_report=True)
    wall = time.perf_counter() - t0
    r = rep.ranks[rank]
    return {"rank": rank, "seconds": wall, "bytes_read": r.bytes_read, "bytes_needed": r.bytes_needed,
            "peak_rss": r.peak_rss_bytes, "rss_before": base,
            "params": sum(t.numel() for t in model.state_dict().values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/cvx_bench")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each run (root)")
    args = ap.parse_args()
    root = os.path.join(args.dir, f"cogvideox5b_{args.layers}l", "transformer")
    path = os.path.join(root, "1000", "mp_rank_00_model_states.pt")
    if not os.path.exists(path):
        t0 = time.perf_counter()
        p = mp.get_context("fork").Process(target=_write, args=(root, args.layers))
        p.start()
        p.join()
        if p.exitcode:
            sys.exit(f"writing {path} failed (exit {p.exitcode})")
        print(f"wrote {path} in {time.perf_counter() - t0:.1f}s")
    # Import what a load imports once in the parent: forked ranks then time the load, not 4
    # processes importing the same modules on 2 cores.
    import sat_dist  # noqa: F401
    import sat_dist.launch  # noqa: F401

    size = os.path.getsize(path)
    mib = 1 << 20
    print(f"checkpoint {path}: {size / mib:.0f} MiB (bf16, {args.layers} layers of CogVideoX-5B width); "
          f"{os.cpu_count()} CPUs, forked gloo ranks, materialized on CPU; "
          f"{'cold' if args.cold else 'warm'} page cache")
    print(f"{'TP':>3} {'rank':>4} {'load s':>7} {'read MiB':>9} {'read/file':>9} {'peak RSS MiB':>12} "
          f"{'RSS before':>10} {'growth MiB':>10}")
    for tp in args.tp:
        if args.cold:
            drop_caches()
        for r in values(run_ranks(tp, _load, root, tp, args.layers, timeout=600)):
            print(f"{tp:>3} {r['rank']:>4} {r['seconds']:>7.2f} {r['bytes_read'] / mib:>9.1f} "
                  f"{r['bytes_read'] / size:>9.3f} {r['peak_rss'] / mib:>12.0f} {r['rss_before'] / mib:>10.0f} "
                  f"{(r['peak_rss'] - r['rss_before']) / mib:>10.0f}")


if __name__ == "__main__":
    main()
