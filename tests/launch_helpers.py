"""Shared pieces of the launcher tests (tests/test_launch_*.py): real torchrun, srun, sbatch and
mpirun runs, never mocks.

Expensive things happen once per pytest process and are cached here (the demo checkpoint, the
torchrun reference digests, the SLURM cluster, the MPICH venv), so each test file can ask for
them without paying twice. A launcher that is missing is a test failure with a message saying
how to get it, never a skip.
"""
from __future__ import annotations

import atexit
import fcntl
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Mapping, Optional, Sequence

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(REPO, ".venv")
VENV_BIN = os.path.join(VENV, "bin")
MPICH_VENV = os.path.join(REPO, ".venv-mpich")
SLURM_SH = os.path.join(REPO, "tests", "cluster", "slurm.sh")

# Variables a surrounding launcher (pytest itself started under srun/torchrun/mpirun) would leak
# into the programs we start; each test sets up its own launcher from scratch.
_LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMIX_", "PMI_", "MPI_LOCAL", "TORCHELASTIC_", "GROUP_", "ROLE_")
_LAUNCHER_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"}


def setup_install_requires() -> list[str]:
    """The runtime pins: requirements.txt, the one file setup.py, the Makefile and the Dockerfile read."""
    with open(os.path.join(REPO, "requirements.txt")) as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]


def clean_env(extra: Optional[Mapping[str, str]] = None, bin_dir: str = VENV_BIN) -> dict[str, str]:
    """The environment for a launched job: no inherited launcher variables, `bin_dir` first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_PREFIXES)}
    # CPU and gloo even on a GPU machine: these tests are about launchers, and 4 ranks on one GPU
    # would make NCCL refuse the duplicate device.
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PATH=f"{bin_dir}:{env.get('PATH', '')}:/usr/sbin:/sbin",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", CUDA_VISIBLE_DEVICES="")
    env.pop("VIRTUAL_ENV", None)
    env.update(extra or {})
    return env


def run(cmd: Sequence[str], env: Mapping[str, str], timeout: float = 120, check: bool = True,
        cwd: str = REPO) -> subprocess.CompletedProcess:
    """Run a launcher command in its own process group; on timeout kill the whole group."""
    proc = subprocess.Popen(list(cmd), env=dict(env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} did not finish within {timeout}s\n"
                             f"--- stdout\n{out[-4000:]}\n--- stderr\n{err[-4000:]}") from None
    result = subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n"
                             f"--- stdout\n{out[-4000:]}\n--- stderr\n{err[-6000:]}")
    return result


def kill_group(proc: subprocess.Popen) -> None:
    """Stop the process group we started (start_new_session=True), and nothing else: SIGTERM first,
    so srun cancels its step and mpirun/torchrun stop their ranks, then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def require(program: str, path: Optional[str] = None, hint: str = "") -> str:
    """Full path of `program`, or a test failure that says how to install it (never a skip)."""
    found = shutil.which(program, path=path)
    if found is None:
        pytest.fail(f"launcher program '{program}' not found{' in ' + path if path else ''}: {hint}", pytrace=False)
    return found


def env_lines(stdout: str) -> list[dict]:
    """The JSON lines `sat-dist env` printed, sorted by rank."""
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return sorted(rows, key=lambda r: r["rank"])


def check_env_lines(stdout: str, launcher: str, world: int, local_world: int, nodes: int = 1) -> list[dict]:
    """Every rank printed once, with consistent world, local ranks and one rendezvous address."""
    rows = env_lines(stdout)
    assert [r["rank"] for r in rows] == list(range(world)), f"ranks printed: {[r['rank'] for r in rows]}\n{stdout}"
    for r in rows:
        assert r["launcher"] == launcher, r
        assert r["world_size"] == world, r
        assert r["local_world_size"] == local_world, r
        assert r["local_rank"] == r["rank"] % local_world, r
        assert r["node_rank"] == r["rank"] // local_world, r
        assert r["device"] == "cpu" and r["backend"] == "gloo", r
    assert {r["node_rank"] for r in rows} == set(range(nodes)), rows
    rendezvous = {(r["master_addr"], r["master_port"]) for r in rows}
    assert len(rendezvous) == 1 and None not in next(iter(rendezvous)), f"ranks disagree on the master: {rendezvous}"
    return rows


