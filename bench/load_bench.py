"""Benchmark: sat_dist TP=4 load vs a SAT-style whole-file load on every rank, side by side.

    .venv/bin/python bench/load_bench.py [--dir /tmp/sat_bench] [--hidden 2048 --layers 5] [--cold]

Writes (once) an mp=1 fp32 SAT checkpoint (default ~1.2 GiB), then runs, in the same process
tree and with the same 4 forked ranks:
  baseline  each rank torch.load(file, map_location='cpu') (what SAT's load_checkpoint does),
            then keeps its TP shard (SAT cannot even change the MP size; this is the best case)
  sat_dist  sat_dist.load_model(path, tp=4)
and prints per-rank bytes read / file size, peak-RSS growth and wall time, with ratios.
`--cold` drops the page cache before each run (root only). Numbers are measurements, not tests.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_checkpoint import add_model_args, ensure_sat_checkpoint  # noqa: E402
from sat_dist.testing.dist import run_ranks, values  # noqa: E402

import sat_dist  # noqa: E402
from sat_dist.models.sat_gpt import TransformerConfig  # noqa: E402
from sat_dist.models import TPInfo, build_meta_model, collect_specs  # noqa: E402


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def io_read_bytes() -> int:
    """Bytes this process caused to be fetched from storage (cold cache) — from /proc/self/io."""
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["rchar"])


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _baseline(rank: int, path: str, tp: int) -> dict:
    from sat_dist.writer import shard_state_dict

    specs = collect_specs(build_meta_model(MODEL, TPInfo(tp, rank)))
    base, r0, t0 = rss_now(), io_read_bytes(), time.perf_counter()
    sd = torch.load(os.path.join(path, "1", "mp_rank_00_model_states.pt"), map_location="cpu")["module"]
    shard = shard_state_dict(sd, specs, tp, rank)
    del sd
    return {"seconds": time.perf_counter() - t0, "rss_growth": peak_rss() - base, "read": io_read_bytes() - r0,
            "shard": sum(t.numel() * t.element_size() for t in shard.values())}


def _sat_dist(rank: int, path: str, tp: int) -> dict:
    base, r0, t0 = rss_now(), io_read_bytes(), time.perf_counter()
    _, rep = sat_dist.load_model(path, tp=tp, return_report=True)
    mine = rep.ranks[rank]
    return {"seconds": time.perf_counter() - t0, "rss_growth": peak_rss() - base, "read": mine.bytes_read,
            "proc_read": io_read_bytes() - r0, "shard": mine.bytes_needed}


MODEL: TransformerConfig


def main() -> None:
    global MODEL
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each run (root)")
    args = ap.parse_args()
    MODEL, path = ensure_sat_checkpoint(args)
    ckpt_file = os.path.join(path, "1", "mp_rank_00_model_states.pt")
    size = os.path.getsize(ckpt_file)
    print(f"checkpoint: {ckpt_file} {size / 2**30:.2f} GiB, TP={args.tp}, {os.cpu_count()} cores, "
          f"cache={'cold' if args.cold else 'warm'}")
    results = {}
    for name, fn in (("baseline", _baseline), ("sat_dist", _sat_dist)):
        if args.cold:
            drop_caches()
        t = time.perf_counter()
        results[name] = values(run_ranks(args.tp, fn, path, args.tp, timeout=1800))
        results[name + "_wall"] = time.perf_counter() - t
    mib = 2**20
    print(f"\n{'rank':>4} | {'baseline read/file':>18} {'RSS growth MiB':>14} {'sec':>6} | "
          f"{'sat_dist read/file':>18} {'RSS growth MiB':>14} {'sec':>6} | {'shard MiB':>9} {'growth-shard MiB':>16}")
    for r in range(args.tp):
        b, s = results["baseline"][r], results["sat_dist"][r]
        print(f"{r:>4} | {b['read'] / size:>18.3f} {b['rss_growth'] / mib:>14.0f} {b['seconds']:>6.2f} | "
              f"{s['read'] / size:>18.3f} {s['rss_growth'] / mib:>14.0f} {s['seconds']:>6.2f} | "
              f"{s['shard'] / mib:>9.0f} {(s['rss_growth'] - s['shard']) / mib:>16.0f}")
    bw, sw = results["baseline_wall"], results["sat_dist_wall"]
    brss = max(x["rss_growth"] for x in results["baseline"])
    srss = max(x["rss_growth"] for x in results["sat_dist"])
    print(f"\nwall time: baseline {bw:.2f}s, sat_dist {sw:.2f}s  (ratio sat_dist/baseline {sw / bw:.2f})")
    print(f"max per-rank RSS growth: baseline {brss / mib:.0f} MiB, sat_dist {srss / mib:.0f} MiB "
          f"(ratio {srss / brss:.2f})")
    print(f"bytes read, all ranks: baseline {sum(x['read'] for x in results['baseline']) / size:.2f}x file, "
          f"sat_dist {sum(x['read'] for x in results['sat_dist']) / size:.2f}x file")


if __name__ == "__main__":
    main()
