import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SAT_VENV = REPO / ".venv-sat"


def _tail(s: str, n: int = 6000) -> str:
    return s[-n:]


# The SAT reference venv, shared by test_sat_reference.py and test_lora_sat.py.
@pytest.fixture(scope="session")
def sat_venv() -> Path:
    """Build .venv-sat once (Makefile target; a stamp makes later runs instant). Fails, not skips."""
    lock_dir = REPO / ".cache"
    lock_dir.mkdir(exist_ok=True)
    t = time.perf_counter()
    with open(lock_dir / "sat-ref-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two pytest sessions must not build it at once
        proc = subprocess.run(["make", "-s", "sat-ref-venv"], cwd=REPO, capture_output=True, text=True,
                              timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"could not build the SAT reference venv (make sat-ref-venv, rc {proc.returncode}):\n"
                    f"{_tail(proc.stdout + proc.stderr)}")
    for exe in ("python", "torchrun"):
        assert (SAT_VENV / "bin" / exe).exists(), f"{SAT_VENV}/bin/{exe} missing after make sat-ref-venv"
    if proc.stdout.strip():
        print(f"\n{proc.stdout.strip()} (fixture {time.perf_counter() - t:.0f} s)")
    return SAT_VENV


def run_sat_script(sat_venv: Path, script: Path, out: Path, nproc: int, what: str) -> dict:
    """Run `script` with the reference SAT under torchrun (`nproc` gloo ranks, `--out out`); returns the
    manifest.json it wrote, whose SAT version must be 0.4.12. Fails (never skips) with SAT's output."""
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    cmd = [str(sat_venv / "bin" / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", str(script),
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not (out / "manifest.json").exists():
        pytest.fail(f"{what} failed (rc {proc.returncode}):\n{_tail(proc.stdout + proc.stderr)}")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sat_version"] == "0.4.12", manifest
    return manifest


def assert_same_state_dict(got: dict, want: dict, where: str, note=lambda k: "") -> None:
    """Keys, shapes, dtypes and values (torch.equal) of `got` against SAT's `want`; `note(k)` adds to an error."""
    import torch  # (here, not at the top: conftest sets OMP_NUM_THREADS before anything imports torch)

    assert sorted(got) == sorted(want), (
        f"{where}: keys differ; missing {sorted(set(want) - set(got))}, unexpected {sorted(set(got) - set(want))}")
    for k in sorted(want):
        g, w = got[k], want[k]
        assert tuple(g.shape) == tuple(w.shape), f"{where}: {k} shape {tuple(g.shape)} != SAT {tuple(w.shape)}"
        assert g.dtype == w.dtype, f"{where}: {k} dtype {g.dtype} != SAT {w.dtype}"
        if not torch.equal(g, w):
            diff = (g.float() - w.float()).abs()
            raise AssertionError(f"{where}: {k} differs from SAT's split: max |diff| {diff.max().item():.3g}, "
                                 f"{int((diff > 0).sum())}/{diff.numel()} elements{note(k)}")
