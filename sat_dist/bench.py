"""`sat-dist bench CKPT --world W --tp T`: sat_dist beside the storage limit and other loaders,
timed in one run on the same files, each rank keeping exactly its TP slices.

Methods (each in `W` freshly forked ranks; imports, planning and process-group setup are not timed
except for sat_dist, whose own planning and agreement are part of its load):

  limit            each rank reads as many bytes as its shard needs, sequentially, into one fresh
                   `torch.empty` buffer (`readinto`): the storage + page-fault limit
  sat_dist         `load_with_runtime` on the default path (exchange auto, no digest)
  sat_style        SAT: `torch.load` of the whole file on every rank, then clone the rank's slices
  mmap             `torch.load(mmap=True)`, then clone the slices (pages fault in on copy)
  safetensors      (.safetensors input) `safe_open` + `get_slice` of each fragment
  fastsafetensors  (.safetensors input, if installed) `SafeTensorsFileLoader` per rank, whole file
  runai            (.safetensors input, if installed) Run:ai `SafetensorsStreamer` per rank, whole file

Per method: seconds (median over `--repeat` rounds of the slowest rank), per-rank bytes read from
storage (the method's own count; `io` is the kernel's storage read count from /proc/self/io, which
sees mmap faults too and is meaningful with `--cold`), bytes received, peak RSS, the job's GiB/s
(bytes kept by all ranks / seconds) and the ratio to `limit`. `--cold` drops the page cache before
every run: `/proc/sys/vm/drop_caches` when permitted (root), else `posix_fadvise(DONTNEED)`.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch

METHODS = ("limit", "sat_dist", "sat_style", "mmap", "safetensors", "fastsafetensors", "runai")
SAFETENSORS_ONLY = ("safetensors", "fastsafetensors", "runai")
MIB, GIB = 1 << 20, 1 << 30


@dataclass
class Sample:
    """One rank's run of one method."""

    seconds: float
    bytes_read: int
    bytes_received: int
    bytes_kept: int  # the rank's local tensors
    peak_rss: int
    rss_growth: int
    io_read: int  # /proc/self/io read_bytes delta


@dataclass
class MethodResult:
    method: str
    rounds: list = field(default_factory=list)  # per round: list of per-rank Samples (as dicts)
    skipped: Optional[str] = None

    def seconds(self) -> float:
        return statistics.median(max(s["seconds"] for s in r) for r in self.rounds)

    def worst(self, key: str) -> int:
        return max(s[key] for r in self.rounds for s in r)

    def job(self, key: str) -> int:
        return max(sum(s[key] for s in r) for r in self.rounds)


# --- measuring a rank --------------------------------------------------------------------------------

def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _io_read() -> int:
    try:
        with open("/proc/self/io") as f:
            return int(dict(line.split(": ") for line in f.read().splitlines())["read_bytes"])
    except (OSError, KeyError, ValueError):
        return 0


def _prepare(rank: int, ckpt: str, tp: int, configs: Sequence[str], overrides: Sequence[str]):
    """Untimed: this rank's config, specs, checkpoint prefix and plan (every rank reading all it needs)."""
    from . import formats
    from .config import resolve
    from .formats.base import IndexRequest
    from .models import TPInfo, build_meta_model, collect_specs
    from .plan import make_plan

    cfg = resolve(ckpt, list(configs), list(overrides), tp=tp)
    model = build_meta_model(cfg.model, TPInfo(tp, rank % tp))
    specs = collect_specs(model)
    prefix = getattr(model, "checkpoint_prefix", "")
    index, prefer = formats.open_index(IndexRequest(cfg.checkpoint, specs, tp, rank % tp, cfg.tag, prefix, cfg.weights))
    specs = {n: s for n, s in specs.items() if n not in index.meta.get("absent", {})}
    return cfg, specs, prefix, make_plan(specs, tp, rank % tp, index, cfg.torch_dtype, prefer)


def _keep(specs, prefix: str, tp: int, tp_rank: int, fragment: Callable[[str, tuple], torch.Tensor]) -> dict:
    """The rank's local tensors, each fragment fetched by `fragment(key, slices)` and copied."""
    out = {}
    for name, spec in specs.items():
        placement = spec.placement(tp, tp_rank)
        local = None
        for frag in placement.fragments(spec.global_shape):
            src = fragment(prefix + name, tuple(slice(o, o + s) for o, s in zip(frag.logical.offsets, frag.logical.sizes)))
            if local is None:
                local = torch.empty(placement.local_shape(spec.global_shape), dtype=src.dtype)
            local[tuple(slice(o, o + s) for o, s in zip(frag.local_offsets, frag.logical.sizes))] = src
        out[name] = local
    return out


