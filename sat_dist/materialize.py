"""Execute a ReadPlan: allocate each local tensor once on the device, pread only planned bytes.

A small pool of reader threads (`os.preadv` releases the GIL) reads ahead of the thread that
places the bytes, so reading, casting and copying to the device overlap:

* CPU, stored dtype, contiguous destination box: the readers pread straight into the tensor.
* Otherwise: into one of `readers + 1` staging buffers (pinned for CUDA), then `copy_` into the
  destination box, which casts and moves. On CUDA the copy from the pinned buffer is `non_blocking`
  (into a device staging buffer when it must also cast or scatter, which then happens on the GPU),
  and an event per buffer says when the readers may refill it: the next read overlaps the transfer.

Host memory is the local shard (CPU) plus the staging buffers (the planner cuts every op to the
staging budget divided by the number of buffers), never the checkpoint size. `bytes_read` counts
exactly what was fetched. `read` restricts the reads to a subset of the targets (the exchange's
share of this rank; the others arrive by broadcast).
"""
from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Collection, Optional

import torch

from .errors import CheckpointError
from .plan import CopyOp, ReadPlan

READERS = 4  # reader threads per rank, at most (by default)


def pick_readers(requested: Optional[int], local_ranks: int) -> int:
    """`requested`, else this rank's share of the host's cores, between 1 and READERS: page-cache
    reads are memory copies, and more threads than cores only contend."""
    if requested:
        return requested
    return max(1, min(READERS, (os.cpu_count() or 1) // max(1, local_ranks)))


def staging_slots(readers: int = READERS) -> int:
    """How many staging buffers a rank with `readers` threads uses (the op size is budget / this)."""
    return readers + 1


@dataclass
class ReadStats:
    bytes_read: int = 0


class _Files:
    """File descriptors opened on first use, shared by the reader threads."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self.lock = threading.Lock()

    def fd(self, path: str) -> int:
        with self.lock:
            fd = self.fds.get(path)
            if fd is None:
                try:
                    fd = self.fds[path] = os.open(path, os.O_RDONLY)
                except OSError as exc:
                    raise CheckpointError(f"cannot open {path}: {exc}") from exc
                # The plan says exactly which bytes this rank needs: kernel readahead past a run only
                # fetches other ranks' rows (a row split reads one short run per row), so turn it off.
                # Each preadv still goes to storage as one request of its full length.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _read_op(files: _Files, op: CopyOp, buf: torch.Tensor) -> int:
    """pread every byte run of `op` into `buf` (uint8, op.nbytes), in order."""
    fd = files.fd(op.file)
    view = memoryview(buf.numpy()).cast("B")
    pos = 0
    for rs in op.runs:
        for i in range(rs.count):
            offset, end = rs.first + i * rs.step, pos + rs.length
            while pos < end:
                n = os.preadv(fd, [view[pos:end]], offset)
                if n <= 0:
                    raise CheckpointError(
                        f"{op.file}: unexpected end of file at byte {offset} while reading tensor {op.name!r}; "
                        f"the file is truncated: copy it again")
                pos += n
                offset += n
    return pos


class _Slot:
    """One staging buffer: host bytes the readers fill (pinned for CUDA), a device twin for copies
    that cast or scatter on the GPU, and the event after which the host bytes may be refilled."""

    def __init__(self, nbytes: int, device: torch.device):
        cuda = device.type == "cuda"
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        self.dev = torch.empty(nbytes, dtype=torch.uint8, device=device) if cuda else None
        self.event = torch.cuda.Event() if cuda else None

    def ready(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def place(self, op: CopyOp, dst: torch.Tensor) -> None:
        src = self.host[: op.nbytes]
        if self.dev is None:
            dst.copy_(src.view(op.src_dtype).view(op.shape))
            return
        if dst.dtype == op.src_dtype and dst.is_contiguous():
            dst.copy_(src.view(op.src_dtype).view(op.shape), non_blocking=True)
        else:  # H2D in the stored dtype, then cast/scatter on the GPU
            dev = self.dev[: op.nbytes]
            dev.copy_(src, non_blocking=True)
            self.event.record()
            dst.copy_(dev.view(op.src_dtype).view(op.shape))
            return
        self.event.record()


def _slices(op: CopyOp) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(op.dst.offsets, op.dst.sizes))


def materialize(plan: ReadPlan, device: torch.device, read: Optional[Collection[str]] = None,
                readers: int = READERS, on_bytes: Optional[Callable[[int], None]] = None,
                ) -> tuple[dict[str, torch.Tensor], ReadStats]:
    """Allocate every target on `device` and fill those in `read` (default: all) by executing
    their ops with `readers` threads; `on_bytes(n)` is told of every op's bytes (progress)."""
    stats = ReadStats()
    tensors = {name: torch.empty(t.shape, dtype=t.dtype, device=device) for name, t in plan.targets.items()}
    ops = [op for op in plan.ops if read is None or op.name in read]
    dsts = [tensors[op.name][_slices(op)] if op.dst.sizes else tensors[op.name] for op in ops]
    direct = [d.device.type == "cpu" and d.dtype == op.src_dtype and d.is_contiguous() for op, d in zip(ops, dsts)]
    staged = [op.nbytes for op, dr in zip(ops, direct) if not dr]
    free = deque(_Slot(max(staged), device) for _ in range(staging_slots(readers) if staged else 0))
    pending: deque[tuple[CopyOp, Future, torch.Tensor, Optional[_Slot]]] = deque()

    def finish() -> None:
        op, fut, dst, slot = pending.popleft()
        n = fut.result()
        stats.bytes_read += n
        if slot is not None:
            slot.place(op, dst)
            free.append(slot)
        if on_bytes is not None:
            on_bytes(n)

    files = _Files()
    try:
        with ThreadPoolExecutor(max(1, readers), thread_name_prefix="sat_dist-read") as pool:
            try:
                for op, dst, dr in zip(ops, dsts, direct):
                    slot = None
                    if not dr:
                        while not free:
                            finish()
                        slot = free.popleft()
                        slot.ready()
                    buf = dst.reshape(-1).view(torch.uint8) if dr else slot.host[: op.nbytes]
                    pending.append((op, pool.submit(_read_op, files, op, buf), dst, slot))
                    while len(pending) > 2 * readers:
                        finish()
                while pending:
                    finish()
            finally:  # on an error, let the reads in flight end before buffers and fds go
                for _, fut, _, _ in pending:
                    fut.cancel()
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
    finally:
        files.close()
    return tensors, stats