def report_digests(path: str) -> list[str]:
    """Per-rank state-dict digests from a `--report` JSON, in rank order."""
    with open(path) as f:
        rep = json.load(f)
    ranks = sorted(rep["ranks"], key=lambda r: r["rank"])
    return [r["digest"] for r in ranks]


@functools.cache
def scratch() -> str:
    """One scratch folder per pytest process, visible to SLURM tasks and network namespaces."""
    path = tempfile.mkdtemp(prefix="sat-dist-launch-")
    atexit.register(shutil.rmtree, path, True)
    return path


@functools.cache
def demo_checkpoint() -> str:
    """The demo SAT checkpoint (mp=1), written once into the scratch folder."""
    from sat_dist.demo import ensure_demo_checkpoint

    return ensure_demo_checkpoint(os.path.join(scratch(), "demo-ckpt"))


@functools.cache
def torchrun_reference(tp: int) -> tuple[str, ...]:
    """Digests of a single-node `torchrun --nproc_per_node=4` load at this TP size: the baseline
    every other launcher must reproduce rank by rank."""
    report = os.path.join(scratch(), f"ref-torchrun-tp{tp}.json")
    torchrun = require("torchrun", VENV_BIN, "run `make venv`")
    run([torchrun, "--standalone", "--nproc_per_node=4", "-m", "sat_dist", "load", demo_checkpoint(),
         "--tp", str(tp), "--report", report], clean_env(), timeout=180)
    digests = tuple(report_digests(report))
    assert len(digests) == 4 and len(set(digests)) == tp, digests
    return digests


# --- SLURM ---------------------------------------------------------------------------------------

@functools.cache
def slurm_cluster() -> dict[str, str]:
    """SLURM_CONF of a running single-node cluster; started (and stopped at exit) if not up."""
    status = subprocess.run(["bash", SLURM_SH, "status"], capture_output=True, text=True)
    if status.returncode != 0:
        up = subprocess.run(["bash", SLURM_SH, "up"], capture_output=True, text=True, timeout=600)
        if up.returncode != 0:
            pytest.fail(f"tests/cluster/slurm.sh up failed (exit {up.returncode}); it needs root and apt-get "
                        f"(Debian: slurmd slurmctld slurm-client munge):\n{up.stderr[-4000:]}", pytrace=False)
        atexit.register(subprocess.run, ["bash", SLURM_SH, "down"], capture_output=True)
        status = up
    line = status.stdout.strip().splitlines()[-1]
    conf = line.split("=", 1)[1]
    if not os.path.isfile(conf):
        pytest.fail(f"slurm.sh printed {line!r} but {conf} does not exist", pytrace=False)
    for prog in ("srun", "sbatch", "scontrol"):
        require(prog, hint="tests/cluster/slurm.sh up installs slurm-client (apt-get)")
    return {"SLURM_CONF": conf}


def sbatch_wait(args: Sequence[str], env: Mapping[str, str], timeout: float = 240) -> tuple[str, str]:
    """`sbatch --wait` a job; returns (job id, its output file's text). Fails with the job's output."""
    tag = f"sat-dist-test-{os.getpid()}-{time.monotonic_ns()}"
    out_file = os.path.join(scratch(), f"{tag}.out")
    sbatch = require("sbatch", hint="tests/cluster/slurm.sh up installs it")
    try:
        # --time: a job that outlives a failed test does not hold the node for ever.
        proc = run([sbatch, "--wait", f"--job-name={tag}", "--time=10", f"--output={out_file}", *args], env,
                   timeout=timeout, check=False)
    except AssertionError:
        subprocess.run(["scancel", f"--name={tag}"], env=dict(env), capture_output=True)
        raise
    text = open(out_file).read() if os.path.exists(out_file) else "(no output file)"
    job = proc.stdout.strip().split()[-1] if proc.stdout.strip() else "?"
    if proc.returncode != 0:
        raise AssertionError(f"sbatch job {job} failed (exit {proc.returncode})\n{proc.stderr[-3000:]}\n"
                             f"--- job output\n{text[-6000:]}")
    return job, text


# --- MPICH venv -----------------------------------------------------------------------------------

