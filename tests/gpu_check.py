"""`make gpu-check`: what a GPU machine does with sat_dist, in one table (a script, not a pytest file).

    .venv/bin/python tests/gpu_check.py [--cpu] [--only NAME ...] [--keep] [--budget S]

Each row runs real commands (`torchrun --standalone --nproc_per_node=N -m sat_dist ...`, or ranks
started with the launcher's variables set by hand where each rank's exit code and time matter) on
fixtures written into a temporary folder: a tiny SAT checkpoint like `sat-dist demo`'s, and tiny
diffusers CogVideoX pipelines (tests/engine_fixtures.py). It prints one row per check,
`CHECK | PASS/FAIL/SKIP | detail`, and exits 1 if any row FAILed (2 when no GPU is visible).
Rows that the GPU count does not allow (TP=2 on one GPU) are SKIPped with the reason.

`--cpu` runs the same rows on the CPU with gloo (world 2, every rank `--device cpu` and
CUDA_VISIBLE_DEVICES=""): the rows that need CUDA are SKIPped. That is how this script is checked
on a machine without a GPU. `--only digests --only bounded-exit` runs only those rows (a prefix
matches); `--keep` keeps the temporary folder (every command's stdout/stderr is under logs/).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

from launch_helpers import kill_group  # tests/ is this script's folder, first on sys.path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # the venv's bin: torchrun, sat-dist
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
FAULT_TIMEOUT_S = 10.0  # --timeout of the bounded-exit rows
FAULT_BOUND_S = 15.0  # rank 0 must be out within this long of starting to load
# Launcher variables a surrounding job (an sbatch, a torchrun) would leak into the commands we start.
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMIX_", "PMI_", "MPI_LOCAL", "TORCHELASTIC_", "GROUP_", "ROLE_")
LAUNCHER_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


class RowFail(Exception):
    """A row's check failed: `detail` goes in the table, `log` (a command's output) above it."""

    def __init__(self, detail: str, log: str = ""):
        super().__init__(detail)
        self.detail, self.log = detail, log


@dataclasses.dataclass
class Proc:
    """One finished (or killed) command."""

    name: str
    rc: Optional[int]  # None: killed at its timeout
    out: str
    err: str
    seconds: float

    def ranks_err(self) -> list[str]:
        """stderr without torchrun's own traceback (its ChildFailedError / SignalException), which
        says nothing the ranks' lines and its failure summary do not."""
        lines = self.err.splitlines()
        for i in range(len(lines) - 1, -1, -1):
            if lines[i].startswith("Traceback (most recent call last):"):
                end = next((j for j in range(i, len(lines)) if lines[j].startswith("torch.distributed.elastic.")), None)
                if end is not None:
                    lines = lines[:i] + lines[end + 1:]
                break
        return [ln for ln in lines if ln.strip()]

    def tail(self, lines: int = 30) -> str:
        text = self.ranks_err() or self.out.strip().splitlines()
        return f"--- {self.name} (exit {self.rc}, {self.seconds:.1f}s), last lines of its stderr:\n" + \
            "\n".join(text[-lines:])

    def last_line(self) -> str:
        """sat_dist's last error line (`[rank N] ...`), else the last line of stderr."""
        lines = self.ranks_err()
        ours = [ln for ln in lines if re.match(r"\[rank \d+\] ", ln)]
        return ((ours or lines or [""])[-1])[:200]

    def ok(self, what: str) -> "Proc":
        """self if it exited 0, else RowFail naming `what`."""
        if self.rc is None:
            raise RowFail(f"{what}: killed at its time limit ({self.seconds:.0f}s; the row's or --budget's)",
                          self.tail())
        if self.rc != 0:
            raise RowFail(f"{what}: exit {self.rc}: {self.last_line()}", self.tail())
        return self


