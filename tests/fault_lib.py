"""Kill/stall trials: a real job under torchrun, mpirun or srun, one rank held at a load phase by the
test-only pause hook (sat_dist/pause.py), then SIGKILLed, SIGSTOPped, or the launcher sent SIGINT
(Ctrl-C; under srun the two quick SIGINTs that abort a step, as a user's double Ctrl-C does).
Every surviving rank must exit non-zero within --timeout + 5 s of the fault, and a stalled
rank must be named by a survivor.

`python tests/fault_lib.py --trials 50` (`make soak`) runs randomized trials and prints each and the
worst time to exit; tests/test_faults.py runs a seeded handful in CI.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from launch_helpers import REPO, VENV_BIN, clean_env, kill_group, require  # noqa: E402

PHASES = ("rendezvous", "tag", "index", "plan", "read", "agree")
SIGNALS = ("SIGKILL", "SIGSTOP", "SIGINT")
LAUNCHERS = ("torchrun", "mpirun", "srun")
BOUND_S = 5.0  # every survivor is out within --timeout + BOUND_S of the fault


@dataclasses.dataclass(frozen=True)
class Trial:
    launcher: str
    world: int
    victim: int
    phase: str
    sig: str
    timeout_s: float

    def __str__(self) -> str:
        target = "the launcher" if self.sig == "SIGINT" else f"rank {self.victim}"
        return (f"{self.launcher} x{self.world}: {self.sig} to {target} (rank {self.victim} held at "
                f"'{self.phase}'), --timeout {self.timeout_s:g}")


@dataclasses.dataclass
class Outcome:
    trial: Trial
    exit_s: dict  # rank -> seconds from the fault to its exit
    launcher_rc: Optional[int]
    stderr: str
    problems: list

    @property
    def worst_s(self) -> float:
        return max(self.exit_s.values(), default=float("nan"))

    @property
    def ok(self) -> bool:
        return not self.problems


def random_trial(rng: random.Random, launcher: Optional[str] = None, timeout_s: float = 8.0) -> Trial:
    world = rng.choice((2, 2, 3, 4))
    return Trial(launcher or rng.choice(LAUNCHERS), world, rng.randrange(world), rng.choice(PHASES),
                 rng.choice(SIGNALS), timeout_s)


def _command(t: Trial, ckpt: str, report: str) -> tuple[list[str], dict]:
    load = ["load", ckpt, "--tp", "1", "--timeout", str(t.timeout_s), "--report", report]
    if t.launcher == "torchrun":
        from sat_dist.testing.dist import free_port

        return [os.path.join(VENV_BIN, "torchrun"), "--nnodes=1", f"--nproc_per_node={t.world}",
                "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}", "-m", "sat_dist", *load], {}
    if t.launcher == "srun":
        from launch_helpers import slurm_cluster

        return [require("srun", hint="tests/cluster/slurm.sh up installs slurm-client"), "-n", str(t.world),
                "--kill-on-bad-exit=1", os.path.join(VENV_BIN, "sat-dist"), *load], slurm_cluster()
    return [os.path.join(REPO, "launch", "mpirun.sh"), *load], {
        "NP": str(t.world), "MPIRUN": os.path.join(VENV_BIN, "mpirun"), "MPIRUN_ARGS": "--oversubscribe",
        "PYTHON": os.path.join(VENV_BIN, "python")}


def _state(pid: int) -> Optional[str]:
    """'Z' / 'T' / 'R' ... or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _pids(folder: str, point: str) -> dict[int, int]:
    out = {}
    for name in os.listdir(folder):
        p, _, r = name.partition(".")
        if p == point and r.isdigit():
            try:
                out[int(r)] = int(open(os.path.join(folder, name)).read() or 0)
            except ValueError:
                pass
    return out


def _names_victim(text: str, victim: int) -> bool:
    """Some survivor said which rank did not arrive (or that rank 0, the store's host, did not answer)."""
    for m in re.finditer(r"rank\(s\) \[([0-9, ]+)\]", text):
        if victim in {int(x) for x in m.group(1).split(",")}:
            return True
    return victim == 0 and ("hosted by rank 0" in text or "its host (rank 0" in text)


