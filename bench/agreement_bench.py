"""Benchmark: the group agreement's own costs, beside the code they replaced, in the same run.

    .venv/bin/python bench/agreement_bench.py [--world 4] [--iters 200] [--norms 400]

1. One agreement all-gather: `collectives.all_gather_objects` (one all-gather of a fixed frame)
   against `dist.all_gather_object` (two: sizes, then pickles), on `--world` forked gloo ranks, an
   object the size of a plan status; wall and CPU ms per call, per rank.
2. Fingerprints of `--norms` fp32 norms of 3072 (a model's replicated norms and biases): the batched
   one-block path against the per-tensor definition, one thread; the values are checked equal.
Measurements, not tests.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

import sat_dist.collectives as C
import sat_dist.report as R
from sat_dist.launch import detect_launch
from sat_dist.testing.dist import run_ranks, values


def _gathers(rank: int, iters: int) -> dict:
    rt = C.setup(detect_launch(timeout_s=60), 1, None, 60)
    obj = {"rank": rank, "dtypes": ("float32", {}), "names": [f"layers.{i}.weight" for i in range(200)]}

    def legacy() -> list:
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    res = {}
    try:
        for name, fn in (("all_gather_objects (one all-gather)", lambda: C.all_gather_objects(obj, rt.ctrl_group)),
                         ("dist.all_gather_object (two)", legacy)):
            for _ in range(5):
                fn()
            dist.barrier()
            c, w = time.process_time(), time.perf_counter()
            for _ in range(iters):
                fn()
            res[name] = ((time.perf_counter() - w) / iters * 1e3, (time.process_time() - c) / iters * 1e3)
    finally:
        C.teardown(rt)
    return res


def _fingerprints(norms: int) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    sd = {f"layers.{i}.norm.weight": torch.randn(3072, generator=g) for i in range(norms)}
    subsets = {"replicated": list(sd)}
    timings, outs = {}, {}
    for name, one_block in (("batched", R._one_block), ("per tensor", lambda t: False)):
        real, R._one_block = R._one_block, one_block
        try:
            outs[name] = R.fingerprints(sd, subsets)
            t = time.perf_counter()
            for _ in range(10):
                R.fingerprints(sd, subsets)
            timings[name] = (time.perf_counter() - t) / 10 * 1e3
        finally:
            R._one_block = real
    assert outs["batched"] == outs["per tensor"], "the batched fingerprints differ from the definition"
    print(f"fingerprints of {norms} norms: batched {timings['batched']:.2f} ms, per tensor "
          f"{timings['per tensor']:.2f} ms ({timings['per tensor'] / timings['batched']:.1f}x); values equal")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--norms", type=int, default=400)
    args = ap.parse_args()
    for rank, res in enumerate(values(run_ranks(args.world, _gathers, args.iters, timeout=600))):
        print(f"rank {rank}: " + "; ".join(f"{k} {w:.2f} ms wall, {c:.2f} ms CPU" for k, (w, c) in res.items()))
    _fingerprints(args.norms)


if __name__ == "__main__":
    main()
