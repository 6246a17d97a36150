"""Launcher pieces that need no running launcher: the detectors on environments captured from
real srun/sbatch/mpirun runs on this machine, the hostlist parser against real `scontrol`, the
launch scripts' headers and syntax, and the Docker image's pins against setup.py."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from launch_helpers import REPO, clean_env, run, setup_install_requires, slurm_cluster
from sat_dist import launch as launchers
from sat_dist.errors import LaunchError
from sat_dist.launch import (LaunchInfo, MpiRendezvous, detect_launch, first_host_of_nodelist, from_mpich,
                             from_openmpi, from_slurm, tasks_on_node)

# Captured from `srun -n 4` (task 2) on the single-node cluster of tests/cluster/slurm.sh.
SRUN_TASK = {
    "SLURM_CLUSTER_NAME": "satdist", "SLURM_JOB_ID": "1", "SLURM_JOBID": "1", "SLURM_JOB_NODELIST": "vm",
    "SLURM_JOB_NUM_NODES": "1", "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1", "SLURM_LOCALID": "2",
    "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_NODELIST": "vm", "SLURM_NPROCS": "4", "SLURM_NTASKS": "4",
    "SLURM_PROCID": "2", "SLURM_STEPID": "0", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "vm",
    "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "4",
    "SLURM_TASKS_PER_NODE": "4",
}
# The batch script itself (no srun): SLURM_PROCID=0 and SLURM_NTASKS=2, but no step.
SBATCH_SCRIPT = {k: v for k, v in SRUN_TASK.items() if "STEP" not in k} | {"SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
# `mpirun -np 2` (Open MPI 5, PyPI wheel), rank 1.
OMPI_RANK1 = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
              "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_NODE_RANK": "1", "PMIX_RANK": "1"}
# `mpirun -np 2` (MPICH 5 Hydra, PyPI wheel), rank 1.
MPICH_RANK1 = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
               "PMI_HOSTNAME": "vm", "PMI_FD": "11"}


def no_exchange(launcher: str, rank: int, world: int) -> MpiRendezvous:
    raise AssertionError("mpi4py exchange must not run when MASTER_ADDR/MASTER_PORT are given")


def test_srun_task_is_detected_with_first_node_and_job_port() -> None:
    info = from_slurm(SRUN_TASK)
    assert info == LaunchInfo("slurm", 2, 2, 4, 4, 0, "vm", launchers.slurm_port(SRUN_TASK))
    assert info.master_port == 10000 + 1 * 20 + 0


def test_batch_script_and_salloc_shell_are_not_slurm_tasks() -> None:
    """Otherwise `python -m sat_dist load` in a batch script would wait for 3 peers forever."""
    assert from_slurm(SBATCH_SCRIPT) is None
    assert detect_launch(SBATCH_SCRIPT).launcher == "single"


def test_torchrun_wins_over_slurm_and_mpi() -> None:
    """torchrun started inside an allocation (or by srun, one agent per node) numbers the workers."""
    env = SRUN_TASK | OMPI_RANK1 | {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                                    "GROUP_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29400",
                                    "TORCHELASTIC_RUN_ID": "x"}
    assert launchers.DETECTORS[0] is launchers.from_torchrun
    assert detect_launch(env) == LaunchInfo("torchrun", 5, 1, 8, 4, 1, "n1", 29400)


def test_explicit_master_wins_everywhere() -> None:
    master = {"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "4242"}
    assert (from_slurm(SRUN_TASK | master).master_addr, from_slurm(SRUN_TASK | master).master_port) == ("10.1.2.3", 4242)
    info = from_openmpi(OMPI_RANK1 | master, exchange=no_exchange)
    assert info == LaunchInfo("openmpi", 1, 1, 2, 2, 0, "10.1.2.3", 4242)
    info = from_mpich(MPICH_RANK1 | master, exchange=no_exchange)
    assert info == LaunchInfo("mpich", 1, 1, 2, 2, 0, "10.1.2.3", 4242)


def test_mpi_detectors_take_master_and_node_from_the_exchange() -> None:
    rdv = MpiRendezvous("10.0.0.1", 51000, ("a", "a", "b", "b"))
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_NODE_RANK": "1"}
    assert from_openmpi(env, exchange=lambda *a: rdv) == LaunchInfo("openmpi", 3, 1, 4, 2, 1, "10.0.0.1", 51000)
    # Hydra without MPI_LOCALRANKID (e.g. an older PMI): local rank from the gathered host names.
    env = {"PMI_RANK": "2", "PMI_SIZE": "4"}
    assert from_mpich(env, exchange=lambda *a: rdv) == LaunchInfo("mpich", 2, 0, 4, 2, 1, "10.0.0.1", 51000)


def test_srun_mpi_pmi2_stays_slurm_but_mpirun_inside_an_allocation_is_mpi() -> None:
    # srun --mpi=pmi2 sets PMI_RANK/PMI_SIZE equal to SLURM's numbering: SLURM answers.
    pmi2 = SRUN_TASK | {"PMI_RANK": "2", "PMI_SIZE": "4", "PMI_FD": "13", "PMI_JOBID": "3.0"}
    assert detect_launch(pmi2).launcher == "slurm"
    # Open MPI's mpirun in a 2-node job starts one daemon per node with srun; its 16 ranks inherit
    # the daemon step's SLURM_PROCID (0 or 1 of 2 tasks), which must not be mistaken for theirs.
    daemon_step = SRUN_TASK | {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NODEID": "1"}
    env = daemon_step | {"OMPI_COMM_WORLD_RANK": "9", "OMPI_COMM_WORLD_SIZE": "16",
                         "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "8",
                         "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
    assert from_slurm(env) is None
    assert detect_launch(env) == LaunchInfo("openmpi", 9, 1, 16, 8, 1, "n1", 29500)


def test_tasks_per_node_compressed_form() -> None:
    assert [tasks_on_node("2(x3),1", n) for n in range(5)] == [2, 2, 2, 1, None]
    assert tasks_on_node("8", 0) == 8 and tasks_on_node(None, 0) is None
    env = SRUN_TASK | {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NODEID": "2", "SLURM_STEP_NUM_TASKS": "10",
                       "SLURM_STEP_TASKS_PER_NODE": "4(x2),2", "SLURM_STEP_NODELIST": "gpu[07-09]"}
    info = from_slurm(env)
    assert (info.local_world_size, info.node_rank, info.world_size) == (2, 2, 10)


NODELISTS = ["vm", "gpu[003-005,9],cpu1", "rack[2-3]-n[01-04]", "a1,b[1-2]", "node-[10-12]", "x[7]"]


@pytest.mark.parametrize("nodelist", NODELISTS)
def test_hostlist_parser_agrees_with_scontrol(nodelist: str) -> None:
    """The no-scontrol fallback (containers) must pick the same first host as SLURM does."""
    env = clean_env(slurm_cluster())  # scontrol needs a slurm.conf even to expand a hostlist
    out = run(["scontrol", "show", "hostnames", nodelist], env, timeout=30).stdout.split()
    assert first_host_of_nodelist(nodelist) == out[0]
    # The same answer whether scontrol can run in this process or not (no slurm.conf here, as in
    # most container images: then the parser answers).
    assert launchers.slurm_first_host(nodelist) == out[0]


def test_bad_launcher_variable_names_itself() -> None:
    with pytest.raises(LaunchError, match="SLURM_PROCID='x'"):
        from_slurm(SRUN_TASK | {"SLURM_PROCID": "x"})
    with pytest.raises(LaunchError, match="LOCAL_RANK='0a'"):  # torchrun's variables: the same helper
        detect_launch({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0a"})


def test_mpi_exchange_refuses_a_mismatched_mpi() -> None:
    """Outside mpirun, mpi4py is a singleton (rank 0 of 1), not the environment's rank 1 of 2: the
    error says so instead of hanging. A subprocess: MPI_Init must not happen in pytest, which forks."""
    env = clean_env(OMPI_RANK1)
    proc = run([os.path.join(REPO, ".venv", "bin", "sat-dist"), "env"], env, timeout=60, check=False)
    assert proc.returncode == 1, proc
    assert re.search(r"openmpi says this is rank 1 of 2, but mpi4py's MPI_COMM_WORLD says rank 0 of 1", proc.stderr), \
        proc.stderr


# --- launch scripts and the image -------------------------------------------------------------

SCRIPTS = ["launch/torchrun.sh", "launch/slurm.sbatch", "launch/mpirun.sh", "tests/cluster/slurm.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_has_usage_header_and_parses(script: str) -> None:
    path = os.path.join(REPO, script)
    assert os.access(path, os.X_OK), f"{script} is not executable (chmod +x)"
    lines = open(path).read().splitlines()
    header = [ln for ln in lines[1:12] if ln.startswith("#")]
    name = os.path.basename(script)
    assert any(name in ln for ln in header), f"{script}: the header comment must show how to call it"
    subprocess.run(["bash", "-n", path], check=True)


def test_pins_live_in_one_file_that_setup_makefile_and_docker_read() -> None:
    """requirements.txt is the one list: setup.py, the Makefile's venv and the Dockerfile install it."""
    setup_py = open(os.path.join(REPO, "setup.py")).read()
    makefile = open(os.path.join(REPO, "Makefile")).read()
    dockerfile = open(os.path.join(REPO, "docker", "Dockerfile")).read()
    assert '_requirements("requirements.txt")' in setup_py
    assert re.search(r"^REQS\s*:=.*\brequirements\.txt\b", makefile, re.M)
    assert re.search(r"^RUN python -m pip install -r /tmp/requirements\.txt$", dockerfile, re.M)
    assert re.search(r"^COPY requirements\.txt /tmp/requirements\.txt$", dockerfile, re.M)
    assert "torch==2.13.0" in setup_install_requires()
    for text, where in ((makefile, "Makefile"), (dockerfile, "docker/Dockerfile")):
        assert not re.search(r"torch==\d", text), f"{where} pins torch itself instead of reading requirements.txt"


def test_docker_base_image_carries_the_pinned_torch() -> None:
    text = open(os.path.join(REPO, "docker", "Dockerfile")).read()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1)
    torch_pin = next(r for r in setup_install_requires() if r.startswith("torch=="))
    assert base.split(":")[1].startswith(torch_pin.split("==")[1] + "-"), (base, torch_pin)
    assert "cuda" in base and "runtime" in base, base