@dataclasses.dataclass
class Ctx:
    """What every row shares: the mode, the GPU count, the temporary folder, the time left."""

    cpu: bool
    gpus: int
    work: str
    deadline: float
    fixtures: dict = dataclasses.field(default_factory=dict)
    counter: int = 0

    @property
    def ranks(self) -> int:
        """How many ranks a row may start: one per GPU, or 2 on the CPU."""
        return 2 if self.cpu else self.gpus

    @property
    def device_args(self) -> list[str]:
        return ["--device", "cpu"] if self.cpu else []

    def need(self, n: int) -> Optional[str]:
        """Why a row needing `n` ranks cannot run here, or None."""
        return None if self.ranks >= n else f"needs {n} GPUs ({self.gpus} visible)"

    def env(self, extra: Optional[dict] = None, cpu: Optional[bool] = None) -> dict:
        """A clean environment for a command: no inherited launcher variables; CUDA hidden on the CPU."""
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES)}
        env.update(PYTHONUNBUFFERED="1", PATH=f"{BIN}:{env.get('PATH', '')}")
        for k in [k for k in env if k.startswith("SAT_DIST_TEST_")]:  # the fault hooks: only where a row sets them
            del env[k]
        if self.cpu if cpu is None else cpu:
            env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
        env.update(extra or {})
        return env

    def path(self, *parts: str) -> str:
        """A file under the work folder (its folder made)."""
        p = os.path.join(self.work, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def folder(self, name: str) -> str:
        """A new folder under the work folder."""
        p = os.path.join(self.work, name)
        os.makedirs(p, exist_ok=True)
        return p

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def limit(self, timeout: float) -> float:
        """`timeout`, cut to the time left; RowFail when none is."""
        left = self.left()
        if left < 5:
            raise RowFail("out of time: the --budget was spent before this command")
        return min(timeout, left)

    def log_name(self, name: str) -> str:
        self.counter += 1
        return f"{self.counter:03d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}"

    def sat_ckpt(self) -> str:
        """The tiny SAT checkpoint (the demo's model, mp=1, fp32), written once."""
        if "sat" not in self.fixtures:
            from sat_dist.demo import DEMO_MODEL
            from sat_dist.models import TPInfo, build_meta_model, collect_specs
            from sat_dist.writer import model_config_dict, random_state_dict, save_sat_checkpoint

            root = self.folder("sat_ckpt")
            specs = collect_specs(build_meta_model(DEMO_MODEL, TPInfo()))
            full = random_state_dict(specs, seed=7)
            save_sat_checkpoint(root, full, specs, mp_size=1, iteration="1", model_config=model_config_dict(DEMO_MODEL))
            self.fixtures["sat"] = (root, full, specs)
        return self.fixtures["sat"][0]

    def expected_digests(self, tp: int, dtype: str) -> list[str]:
        """Each TP rank's digest computed here from the written weights (SAT's split, then the cast)."""
        import torch

        from sat_dist.report import state_dict_digest
        from sat_dist.writer import shard_state_dict

        self.sat_ckpt()
        _, full, specs = self.fixtures["sat"]
        cast = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        return [state_dict_digest({k: v.to(cast) for k, v in shard_state_dict(full, specs, tp, r).items()})
                for r in range(tp)]

    def pipeline(self, kind: str) -> str:
        """A tiny diffusers CogVideoX pipeline folder of `kind` ('5b': T2V, '15_i2v': I2V), written once."""
        if kind not in self.fixtures:
            sys.path.insert(0, os.path.join(REPO, "tests"))
            from engine_fixtures import random_image, write_pipeline

            self.fixtures[kind] = write_pipeline(self.folder(f"pipe_{kind}"), kind, seed=len(self.fixtures))
            if "png" not in self.fixtures:
                self.fixtures["png"] = self.path("first.png")
                random_image(seed=5).save(self.fixtures["png"])
        return self.fixtures[kind]


# --- running commands -------------------------------------------------------------------------------

def run(ctx: Ctx, name: str, cmd: Sequence[str], env: dict, timeout: float) -> Proc:
    """Run `cmd` in its own session with a timeout (then the whole session is killed); output kept in logs/."""
    base = ctx.path("logs", ctx.log_name(name))
    t0 = time.monotonic()
    with open(base + ".out", "w") as out, open(base + ".err", "w") as err:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(list(cmd), env=env, cwd=REPO, stdout=out, stderr=err, start_new_session=True)
        try:
            rc: Optional[int] = proc.wait(ctx.limit(timeout))
        except subprocess.TimeoutExpired:
            kill_group(proc)
            rc = None
        except BaseException:  # Ctrl-C: our sessions do not see the terminal's SIGINT, so stop them here
            kill_group(proc)
            raise
    return Proc(name, rc, open(base + ".out").read(), open(base + ".err").read(), time.monotonic() - t0)


def torchrun(ctx: Ctx, name: str, n: int, args: Sequence[str], env: Optional[dict] = None, timeout: float = 120,
             script: Optional[str] = None, cpu: Optional[bool] = None) -> Proc:
    """`torchrun --standalone --nproc_per_node=n -m sat_dist ARGS` (or `torchrun ... SCRIPT ARGS`)."""
    target = [script] if script else ["-m", "sat_dist"]
    cmd = [os.path.join(BIN, "torchrun"), "--standalone", f"--nproc_per_node={n}", *target, *args]
    return run(ctx, name, cmd, ctx.env(env, cpu), timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class RankRun:
    rc: Optional[int]  # None: still running at the limit (then killed)
    exit_at: Optional[float]  # time.monotonic() of its exit
    err: str


def launch_ranks(ctx: Ctx, name: str, world: int, args: Sequence[str], env: dict, timeout: float,
                 marks: Optional[str] = None, stop_after: Optional[int] = None) -> tuple[list[RankRun], dict]:
    """Start `world` ranks of `python -m sat_dist ARGS` with the variables torchrun would set, so each
    rank's exit code and exit time are its own. Returns (per rank, {mark file: time it appeared}),
    the marks being the pause hook's SAT_DIST_TEST_PAUSE_DIR files. Once rank `stop_after` has
    exited (or at the timeout) every rank still running is killed: a paused rank sleeps on."""
    port = free_port()
    base = ctx.path("logs", ctx.log_name(name))
    procs, errs = [], []
    limit = time.monotonic() + ctx.limit(timeout)
    for r in range(world):
        rank_env = dict(env, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        errs.append(f"{base}.rank{r}.err")
        with open(f"{base}.rank{r}.out", "w") as out, open(errs[-1], "w") as err:
            out.write(" ".join([sys.executable, "-m", "sat_dist", *args]) + "\n")
            out.flush()
            procs.append(subprocess.Popen([sys.executable, "-m", "sat_dist", *args], env=rank_env, cwd=REPO,
                                          stdout=out, stderr=err, start_new_session=True))
    exit_at: dict[int, float] = {}
    seen: dict[str, float] = {}
    try:
        while time.monotonic() < limit and len(exit_at) < world:
            if marks:
                for m in os.listdir(marks):
                    seen.setdefault(m, time.monotonic())
            for r, p in enumerate(procs):
                if r not in exit_at and p.poll() is not None:
                    exit_at[r] = time.monotonic()
            if stop_after is not None and stop_after in exit_at:
                break
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                kill_group(p)
    out = []
    for r, p in enumerate(procs):
        out.append(RankRun(p.returncode if r in exit_at else None, exit_at.get(r), open(errs[r]).read()))
    return out, seen


def report(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise RowFail(f"no readable report {os.path.basename(path)}: {exc}") from None


def load_args(ctx: Ctx, tp: int, extra: Sequence[str] = ()) -> list[str]:
    return ["load", ctx.sat_ckpt(), "--tp", str(tp), "--quiet", *extra]


# --- the rows ---------------------------------------------------------------------------------------
# Each takes the Ctx and returns (status, detail), or raises RowFail.

Outcome = tuple[str, str]


def row_env(ctx: Ctx) -> Outcome:
    """`sat-dist env` on every rank under torchrun: distinct ranks; on GPU distinct cuda:i and nccl."""
    n = ctx.ranks
    p = torchrun(ctx, "env", n, ["env"], timeout=60).ok("sat-dist env")
    infos = [json.loads(ln) for ln in p.out.splitlines() if ln.startswith("{")]
    if sorted(i["rank"] for i in infos) != list(range(n)) or {i["world_size"] for i in infos} != {n}:
        raise RowFail(f"expected ranks 0..{n - 1} of world {n}, got {[(i['rank'], i['world_size']) for i in infos]}")
    refused = [f"rank {i['rank']}: {i['device_error']}" for i in infos if i.get("device_error")]
    if refused:
        raise RowFail("; ".join(refused)[:300])
    devices = sorted(str(i["device"]) for i in infos)
    backends = sorted({str(i["backend"]) for i in infos})
    want = ["cpu"] * n if ctx.cpu else sorted(f"cuda:{i}" for i in range(n))
    want_backend = ["gloo"] if ctx.cpu else ["nccl"]
    if devices != want or backends != want_backend:
        raise RowFail(f"devices {devices} backend {backends}; expected {want} {want_backend}")
    uuids = [i["gpu_uuid"] for i in infos if i.get("gpu_uuid")]
    if len(set(uuids)) != len(uuids):
        raise RowFail(f"ranks share a GPU: uuids {sorted(uuids)}")
    where = "cpu" if ctx.cpu else ", ".join(want) if n <= 2 else f"cuda:0..{n - 1}"
    distinct = f" ({len(uuids)} distinct GPU uuids)" if len(uuids) > 1 else ""
    return PASS, f"{n} rank{'s' if n > 1 else ''} on {where}{distinct}, backend {backends[0]}"


def row_digests(ctx: Ctx) -> Outcome:
    """The digests of a load on the device equal the CPU load's and the written weights', fp32 and bf16."""
    tps = [1] + ([2] if ctx.ranks >= 2 else [])
    done = []
    for dtype in ("fp32", "bf16"):
        for tp in tps:
            want = ctx.expected_digests(tp, dtype)
            got = {}
            runs = [("cpu", True)] if ctx.cpu else [("cpu", True), ("device", False)]  # --cpu: one is enough
            for where, cpu in runs:
                rep_path = ctx.path(f"digests_{dtype}_tp{tp}_{where}.json")
                dev = ["--device", "cpu"] if cpu else []
                torchrun(ctx, f"digests {dtype} tp{tp} {where}", tp,
                         load_args(ctx, tp, ["--dtype", dtype, "--digest", "--report", rep_path, *dev]),
                         cpu=cpu).ok(f"{dtype} TP={tp} load on {where}")
                ranks = sorted(report(rep_path)["ranks"], key=lambda r: r["rank"])
                got[where] = [r["digest"] for r in ranks]
                if where == "device" and not ctx.cpu:
                    devs = [r["device"] for r in ranks]
                    if devs != [f"cuda:{i}" for i in range(tp)]:
                        raise RowFail(f"{dtype} TP={tp}: loaded onto {devs}, expected cuda:0..{tp - 1}")
            if got.get("device", got["cpu"]) != got["cpu"]:
                raise RowFail(f"{dtype} TP={tp}: device digests {[d[:12] for d in got['device']]} != "
                              f"CPU {[d[:12] for d in got['cpu']]}")
            if got["cpu"] != want:
                raise RowFail(f"{dtype} TP={tp}: digests {[d[:12] for d in got['cpu']]} != the written weights' "
                              f"{[d[:12] for d in want]}")
            done.append(f"{dtype} TP{tp}")
    where = "CPU load" if ctx.cpu else "GPU load == CPU load"
    skipped = "" if 2 in tps else "; TP 2 skipped: 1 GPU"
    return PASS, f"{where} == written weights: {', '.join(done)}{skipped}"


FORWARD_SNIPPET = '''\
"""Written by tests/gpu_check.py: load at TP=tp, run the forward on fixed inputs, save each rank's logits."""
import sys

import torch

import sat_dist

path, tp, device, out = sys.argv[1], int(sys.argv[2]), sys.argv[3] or None, sys.argv[4]
for dtype in ("fp32", "bf16"):
    model = sat_dist.load_model(path, tp=tp, dtype=dtype, device=device, timeout_s=60)
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 16), generator=g).to(dev)
    pos = torch.arange(16).unsqueeze(0).expand(2, -1).to(dev)
    causal = torch.ones(1, 1, 16, 16).tril().to(dev)
    with torch.no_grad():
        logits = model(ids, pos, causal)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.save(logits.float().cpu(), f"{out}.{dtype}.rank{rank}.pt")
sat_dist.shutdown()
'''
FORWARD_TOL = {"fp32": 1e-5, "bf16": 2e-2}  # max |TP2 - TP1| / max |TP1|


def row_tp_forward(ctx: Ctx) -> Outcome:
    """A TP=2 forward equals the TP=1 forward within FORWARD_TOL (both loaded by sat_dist.load_model)."""
    import torch

    from sat_dist.demo import DEMO_MODEL

    if ctx.need(2):
        return SKIP, ctx.need(2)
    script = ctx.path("forward.py")
    with open(script, "w") as f:
        f.write(FORWARD_SNIPPET.replace("VOCAB", str(DEMO_MODEL.vocab_size)))
    device = "cpu" if ctx.cpu else ""
    for tp in (1, 2):
        torchrun(ctx, f"forward tp{tp}", tp, [ctx.sat_ckpt(), str(tp), device, ctx.path(f"logits_tp{tp}")],
                 script=script).ok(f"TP={tp} forward")
    parts = []
    for dtype, tol in FORWARD_TOL.items():
        ref = torch.load(ctx.path(f"logits_tp1.{dtype}.rank0.pt"))
        worst = 0.0
        for rank in (0, 1):
            got = torch.load(ctx.path(f"logits_tp2.{dtype}.rank{rank}.pt"))
            if got.shape != ref.shape:
                raise RowFail(f"{dtype} TP=2 rank {rank}: logits {tuple(got.shape)} != TP=1 {tuple(ref.shape)}")
            rel = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
            if not rel <= tol:
                raise RowFail(f"{dtype} TP=2 rank {rank}: max|diff|/max|ref| = {rel:.2e} > {tol:g}")
            worst = max(worst, rel)
        parts.append(f"{dtype} {worst:.1e} <= {tol:g}")
    return PASS, f"TP2 vs TP1 logits {tuple(ref.shape)}, max|diff|/max|ref|: {'; '.join(parts)}"


def row_exchange(ctx: Ctx) -> Outcome:
    """TP=1 x DP=2 with the exchange on and off: the same digests; on, the replicas received bytes."""
    if ctx.need(2):
        return SKIP, ctx.need(2)
    reps = {}
    for x in ("on", "off"):
        path = ctx.path(f"exchange_{x}.json")
        torchrun(ctx, f"exchange {x}", 2, load_args(ctx, 1, ["--exchange", x, "--report", path,
                                                            *ctx.device_args])).ok(f"--exchange {x}")
        reps[x] = sorted(report(path)["ranks"], key=lambda r: r["rank"])
    digests = {x: [r["digest"] for r in ranks] for x, ranks in reps.items()}
    want = ctx.expected_digests(1, "fp32") * 2
    if digests["on"] != digests["off"] or digests["off"] != want:
        raise RowFail(f"digests on {[d[:12] for d in digests['on']]} off {[d[:12] for d in digests['off']]} "
                      f"written {want[0][:12]}")
    received = [r["bytes_received"] for r in reps["on"]]
    if not sum(received) or any(r["bytes_received"] for r in reps["off"]):
        raise RowFail(f"bytes_received on {received}, off {[r['bytes_received'] for r in reps['off']]}: "
                      f"expected > 0 with the exchange on, 0 off")
    mib = " + ".join(f"{b / 2**20:.1f}" for b in received)
    return PASS, f"same digests on/off (== written weights); on: the ranks received {mib} MiB"


def _names_rank(text: str, rank: int) -> bool:
    return any(rank in {int(x) for x in m.group(1).split(",")} for m in re.finditer(r"rank\(s\) \[([0-9, ]+)\]", text))


def row_bounded_exit(ctx: Ctx, point: str) -> Outcome:
    """Rank 1 held at `point`: rank 0 exits 1 within FAULT_BOUND_S of starting to load, names rank 1,
    and writes the error report."""
    if ctx.need(2):
        return SKIP, ctx.need(2)
    marks = ctx.folder(f"marks_{point}")
    rep_path = ctx.path(f"bounded_{point}.json")
    extra = ["--exchange", "on"] if point == "exchange" else []
    args = load_args(ctx, 1, ["--timeout", f"{FAULT_TIMEOUT_S:g}", "--report", rep_path, *extra, *ctx.device_args])
    env = ctx.env({"SAT_DIST_TEST_PAUSE_DIR": marks, "SAT_DIST_TEST_PAUSE_AT": f"{point}@1",
                   "SAT_DIST_TEST_PAUSE_S": "60"})
    ranks, seen = launch_ranks(ctx, f"bounded-exit {point}", 2, args, env, timeout=FAULT_BOUND_S + 45, marks=marks,
                               stop_after=0)
    r0 = ranks[0]
    log = f"--- rank 0 stderr:\n{r0.err[-3000:]}\n--- rank 1 stderr:\n{ranks[1].err[-1500:]}"
    if f"{point}.1" not in seen:
        last = [ln for ln in r0.err.splitlines() if ln.strip()][-1:] or [""]
        raise RowFail(f"rank 1 never reached pause point '{point}' (is the hook in sat_dist/pause.py?); "
                      f"rank 0 exit {r0.rc}: {last[0][:120]}", log)
    if "rendezvous.0" not in seen or r0.exit_at is None:
        raise RowFail(f"rank 0 did not exit within {FAULT_BOUND_S + 45:.0f}s", log)
    took = r0.exit_at - seen["rendezvous.0"]
    problems = []
    if r0.rc != 1:
        problems.append(f"rank 0 exit {r0.rc} (expected 1)")
    if took > FAULT_BOUND_S:
        problems.append(f"rank 0 took {took:.1f}s > {FAULT_BOUND_S:g}s")
    if not _names_rank(r0.err, 1):
        problems.append("rank 0's stderr does not name rank(s) [1]")
    try:
        rep = report(rep_path)
        if rep.get("status") != "error":
            problems.append(f"report status {rep.get('status')!r}")
    except RowFail as exc:
        problems.append(exc.detail)
    if problems:
        raise RowFail("; ".join(problems), log)
    return PASS, f"rank 0 exit 1 after {took:.1f}s (--timeout {FAULT_TIMEOUT_S:g}), names rank 1, error report"


def row_oom_named(ctx: Ctx) -> Outcome:
    """Rank 1 runs out of device memory at the start of its read: every rank exits 1 naming rank 1
    and the error type."""
    if ctx.need(2):
        return SKIP, ctx.need(2)
    rep_path = ctx.path("oom.json")
    env = ctx.env({"SAT_DIST_TEST_FAIL_AT": "read@1", "SAT_DIST_TEST_FAIL": "oom"})
    ranks, _ = launch_ranks(ctx, "oom-named", 2, load_args(ctx, 1, ["--timeout", "60", "--report", rep_path,
                                                                     *ctx.device_args]), env, timeout=120)
    kind = "RuntimeError" if ctx.cpu else "OutOfMemoryError"
    log = "\n".join(f"--- rank {r} stderr:\n{x.err[-2000:]}" for r, x in enumerate(ranks))
    rcs = [x.rc for x in ranks]
    if rcs == [0, 0]:
        raise RowFail("both ranks loaded: no failure injected (is SAT_DIST_TEST_FAIL in sat_dist/pause.py?)", log)
    problems = [] if rcs == [1, 1] else [f"exit codes {rcs} (expected [1, 1])"]
    silent = [r for r, x in enumerate(ranks) if not _names_rank(x.err, 1)]
    if silent:
        problems.append(f"stderr of rank(s) {silent} does not name rank(s) [1]")
    if kind not in ranks[0].err:
        problems.append(f"rank 0's stderr does not name {kind}")
    try:
        rep = report(rep_path)
        causes = {f["rank"]: f["cause"] for f in rep.get("failures", [])}
        if rep.get("status") != "error" or kind not in causes.get(1, ""):
            problems.append(f"report: status {rep.get('status')!r}, failures {causes} (want rank 1: {kind})")
    except RowFail as exc:
        problems.append(exc.detail)
    if problems:
        raise RowFail("; ".join(problems), log)
    return PASS, f"both ranks exit 1 naming rank 1; report: rank 1 {causes[1][:70]}"


def row_bench_gpu(ctx: Ctx) -> Outcome:
    """`make bench-gpu BENCH_ARGS="--repeat 1"`: exits 0 and no method failed; the GiB/s per run."""
    if ctx.cpu:
        return SKIP, "needs CUDA (--cpu)"
    started = time.time()
    p = run(ctx, "bench-gpu", ["make", "-C", REPO, "--no-print-directory", "bench-gpu", "BENCH_ARGS=--repeat 1"],
            ctx.env(), timeout=300)
    ctx.fixtures.setdefault("notes", []).append(f"--- make bench-gpu (exit {p.rc}, {p.seconds:.0f}s)\n"
                                                + "\n".join(ln for ln in p.out.splitlines()[1:]))
    p.ok("make bench-gpu")
    parts, failed = bench_summary(os.path.join(REPO, ".cache", "bench"), started)
    if failed or not parts:
        raise RowFail("; ".join(failed) or "make bench-gpu wrote no .cache/bench/gpu_*.json")
    return PASS, f"GiB/s: {' | '.join(parts)}"


def bench_summary(folder: str, since: float) -> tuple[list[str], list[str]]:
    """From the gpu_*.json files `sat-dist bench` wrote into `folder` after `since`: per run its
    methods' GiB/s, and the methods that failed (bench reports those as skipped and still exits 0)."""
    parts, failed = [], []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not (name.startswith("gpu_") and name.endswith(".json")) or os.path.getmtime(path) < since:
            continue
        with open(path) as f:
            res = json.load(f)
        speeds = []
        for m in res["methods"]:
            if m.get("skipped"):
                if m["skipped"].startswith("failed"):
                    failed.append(f"{name[4:-5]} {m['method']}: {m['skipped'][:100]}")
                continue
            speeds.append(f"{m['method']} {m['summary']['gib_per_s']:.2f}")
        parts.append(f"{name[4:-5]}: {', '.join(speeds)}")
    return parts, failed


def row_engine_bf16(ctx: Ctx) -> Outcome:
    """The tiny CogVideoX engine sampled in bf16 via `sat-dist sample`: T2V and I2V, CFG parallel on
    and off (world 2; world 1 on one GPU): exit 0, the mp4 decodes, the report has each rank's memory."""
    import imageio.v3 as iio

    world = min(ctx.ranks, 2)
    modes = [("cfg-parallel", []), ("no-cfg-parallel", ["--no-cfg-parallel"])] if world == 2 else [("world-1", [])]
    done, peaks = [], []
    for kind, label in (("5b", "T2V"), ("15_i2v", "I2V")):
        folder = ctx.pipeline(kind)
        size = ["--image", ctx.fixtures["png"], "--frames", "9", "--height", "32", "--width", "48"] \
            if kind.endswith("i2v") else []
        for mode, flags in modes:
            out, rep_path = ctx.path(f"{kind}_{mode}.mp4"), ctx.path(f"{kind}_{mode}.json")
            argv = ["sample", "--model", folder, "--prompt", "a red panda eating bamboo", "--steps", "2", "--seed", "1",
                    "--dtype", "bf16", "--tp", "1", "--out", out, "--report", rep_path, *size, *flags,
                    *ctx.device_args]
            what = f"{label} {mode}"
            torchrun(ctx, f"engine {what}", world, argv, timeout=180).ok(what)
            shape = iio.imread(out).shape if os.path.isfile(out) else None
            if shape != (9, 32, 48, 3):
                raise RowFail(f"{what}: the mp4 decodes to {shape}, expected (9, 32, 48, 3)")
            rep = report(rep_path)
            if rep.get("cfg_parallel") != (mode == "cfg-parallel"):
                raise RowFail(f"{what}: report cfg_parallel {rep.get('cfg_parallel')}")
            ranks = rep.get("ranks", [])
            keys = ["peak_device_bytes"] + ([] if ctx.cpu else ["max_memory_reserved"])
            bad = [(r.get("rank"), k, r.get(k)) for r in ranks for k in keys if not (r.get(k) or 0) > 0]
            if len(ranks) != world or bad:
                raise RowFail(f"{what}: report ranks {len(ranks)}/{world}; missing or zero {bad}")
            if not ctx.cpu and [r["device"] for r in ranks] != [f"cuda:{i}" for i in range(world)]:
                raise RowFail(f"{what}: ran on {[r['device'] for r in ranks]}")
            peaks += [r["peak_device_bytes"] for r in ranks]
            done.append(what)
    mem = "peak RSS" if ctx.cpu else "peak device"
    note = "" if world == 2 else "; CFG parallel not checked: 1 GPU"
    return PASS, f"{', '.join(done)}: mp4s 9x32x48, {mem} <= {max(peaks) / 2**20:.0f} MiB{note}"


POINTS = ("tag", "read", "exchange", "agree")
ROWS: list[tuple[str, Callable[[Ctx], Outcome]]] = [
    ("env", row_env),
    ("digests", row_digests),
    ("tp-forward", row_tp_forward),
    ("exchange", row_exchange),
    *[(f"bounded-exit@{p}", functools.partial(row_bounded_exit, point=p)) for p in POINTS],
    ("oom-named", row_oom_named),
    ("engine-bf16", row_engine_bf16),
    ("bench-gpu", row_bench_gpu),  # last: the longest, so a slow bench cannot starve the checks of correctness
]


# --- the table --------------------------------------------------------------------------------------

def table(rows: list[tuple[str, str, str]]) -> str:
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{w}} | {status} | {detail}" for name, status, detail in rows)


def header(ctx: Ctx) -> str:
    import torch

    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    if ctx.cpu:
        where = f"--cpu: {ctx.ranks} ranks on the CPU (gloo)"
    else:
        names = sorted({torch.cuda.get_device_name(i) for i in range(ctx.gpus)})
        where = f"{ctx.gpus} GPU(s): {', '.join(names)}; CUDA {torch.version.cuda}"
    return (f"sat_dist gpu-check on {socket.gethostname()}: {where}; torch {torch.__version__}; commit {commit}; "
            f"work dir {ctx.work}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run the rows on the CPU with gloo (world 2); CUDA rows SKIP")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run only this row (a prefix matches: bounded-exit); repeatable")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (fixtures, reports, logs/)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all rows (default 450; 1800 with --cpu); rows past it FAIL")
    args = ap.parse_args(argv)
    rows = [(n, f) for n, f in ROWS if not args.only or any(n == o or n.startswith(o) for o in args.only)]
    if not rows:
        ap.error(f"--only {args.only} matches no row of {[n for n, _ in ROWS]}")
    t_start = time.monotonic()
    import torch

    gpus = 0 if args.cpu else torch.cuda.device_count()
    if not args.cpu and gpus == 0:
        build = f"a CPU build ({torch.__version__})" if torch.version.cuda is None else \
            f"{torch.__version__}, CUDA {torch.version.cuda}: is the driver new enough? CUDA_VISIBLE_DEVICES set?"
        print(table([("gpus", FAIL, f"no GPU visible (torch.cuda.device_count() == 0; torch is {build}); "
                                    "`tests/gpu_check.py --cpu` checks on the CPU")]))
        return 2
    budget = args.budget if args.budget is not None else (1800.0 if args.cpu else 450.0)
    work = tempfile.mkdtemp(prefix="sat-dist-gpu-check-")
    ctx = Ctx(cpu=args.cpu, gpus=gpus, work=work, deadline=t_start + budget)
    print(header(ctx), flush=True)
    results, logs = [], []
    try:
        for name, fn in rows:
            t0 = time.monotonic()
            try:
                status, detail = fn(ctx)
            except RowFail as exc:
                status, detail = FAIL, exc.detail
                if exc.log:
                    logs.append(f"=== {name}\n{exc.log}")
            except KeyboardInterrupt:
                results.append((name, FAIL, "interrupted (Ctrl-C); the rows after it did not run"))
                break
            except Exception as exc:  # a bug in a row or a fixture: the row fails, the others run
                status, detail = FAIL, f"{type(exc).__name__}: {exc}"
            detail = f"{detail} [{time.monotonic() - t0:.0f}s]"
            results.append((name, status, detail))
            print(f"[gpu-check] {name}: {status} {detail}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for text in ctx.fixtures.get("notes", []) + logs:
        print(text)
    print()
    print(table(results))
    failed = [n for n, s, _ in results if s == FAIL]
    print(f"\n{len(results) - len(failed)}/{len(results)} rows PASS or SKIP"
          f"{', FAILED: ' + ', '.join(failed) if failed else ''}; {time.monotonic() - t_start:.0f}s"
          f"{'; kept ' + work if args.keep else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
