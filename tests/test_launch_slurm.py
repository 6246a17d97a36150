"""SLURM, for real: `srun -n 4` and `sbatch launch/slurm.sbatch` on the single-node cluster of
tests/cluster/slurm.sh (munge + slurmctld + slurmd). Each task finds its rank and rank 0's node
from SLURM's variables alone; the loads must reproduce the torchrun load rank by rank."""
from __future__ import annotations

import os

import pytest

from launch_helpers import (REPO, VENV_BIN, check_env_lines, clean_env, demo_checkpoint, report_digests, require,
                            run, sbatch_wait, scratch, slurm_cluster, torchrun_reference)

SBATCH_SCRIPT = os.path.join(REPO, "launch", "slurm.sbatch")
# This cluster has no GPUs: override the script's one-task-per-GPU defaults, as its header shows.
CPU_JOB = ["--nodes=1", "--ntasks-per-node=4", "--gpus-per-node=0"]


def slurm_env() -> dict[str, str]:
    return clean_env(slurm_cluster() | {"PYTHON": os.path.join(VENV_BIN, "python")})


def test_srun_env() -> None:
    env = slurm_env()
    srun = require("srun", hint="tests/cluster/slurm.sh up installs slurm-client")
    out = run([srun, "-n", "4", os.path.join(VENV_BIN, "sat-dist"), "env"], env, timeout=120).stdout
    rows = check_env_lines(out, "slurm", world=4, local_world=4)
    assert rows[0]["master_addr"] == run(["hostname", "-s"], env).stdout.strip(), rows[0]


@pytest.mark.parametrize("tp", [2, 4])
def test_srun_load_matches_torchrun(tp: int) -> None:
    expected = torchrun_reference(tp)
    env = slurm_env()
    srun = require("srun", hint="tests/cluster/slurm.sh up installs slurm-client")
    report = os.path.join(scratch(), f"srun-tp{tp}.json")
    run([srun, "-n", "4", "--kill-on-bad-exit=1", os.path.join(VENV_BIN, "sat-dist"), "load", demo_checkpoint(),
         "--tp", str(tp), "--report", report], env, timeout=180)
    assert report_digests(report) == list(expected)


def test_sbatch_env() -> None:
    _, text = sbatch_wait([*CPU_JOB, SBATCH_SCRIPT, "env"], slurm_env())
    check_env_lines(text, "slurm", world=4, local_world=4)


@pytest.mark.parametrize("tp", [2, 4])
def test_sbatch_load_matches_torchrun(tp: int) -> None:
    expected = torchrun_reference(tp)
    report = os.path.join(scratch(), f"sbatch-tp{tp}.json")
    job, text = sbatch_wait([*CPU_JOB, SBATCH_SCRIPT, demo_checkpoint(), "--tp", str(tp), "--report", report],
                            slurm_env())
    assert f"eval mode agreed on 4/4 ranks (tp={tp} x dp={4 // tp}" in text, text
    assert report_digests(report) == list(expected)


def test_torchrun_started_by_srun_wins_over_slurm() -> None:
    """The common recipe `srun -N<n> torchrun ...` (one agent per node): the workers carry the agent
    step's SLURM_PROCID=0/SLURM_NTASKS=1 too, and must take torchrun's numbering (world 2 here)."""
    env = slurm_env()
    srun = require("srun", hint="tests/cluster/slurm.sh up installs slurm-client")
    out = run([srun, "-n", "1", "-c", "2", os.path.join(VENV_BIN, "torchrun"), "--standalone", "--nproc_per_node=2",
               "-m", "sat_dist", "env"], env, timeout=120).stdout
    check_env_lines(out, "torchrun", world=2, local_world=2)
