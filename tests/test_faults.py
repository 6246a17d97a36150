"""Bounded exits under real launchers: randomized kill/stall/interrupt trials (tests/fault_lib.py).

Each trial holds one rank at a load phase (rendezvous, tag, index, plan, read, agree), then SIGKILLs
or SIGSTOPs it, or sends SIGINT to the launcher; every surviving rank must exit non-zero within
--timeout + 5 s, and survivors of a stopped rank must name it. CI runs 9 trials, a third each under
torchrun, mpirun and srun (the single-node SLURM cluster of tests/cluster/slurm.sh), seeded by SAT_DIST_FAULT_SEED (printed when random); `make soak`
runs 50.
"""
from __future__ import annotations

import os
import random

import pytest

from fault_lib import BOUND_S, LAUNCHERS, random_trial, run_trial
from launch_helpers import demo_checkpoint

TRIALS = int(os.environ.get("SAT_DIST_FAULT_TRIALS", "6"))  # two per launcher; `make soak` runs 50
TIMEOUT_S = 8.0


def _seed() -> int:
    seed = os.environ.get("SAT_DIST_FAULT_SEED")
    return int(seed) if seed else random.randrange(1 << 30)


SEED = _seed()


@pytest.mark.parametrize("i", range(TRIALS))
def test_fault_trial(i: int) -> None:
    rng = random.Random(SEED * 1000 + i)
    trial = random_trial(rng, LAUNCHERS[i % len(LAUNCHERS)], TIMEOUT_S)
    out = run_trial(trial, demo_checkpoint())
    print(f"trial {i} (SAT_DIST_FAULT_SEED={SEED}): {trial}: exits {out.exit_s}, worst {out.worst_s:.2f}s")
    assert out.ok, (f"SAT_DIST_FAULT_SEED={SEED} trial {i}: {trial}: {out.problems}; exits {out.exit_s} "
                    f"(bound {TIMEOUT_S + BOUND_S:g}s)\n{out.stderr[-5000:]}")
