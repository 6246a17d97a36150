"""Benchmark: the cost of `load --verify` (SHA-256 of the blocks under each rank's reads) on a
>= 1 GiB load, and of writing the manifest.

    .venv/bin/python bench/verify_bench.py [--dir /tmp/sat_dist_bench] [--tp 1] [--repeat 3] [--cold]

Uses load_bench.py's mp=1 fp32 SAT checkpoint (~1.2 GiB, written once), writes its manifest
(`sat-dist manifest`, timed), then loads it alternately without and with --verify on `--tp` forked
ranks and prints the median wall time of each and the overhead. Measurements, not tests.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import load_bench  # noqa: E402
from make_checkpoint import add_model_args, ensure_sat_checkpoint  # noqa: E402
import sat_dist  # noqa: E402
from sat_dist.integrity import MANIFEST_NAME, checkpoint_files, write_manifest  # noqa: E402
from sat_dist.testing.dist import run_ranks, values  # noqa: E402


def _load(rank: int, path: str, tp: int, verify: bool) -> float:
    t = time.perf_counter()
    sat_dist.load_model(path, tp=tp, verify=verify)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each load (root)")
    args = ap.parse_args()
    _, path = ensure_sat_checkpoint(args)
    files = checkpoint_files(path)
    size = sum(os.path.getsize(f) for f in files)
    t = time.perf_counter()
    write_manifest(files, os.path.join(path, MANIFEST_NAME))
    manifest_s = time.perf_counter() - t
    print(f"checkpoint {path}: {size / 2**30:.2f} GiB; manifest written in {manifest_s:.2f}s "
          f"({size / manifest_s / 2**30:.2f} GiB/s); TP={args.tp}, {os.cpu_count()} cores, "
          f"cache={'cold' if args.cold else 'warm'}")
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeat):
        for verify in (False, True):
            if args.cold:
                load_bench.drop_caches()
            times[verify].append(max(values(run_ranks(args.tp, _load, path, args.tp, verify, timeout=1800))))
    plain, checked = statistics.median(times[False]), statistics.median(times[True])
    print(f"load (slowest rank, median of {args.repeat}): plain {plain:.2f}s {times[False]}, "
          f"--verify {checked:.2f}s {times[True]}")
    print(f"--verify overhead: +{checked - plain:.2f}s (+{100 * (checked - plain) / plain:.0f}%), "
          f"hashing ~{size / args.tp / max(checked - plain, 1e-9) / 2**30:.2f} GiB/s per rank")


if __name__ == "__main__":
    main()