def _limit(rank, world, plan, **_) -> tuple[int, int, dict]:
    """Read the rank's byte count sequentially (its slice of the files, wrapping) into torch.empty."""
    need = plan.bytes_to_read
    files = plan.files
    sizes = [os.path.getsize(f) for f in files]
    buf = torch.empty(need, dtype=torch.uint8)
    view = memoryview(buf.numpy()).cast("B")
    pos, start = 0, (rank * need) % max(1, sum(sizes))
    while pos < need:
        for f, size in zip(files, sizes):
            if start >= size:
                start -= size
                continue
            with open(f, "rb", buffering=0) as fh:
                fh.seek(start)
                while pos < need:
                    n = fh.readinto(view[pos: min(need, pos + 16 * MIB)])
                    if not n:
                        break
                    pos += n
            start = 0
    return pos, 0, {"buf": buf}


def _sat_dist(rank, world, tp, cfg, **_) -> tuple[int, int, dict]:
    return 0, 0, {}  # measured in _run_rank (it owns the process group)


def _whole_file(plan) -> str:
    if len(plan.files) != 1:
        raise _Skip(f"needs a single-file checkpoint (this one spans {len(plan.files)} files)")
    return plan.files[0]


def _torch_full(path: str, mmap: bool):
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    return obj.get("module", obj) if isinstance(obj, dict) else obj


def _sat_style(rank, tp, specs, prefix, plan, **_):
    path = _whole_file(plan)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        sd = _torch_full(path, mmap=False)
    kept = _keep(specs, prefix, tp, rank % tp, lambda k, sl: sd[k][sl])
    return os.path.getsize(path), 0, kept


def _mmap(rank, tp, specs, prefix, plan, **_):
    path = _whole_file(plan)
    if path.endswith(".safetensors"):
        raise _Skip("see `safetensors` (safe_open is the mmap path for .safetensors)")
    sd = _torch_full(path, mmap=True)
    kept = _keep(specs, prefix, tp, rank % tp, lambda k, sl: sd[k][sl])
    return sum(t.numel() * t.element_size() for t in kept.values()), 0, kept


def _safetensors(rank, tp, specs, prefix, plan, **_):
    from safetensors import safe_open

    with safe_open(_whole_file(plan), framework="pt") as f:
        kept = _keep(specs, prefix, tp, rank % tp, lambda k, sl: f.get_slice(k)[sl])
    return sum(t.numel() * t.element_size() for t in kept.values()), 0, kept


def _fastsafetensors(rank, tp, specs, prefix, plan, **_):
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup

    path = _whole_file(plan)
    loader = SafeTensorsFileLoader(SingleGroup(), device="cpu", nogds=True, set_numa=False)
    try:
        loader.add_filenames({0: [path]})
        fb = loader.copy_files_to_device()
        kept = _keep(specs, prefix, tp, rank % tp, lambda k, sl: fb.get_tensor(k)[sl])
        fb.close()
    finally:
        loader.close()
    return os.path.getsize(path), 0, kept


def _runai(rank, tp, specs, prefix, plan, **_):
    from runai_model_streamer import SafetensorsStreamer

    path, full = _whole_file(plan), {}
    with SafetensorsStreamer() as streamer:
        streamer.stream_file(path)
        for name, t in streamer.get_tensors():
            full[name] = t
        kept = _keep(specs, prefix, tp, rank % tp, lambda k, sl: full[k][sl])
    return os.path.getsize(path), 0, kept


class _Skip(Exception):
    """This method does not apply to this checkpoint (the message says why)."""


RANK_METHODS = {"limit": _limit, "sat_dist": _sat_dist, "sat_style": _sat_style, "mmap": _mmap,
                "safetensors": _safetensors, "fastsafetensors": _fastsafetensors, "runai": _runai}


def _run_rank(rank: int, method: str, ckpt: str, world: int, tp: int, configs, overrides) -> dict:
    """One forked rank: prepare (untimed), run `method`, measure."""
    cfg, specs, prefix, plan = _prepare(rank, ckpt, tp, configs, overrides)
    kept_bytes = sum(t.stored_nbytes for t in plan.targets.values())
    base, io0 = _rss_now(), _io_read()
    if method == "sat_dist":
        from . import collectives as C
        from .launch import detect_launch
        from .loader import load_with_runtime

        cfg.progress = False
        rt = C.setup(detect_launch(), tp, cfg.device, cfg.timeout_s)
        t0 = time.perf_counter()
        try:
            _, rep = load_with_runtime(rt, cfg)
            seconds = time.perf_counter() - t0
        finally:
            C.teardown(rt)
        mine = rep.ranks[rank]
        read, received = mine.bytes_read, mine.bytes_received
    else:
        t0 = time.perf_counter()
        try:
            read, received, kept = RANK_METHODS[method](rank=rank, world=world, tp=tp, cfg=cfg, specs=specs,
                                                         prefix=prefix, plan=plan)
        except _Skip as exc:
            return {"skipped": str(exc)}
        seconds = time.perf_counter() - t0
        del kept
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return asdict(Sample(seconds, read, received, kept_bytes, peak, max(0, peak - base), _io_read() - io0))


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
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"


