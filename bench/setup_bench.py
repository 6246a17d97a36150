"""What joining a job costs: `collectives.setup` (the process group, the gloo control group, the setup
agreement on mesh and GPUs, the TP/DP device groups) and its teardown, on forked gloo ranks.

    .venv/bin/python bench/setup_bench.py [--world 4] [--tp 2] [--trials 3]

Prints the slowest rank's seconds per trial (a fresh group each time: a new rendezvous per trial).
"""
from __future__ import annotations

import argparse
import time

from sat_dist.testing.dist import run_ranks, values


def _setup(rank: int, tp: int) -> float:
    import sat_dist.collectives as C
    from sat_dist.launch import detect_launch

    t = time.perf_counter()
    rt = C.setup(detect_launch(timeout_s=30), tp, None, 30)
    seconds = time.perf_counter() - t
    C.teardown(rt)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args()
    for i in range(args.trials):
        got = values(run_ranks(args.world, _setup, args.tp))
        print(f"trial {i + 1}: setup {max(got):.3f} s (slowest of {args.world} ranks, TP {args.tp})", flush=True)


if __name__ == "__main__":
    main()
