"""The methods `sat-dist bench` times, each run on one forked rank: prepare (untimed), load the
rank's TP slices the method's way, measure seconds, bytes, RSS (see `sat_dist.bench`)."""
from __future__ import annotations

import os
import resource
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

METHODS = ("limit", "h2d", "sat_dist", "sat_style", "mmap", "safetensors", "fastsafetensors", "runai")
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
    cpu_seconds: float = 0.0  # user + system CPU of the rank's process (all threads): cost without contention
    rendezvous_seconds: float = 0.0  # sat_dist: joining the group and creating its groups, timed apart from the load


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


def prepare(rank: int, ckpt: str, tp: int, configs: Sequence[str], overrides: Sequence[str]):
    """Untimed: this rank's config, specs, checkpoint prefix and plan (every rank reading all it needs)."""
    from .. import formats
    from ..config import resolve
    from ..formats.base import IndexRequest
    from ..models import TPInfo, build_meta_model, collect_specs
    from ..plan import make_plan

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


def _whole_file(plan) -> str:
    if len(plan.files) != 1:
        raise _Skip(f"needs a single-file checkpoint (this one spans {len(plan.files)} files)")
    return plan.files[0]


def _torch_full(path: str, mmap: bool):
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    return obj.get("module", obj) if isinstance(obj, dict) else obj


def _torch_file(rank, tp, specs, prefix, plan, mmap: bool):
    """SAT-style (`mmap=False`: the whole file read by torch.load) or naive mmap, then the slices."""
    path = _whole_file(plan)
    if path.endswith(".safetensors"):
        raise _Skip("SAT reads torch files; safe_open is the mmap path for .safetensors (see `safetensors`)")
    sd = _torch_full(path, mmap=mmap)
    kept = _keep(specs, prefix, tp, rank % tp, lambda k, sl: sd[k][sl])
    return (sum(t.numel() * t.element_size() for t in kept.values()) if mmap else os.path.getsize(path)), 0, kept


def _sat_style(rank, tp, specs, prefix, plan, **_):
    return _torch_file(rank, tp, specs, prefix, plan, mmap=False)


def _mmap(rank, tp, specs, prefix, plan, **_):
    return _torch_file(rank, tp, specs, prefix, plan, mmap=True)


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


def _h2d(rank: int, nbytes: int) -> float:
    """Seconds to `copy_` the rank's `nbytes` from a pinned host buffer (filled untimed) to a
    buffer on its GPU (`cuda:LOCAL_RANK`, allocated untimed), non_blocking, to a synchronize: the
    host-to-device ceiling a CUDA load's staging copies can reach, beside which a CUDA sat_dist
    load's GiB/s is read."""
    dev = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    dst.copy_(host, non_blocking=True)
    torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


class _Skip(Exception):
    """This method does not apply to this checkpoint (the message says why)."""


RANK_METHODS = {"limit": _limit, "sat_style": _sat_style, "mmap": _mmap,
                "safetensors": _safetensors, "fastsafetensors": _fastsafetensors, "runai": _runai}


def run_rank(rank: int, method: str, ckpt: str, world: int, tp: int, configs, overrides) -> dict:
    """One rank, in a fresh (spawned) process: run `method`, measure. The other methods get their
    plan prepared untimed; sat_dist's timed load is the first time its load path runs in the process
    (as in a user's `torchrun ... sat_dist load`), with the rendezvous timed on its own. Threads per
    rank: the cores / world."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if method == "sat_dist":
        from .. import collectives as C
        from ..config import resolve
        from ..launch import detect_launch
        from ..loader import load_with_runtime

        base, io0, cpu0 = _rss_now(), _io_read(), _cpu()
        t0 = time.perf_counter()
        cfg = resolve(ckpt, list(configs), list(overrides), tp=tp)  # timed: part of what a load does
        cfg.progress = False
        r0 = time.perf_counter()
        rt = C.setup(detect_launch(timeout_s=cfg.timeout_s), tp, cfg.device, cfg.timeout_s)
        rendezvous = time.perf_counter() - r0  # its own column: the limit has no group to join
        try:
            model, rep = load_with_runtime(rt, cfg)
            seconds = time.perf_counter() - t0 - rendezvous
            kept_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            del model
        finally:
            C.teardown(rt)
        mine = rep.ranks[rank]
        read, received = mine.bytes_read, mine.bytes_received
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return asdict(Sample(seconds, read, received, kept_bytes, peak, max(0, peak - base), _io_read() - io0,
                             _cpu() - cpu0, round(rendezvous, 4)))
    cfg, specs, prefix, plan = prepare(rank, ckpt, tp, configs, overrides)
    kept_bytes = sum(t.stored_nbytes for t in plan.targets.values())
    base, io0, cpu0 = _rss_now(), _io_read(), _cpu()
    if method == "h2d":
        seconds, read, received = _h2d(rank, kept_bytes), 0, 0
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
    return asdict(Sample(seconds, read, received, kept_bytes, peak, max(0, peak - base), _io_read() - io0,
                         _cpu() - cpu0))


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