def run_trial(t: Trial, ckpt: str, start_timeout: float = 90.0) -> Outcome:
    work = tempfile.mkdtemp(prefix="sat-dist-fault-")
    marks = os.path.join(work, "marks")
    os.makedirs(marks)
    cmd, extra = _command(t, ckpt, os.path.join(work, "report.json"))
    env = clean_env({**extra, "SAT_DIST_TEST_PAUSE_DIR": marks, "SAT_DIST_TEST_PAUSE_AT": f"{t.phase}@{t.victim}",
                     "SAT_DIST_TEST_PAUSE_S": "120", "PYTHONPATH": REPO})
    err_path = os.path.join(work, "stderr")
    problems: list[str] = []
    exit_s: dict[int, float] = {}
    with open(err_path, "w") as err, open(os.path.join(work, "stdout"), "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout
        victim_pid = None
        while time.monotonic() < deadline and proc.poll() is None:  # every rank started, the victim is held
            held = _pids(marks, t.phase).get(t.victim)
            if held and len(_pids(marks, "rendezvous")) == t.world:
                victim_pid = held
                break
            time.sleep(0.05)
        if victim_pid is None:
            problems.append(f"rank {t.victim} never reached '{t.phase}' (launcher exit {proc.poll()})")
            return Outcome(t, {}, proc.poll(), open(err_path).read(), problems)
        time.sleep(0.3)  # let the others reach their next wait
        pids = _pids(marks, "rendezvous")
        fault = time.monotonic()
        if t.sig == "SIGINT":
            os.kill(proc.pid, signal.SIGINT)
            if t.launcher == "srun":  # srun's first Ctrl-C only reports; a second within 1 s aborts the step
                time.sleep(0.2)
                os.kill(proc.pid, signal.SIGINT)
            survivors = dict(pids)
        else:
            try:
                os.kill(victim_pid, getattr(signal, t.sig))
            except ProcessLookupError:
                problems.append(f"rank {t.victim} was gone before the fault")
            survivors = {r: p for r, p in pids.items() if r != t.victim}
        limit = fault + t.timeout_s + BOUND_S + 15
        while survivors and time.monotonic() < limit:
            for r, pid in list(survivors.items()):
                if _state(pid) in (None, "Z"):
                    exit_s[r] = round(time.monotonic() - fault, 2)
                    del survivors[r]
            time.sleep(0.02)
        if survivors:
            problems.append(f"rank(s) {sorted(survivors)} still running {limit - fault:.0f}s after the fault")
        late = {r: s for r, s in exit_s.items() if s > t.timeout_s + BOUND_S}
        if late:
            problems.append(f"rank(s) exited later than --timeout + {BOUND_S:g}s: {late}")
        if t.sig == "SIGSTOP" and _state(victim_pid) not in (None, "Z"):
            try:  # the test's own stopped process (if the launcher has not ended it): let the launcher finish
                os.kill(victim_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            rc = None
            problems.append("the launcher did not exit within 60s of its ranks")
        if rc == 0:
            problems.append("the launcher exited 0")
        text = open(err_path).read()
        if t.sig == "SIGSTOP" and not _names_victim(text, t.victim):
            problems.append(f"no survivor named rank {t.victim} as the one that did not arrive")
        if re.search(r'File "[^"]*/sat_dist/', text):  # a rank's traceback (the launcher's own is not ours)
            problems.append("a Python traceback was printed")
        return Outcome(t, exit_s, rc, text, problems)
    finally:
        if proc.poll() is None:
            kill_group(proc)
        for pid in _pids(marks, "rendezvous").values():  # a rank the launcher lost track of
            if _state(pid) not in (None, "Z"):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=8.0)
    ap.add_argument("--launcher", choices=LAUNCHERS, default=None)
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    from sat_dist.demo import ensure_demo_checkpoint

    ckpt = ensure_demo_checkpoint(os.path.join(tempfile.mkdtemp(prefix="sat-dist-soak-"), "ckpt"))
    print(f"seed {seed}: {args.trials} trials", flush=True)
    outcomes = []
    for i in range(args.trials):
        o = run_trial(random_trial(rng, args.launcher, args.timeout), ckpt)
        outcomes.append(o)
        status = "ok" if o.ok else "FAIL: " + "; ".join(o.problems)
        print(f"{i + 1:3d} {o.trial}: worst exit {o.worst_s:.2f}s {o.exit_s} launcher rc {o.launcher_rc} {status}",
              flush=True)
    bad = [o for o in outcomes if not o.ok]
    worst = max(o.worst_s for o in outcomes if o.exit_s)
    print(f"{len(outcomes) - len(bad)}/{len(outcomes)} trials ok; worst time to exit {worst:.2f}s "
          f"(bound: --timeout {args.timeout:g} + {BOUND_S:g} s); seed {seed}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