def warm_cache(files: Sequence[str]) -> None:
    buf = bytearray(16 * MIB)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# --- orchestration ------------------------------------------------------------------------------------

@dataclass
class BenchResult:
    checkpoint: str
    files: list
    file_bytes: int
    world: int
    tp: int
    cache: str
    repeat: int
    methods: list

    def to_dict(self) -> dict:
        d = asdict(self)
        for m, res in zip(d["methods"], self.methods):
            if not res.skipped:
                m["summary"] = {"seconds": res.seconds(), "x_limit": self.ratio(res),
                                "max_rank_bytes_read": res.worst("bytes_read"), "job_bytes_read": res.job("bytes_read"),
                                "max_rank_bytes_received": res.worst("bytes_received"),
                                "max_peak_rss": res.worst("peak_rss"), "gib_per_s": self.gibs(res)}
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
                 f"{'recv/rank MiB':>14} {'io/rank MiB':>12} {'peak RSS MiB':>13} {'RSS growth MiB':>15}"]
        for res in self.methods:
            if res.skipped:
                lines.append(f"{res.method:<16} skipped: {res.skipped}")
                continue
            ratio = self.ratio(res)
            lines.append(f"{res.method:<16} {res.seconds():>7.2f} {'' if ratio is None else f'{ratio:.2f}':>8} "
                         f"{self.gibs(res):>7.2f} {res.worst('bytes_read') / MIB:>14.1f} "
                         f"{res.job('bytes_read') / max(1, self.file_bytes):>13.2f} "
                         f"{res.worst('bytes_received') / MIB:>14.1f} {res.worst('io_read') / MIB:>12.1f} "
                         f"{res.worst('peak_rss') / MIB:>13.0f} {res.worst('rss_growth') / MIB:>15.0f}")
        return "\n".join(lines)


def _available(method: str, safetensors_input: bool) -> Optional[str]:
    """Why `method` cannot run here, or None."""
    if method in SAFETENSORS_ONLY and not safetensors_input:
        return "needs a .safetensors checkpoint"
    module = {"fastsafetensors": "fastsafetensors", "runai": "runai_model_streamer", "safetensors": "safetensors"}
    if method in module:
        import importlib.util

        if importlib.util.find_spec(module[method]) is None:
            return f"{module[method]} is not installed (pip install {module[method].replace('_', '-')})"
    return None


def run_bench(ckpt: str, world: int, tp: int, cold: bool = False, repeat: int = 1,
              methods: Sequence[str] = METHODS, configs: Sequence[str] = (), overrides: Sequence[str] = (),
              timeout_s: float = 1800.0, log: Callable[[str], None] = print) -> BenchResult:
    from .testing.dist import run_ranks

    _, _, _, plan = _prepare(0, ckpt, tp, configs, overrides)
    files = sorted({f for r in range(tp) for f in _prepare(r, ckpt, tp, configs, overrides)[3].files}) \
        if tp > 1 else plan.files
    result = BenchResult(ckpt, files, sum(os.path.getsize(f) for f in files), world, tp, "warm", repeat, [])
    is_st = all(f.endswith(".safetensors") for f in files)
    for method in methods:
        res = MethodResult(method, skipped=_available(method, is_st))
        result.methods.append(res)
    if not cold:
        warm_cache(files)
    for rnd in range(repeat):
        for res in result.methods:
            if res.skipped:
                continue
            if cold:
                result.cache = f"cold ({drop_cache(files)})"
            out = run_ranks(world, _run_rank, res.method, ckpt, world, tp, list(configs), list(overrides),
                            timeout=timeout_s)
            bad = [r for r in out if not r.ok]
            if bad:
                res.skipped = f"failed on rank {bad[0].rank}: {bad[0].error_type}: {bad[0].error}"
                continue
            skipped = next((r.value["skipped"] for r in out if "skipped" in r.value), None)
            if skipped:
                res.skipped = skipped
                continue
            res.rounds.append([r.value for r in out])
            log(f"round {rnd + 1}/{repeat} {res.method}: {max(r.value['seconds'] for r in out):.2f}s")
    return result


def cmd_bench(args) -> int:
    methods = args.methods or list(METHODS)
    result = run_bench(args.checkpoint, args.world, args.tp, args.cold, args.repeat, methods, args.config,
                       args.overrides)
    print(result.table(), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
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
