"""`sat-dist bench CKPT --world W --tp T`: sat_dist beside the storage limit and other loaders,
timed in one run on the same files, each rank keeping exactly its TP slices.

Methods (each in `W` freshly forked ranks; imports, planning and process-group setup are not timed
except for sat_dist, whose own planning and agreement are part of its load):

  limit            each rank reads as many bytes as its shard needs, sequentially, into one fresh
                   `torch.empty` buffer (`readinto`): the storage + page-fault limit
  h2d              (CUDA) `copy_` of each rank's bytes from a pinned host buffer to its GPU, non_blocking,
                   to a synchronize (buffers filled untimed): the host-to-device ceiling
  sat_dist         `load_with_runtime` on the default path (exchange auto, no digest; onto
                   `cuda:LOCAL_RANK` where CUDA is present: one rank per GPU)
  sat_style        SAT: `torch.load` of the whole file on every rank, then clone the rank's slices
  mmap             `torch.load(mmap=True)`, then clone the slices (pages fault in on copy)
  safetensors      (.safetensors input) `safe_open` + `get_slice` of each fragment
  fastsafetensors  (.safetensors input, if installed) `SafeTensorsFileLoader` per rank, whole file
  runai            (.safetensors input, if installed) Run:ai `SafetensorsStreamer` per rank, whole file

Per method: seconds (median over `--repeat` rounds of the slowest rank), its CPU seconds (user + system
of the busiest rank: the cost without contention), per-rank bytes read from
storage (the method's own count; `io` is the kernel's storage read count from /proc/self/io, which
sees mmap faults too and is meaningful with `--cold`), bytes received, peak RSS, the job's GiB/s
(bytes kept by all ranks / seconds) and the ratio to `limit`. `--cold` drops the page cache before
every run: `/proc/sys/vm/drop_caches` when permitted (root), else `posix_fadvise(DONTNEED)`.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

from ..pagecache import evict
from .methods import GIB, METHODS, MIB, SAFETENSORS_ONLY, prepare, run_rank


@dataclass
class MethodResult:
    method: str
    rounds: list = field(default_factory=list)  # per round: list of per-rank Samples (as dicts)
    skipped: Optional[str] = None
    failed: bool = False  # a rank raised: shown like a skip, but `sat-dist bench` then exits 1

    def seconds(self) -> float:
        return statistics.median(max(s["seconds"] for s in r) for r in self.rounds)

    def worst(self, key: str) -> int:
        return max(s[key] for r in self.rounds for s in r)

    def median_max(self, key: str) -> float:
        """Median over rounds of the largest rank's value."""
        return statistics.median(max(s[key] for s in r) for r in self.rounds)

    def job(self, key: str) -> int:
        return max(sum(s[key] for s in r) for r in self.rounds)


# --- the page cache -----------------------------------------------------------------------------------

def drop_cache(files: Sequence[str]) -> str:
    """Evict `files` from the page cache; returns how ('drop_caches' or 'fadvise')."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "drop_caches"
    except OSError:
        for path in files:
            evict(path)
        return "fadvise"


def warm_cache(files: Sequence[str]) -> None:
    buf = bytearray(16 * MIB)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# --- orchestration ------------------------------------------------------------------------------------

def _rank_entry(rank: int, world: int, port: int, args: tuple, results, target: Optional[Callable] = None) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        results.put((rank, (target or run_rank)(rank, *args), None))
    except BaseException as exc:  # reported, not raised: the parent prints it
        results.put((rank, None, f"{type(exc).__name__}: {exc}"))


def start_ranks(world: int, args: tuple, timeout_s: float, target: Optional[Callable] = None,
                preload: Sequence[str] = ("torch", "sat_dist.bench.methods"),
                ) -> list[tuple[Optional[dict], Optional[str]]]:
    """Run `methods.run_rank(rank, *args)` (or `target(rank, *args)`, a module-level function) on
    `world` fresh processes (env as torchrun sets it); returns (value, error) per rank. They come from
    a fork server that has only imported torch and the bench's modules (`preload`): nothing the parent
    prepared (model builds, indexes) is inherited, as nothing is in a user's new process, and no rank
    pays the interpreter's start inside its timing."""
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_entry, args=(r, world, port, args, results, target)) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, tuple] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < world and time.monotonic() < deadline:
            try:
                rank, value, err = results.get(timeout=1.0)
                out[rank] = (value, err)
            except Exception:  # queue.Empty: check for ranks that died without a word
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    return [out.get(r, (None, "died or timed out")) for r in range(world)]