@functools.cache
def mpich_venv() -> str:
    """bin/ of `.venv-mpich`: setup.py's pins + the PyPI `mpich` wheel (Open MPI's `mpirun` lives in
    .venv; both wheels ship bin/mpirun, so they cannot share a venv). Built once, reused while
    the requirement list is unchanged; a file lock keeps parallel pytest runs from racing."""
    reqs = setup_install_requires() + ["mpich"]
    stamp = os.path.join(MPICH_VENV, ".sat-dist-reqs")
    want = "\n".join(reqs) + "\n"
    bin_dir = os.path.join(MPICH_VENV, "bin")
    os.makedirs(os.path.join(REPO, ".cache"), exist_ok=True)
    with open(os.path.join(REPO, ".cache", "venv-mpich.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (os.path.exists(stamp) and open(stamp).read() == want):
            shutil.rmtree(MPICH_VENV, ignore_errors=True)
            steps = [
                [sys.executable, "-m", "venv", MPICH_VENV],
                [os.path.join(bin_dir, "pip"), "install", "-q", *reqs],
                [os.path.join(bin_dir, "pip"), "install", "-q", "--no-deps", "--no-build-isolation", "-e", REPO],
            ]
            for cmd in steps:
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_BUILD_OPS": "0"},
                                      timeout=900)
                if proc.returncode != 0:
                    pytest.fail(f"building {MPICH_VENV} failed at `{' '.join(cmd)}`:\n{proc.stderr[-4000:]}",
                                pytrace=False)
            with open(stamp, "w") as f:
                f.write(want)
    require("mpirun", bin_dir, "the PyPI `mpich` wheel provides it")
    return bin_dir


# --- network namespaces (ENVIRONMENT.md §7) ----------------------------------------------------

class NetnsPair:
    """Two network namespaces joined by a veth pair: two 'nodes' with their own IP on one host.

    Names carry this process's pid so parallel runs do not collide; `close()` kills what we
    started inside and deletes both namespaces (which also removes the veth pair), even when
    the test failed half-way.
    """

    def __init__(self) -> None:
        if os.geteuid() != 0:
            pytest.fail("network namespaces need root (ip netns add); run the launcher tests as root", pytrace=False)
        self.ip = require("ip", hint="apt-get install iproute2")
        require("unshare", hint="apt-get install util-linux")
        tag = os.getpid() % 1_000_000
        self.ns = (f"sdA{tag}", f"sdB{tag}")
        self.dev = (f"sva{tag}", f"svb{tag}")
        net = 10 + os.getpid() % 240
        self.addr = (f"10.78.{net}.1", f"10.78.{net}.2")
        self.procs: list[subprocess.Popen] = []
        self._created: list[str] = []
        try:
            for ns in self.ns:
                self._ip("netns", "add", ns)
                self._created.append(ns)
            self._ip("link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])
            for ns, dev, addr in zip(self.ns, self.dev, self.addr):
                self._ip("link", "set", dev, "netns", ns)
                self._ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                self._ip("-n", ns, "link", "set", dev, "up")
                self._ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def _ip(self, *args: str) -> None:
        proc = subprocess.run([self.ip, *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise AssertionError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")

    def start(self, node: int, cmd: Sequence[str], env: Mapping[str, str], hostname: str) -> subprocess.Popen:
        """Start `cmd` in namespace `node` with its own UTS namespace and `hostname` (so reports
        show which node a rank ran on)."""
        wrapped = [self.ip, "netns", "exec", self.ns[node], "unshare", "--uts", "sh", "-c",
                   'hostname "$0" && exec "$@"', hostname, *cmd]
        proc = subprocess.Popen(wrapped, env=dict(env), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                kill_group(proc)
        for ns in self._created:
            # Anything still inside a namespace we created is ours (e.g. a torchrun worker that
            # left torchrun's process group): stop it, or the namespace outlives `ip netns del`.
            pids = subprocess.run([self.ip, "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for ns in self._created:
            subprocess.run([self.ip, "netns", "del", ns], capture_output=True)
        self._created.clear()

    def __enter__(self) -> "NetnsPair":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_all(procs: Sequence[subprocess.Popen], timeout: float, what: str) -> list[tuple[int, str, str]]:
    """(returncode, stdout, stderr) of each process; kills them all and fails on timeout."""
    deadline = time.monotonic() + timeout
    results: list[tuple[int, str, str]] = []
    for i, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            for p in procs[i:]:
                kill_group(p)
            rest = [(p.wait(), *p.communicate()) for p in procs[i:]]
            raise AssertionError(f"{what} did not finish within {timeout}s:\n" + "\n".join(
                f"--- process {j} (exit {rc}) stdout\n{o[-3000:]}\n--- stderr\n{e[-3000:]}"
                for j, (rc, o, e) in enumerate(results + rest))) from None
        results.append((proc.returncode, out, err))
    return results