@dataclass
class BenchResult:
    """One `sat-dist bench` run: where, how, and each method's rounds."""

    checkpoint: str
    files: list  # the checkpoint files the ranks' plans touch
    file_bytes: int
    world: int
    tp: int
    cache: str = "warm"  # or "cold (drop_caches)" / "cold (fadvise)"
    repeat: int = 1
    methods: list = field(default_factory=list)  # MethodResult per method, in the order run

    def to_dict(self) -> dict:
        d = asdict(self)
        for m, res in zip(d["methods"], self.methods):
            if not res.skipped:
                m["summary"] = {"seconds": res.seconds(), "x_limit": self.ratio(res),
                                "max_rank_bytes_read": res.worst("bytes_read"), "job_bytes_read": res.job("bytes_read"),
                                "max_rank_bytes_received": res.worst("bytes_received"),
                                "max_peak_rss": res.worst("peak_rss"), "gib_per_s": self.gibs(res),
                                "cpu_seconds": res.median_max("cpu_seconds"),
                                "rendezvous_seconds": res.median_max("rendezvous_seconds")}
        return d

    def _limit(self) -> Optional[MethodResult]:
        return next((m for m in self.methods if m.method == "limit" and not m.skipped), None)

    def ratio(self, res: MethodResult) -> Optional[float]:
        lim = self._limit()
        return res.seconds() / lim.seconds() if lim else None

    def gibs(self, res: MethodResult) -> float:
        return res.job("bytes_kept") / GIB / max(res.seconds(), 1e-9)

    def table(self) -> str:
        lines = [f"{self.checkpoint}: {self.file_bytes / GIB:.2f} GiB in {len(self.files)} file(s); world {self.world}, "
                 f"TP {self.tp}, cache {self.cache}, median of {self.repeat} round(s), slowest rank per round",
                 f"{'method':<16} {'s':>7} {'x limit':>8} {'GiB/s':>7} {'read/rank MiB':>14} {'job read/file':>13} "
                 f"{'recv/rank MiB':>14} {'io/rank MiB':>12} {'peak RSS MiB':>13} {'RSS growth MiB':>15} {'CPU s':>6} "
                 f"{'rdzv s':>6}"]
        for res in self.methods:
            if res.skipped:
                lines.append(f"{res.method:<16} skipped: {res.skipped}")
                continue
            ratio = self.ratio(res)
            lines.append(f"{res.method:<16} {res.seconds():>7.2f} {'' if ratio is None else f'{ratio:.2f}':>8} "
                         f"{self.gibs(res):>7.2f} {res.worst('bytes_read') / MIB:>14.1f} "
                         f"{res.job('bytes_read') / max(1, self.file_bytes):>13.2f} "
                         f"{res.worst('bytes_received') / MIB:>14.1f} {res.worst('io_read') / MIB:>12.1f} "
                         f"{res.worst('peak_rss') / MIB:>13.0f} {res.worst('rss_growth') / MIB:>15.0f} "
                         f"{res.median_max('cpu_seconds'):>6.2f} "
                         f"{res.median_max('rendezvous_seconds') if res.method == 'sat_dist' else 0:>6.2f}")
        return "\n".join(lines)


def _available(method: str, safetensors_input: bool, world: int, overrides: Sequence[str]) -> Optional[str]:
    """Why `method` cannot run here, or None. GPUs are counted through NVML, which leaves the
    parent free of CUDA: the ranks are forked, and CUDA does not survive a fork."""
    import torch

    gpus = torch.cuda.device_count()
    if method in SAFETENSORS_ONLY and not safetensors_input:
        return "needs a .safetensors checkpoint"
    if method == "h2d" and gpus == 0:
        return "needs CUDA (no GPU visible here)"
    if method == "sat_dist" and gpus and world > gpus and not any(o.startswith("load.device=") for o in overrides):
        return (f"world {world} > {gpus} GPU(s): NCCL needs one GPU per rank; pass --world {gpus} or "
                f"load.device=cpu")
    module = {"fastsafetensors": "fastsafetensors", "runai": "runai_model_streamer", "safetensors": "safetensors"}
    if method in module:
        import importlib.util

        if importlib.util.find_spec(module[method]) is None:
            return f"{module[method]} is not installed (pip install {module[method].replace('_', '-')})"
    return None


def run_bench(ckpt: str, world: int, tp: int, cold: bool = False, repeat: int = 1,
              methods: Sequence[str] = METHODS, configs: Sequence[str] = (), overrides: Sequence[str] = (),
              timeout_s: float = 1800.0, log: Callable[[str], None] = print) -> BenchResult:
    _, _, _, plan = prepare(0, ckpt, tp, configs, overrides)
    files = sorted({f for r in range(tp) for f in prepare(r, ckpt, tp, configs, overrides)[3].files}) \
        if tp > 1 else plan.files
    result = BenchResult(ckpt, files, sum(os.path.getsize(f) for f in files), world, tp, repeat=repeat)
    is_st = all(f.endswith(".safetensors") for f in files)
    for method in methods:
        res = MethodResult(method, skipped=_available(method, is_st, world, overrides))
        result.methods.append(res)
    if not cold:  # a known state: how earlier runs left the page cache (small folios after exact cold
        # reads, pages evicted since) changes mapped copies by up to 2x, so drop it once; each run then
        # reads the files sequentially first (the first time from storage, as a first read of a
        # checkpoint would; later, only pages evicted since)
        result.cache = f"warm (after {drop_cache(files)} and one sequential read)"
    for rnd in range(repeat):
        for res in result.methods:
            if res.skipped:
                continue
            if cold:
                result.cache = f"cold ({drop_cache(files)})"
            else:
                warm_cache(files)
            out = start_ranks(world, (res.method, ckpt, world, tp, list(configs), list(overrides)), timeout_s)
            bad = [(r, err) for r, (_, err) in enumerate(out) if err]
            if bad:
                res.skipped, res.failed = f"failed on rank {bad[0][0]}: {bad[0][1]}", True
                continue
            skipped = next((v["skipped"] for v, _ in out if "skipped" in v), None)
            if skipped:
                res.skipped = skipped
                continue
            res.rounds.append([v for v, _ in out])
            log(f"round {rnd + 1}/{repeat} {res.method}: {max(v['seconds'] for v, _ in out):.2f}s")
    return result


def cmd_bench(args) -> int:
    methods = args.methods or list(METHODS)
    result = run_bench(args.checkpoint, args.world, args.tp, args.cold, args.repeat, methods, args.config,
                       args.overrides)
    print(result.table(), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
    failed = [m.method for m in result.methods if m.failed]
    if failed:  # `make bench-gpu` must not pass when sat_dist's GPU load failed
        print(f"sat-dist bench: {', '.join(failed)} failed (see the table)", file=sys.stderr, flush=True)
        return 1
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time sat_dist beside the storage limit and other loaders on the same files")
    p.add_argument("checkpoint", help="any checkpoint sat_dist loads")
    p.add_argument("--world", type=int, required=True, help="ranks to fork on this machine")
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel size")
    p.add_argument("--cold", action="store_true", help="drop the page cache before every run")
    p.add_argument("--repeat", type=int, default=1, help="rounds (medians are reported)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every sample and the summary here")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None, help=f"subset of {', '.join(METHODS)}")
    p.add_argument("--config", nargs="+", default=[], metavar="YAML", help="model YAMLs, as for `load`")
    p.set_defaults(overrides=[])
