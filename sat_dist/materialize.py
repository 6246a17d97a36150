"""Execute a ReadPlan: allocate each local tensor once on the device, pread only planned bytes.

Reads go straight into the destination tensor when it is on the CPU, has the stored dtype and the
destination box is contiguous; otherwise into one reused host staging buffer (pinned for CUDA)
followed by a `copy_` that casts and moves. Host memory is thus bounded by the local shard plus
the staging budget, never by the checkpoint size. `bytes_read` counts exactly what was fetched.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import CheckpointError
from .plan import CopyOp, ReadPlan


@dataclass
class ReadStats:
    bytes_read: int = 0


def _pread_into(fd: int, view: memoryview, offset: int, path: str, op: CopyOp) -> int:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(
                f"{path}: unexpected end of file at byte {offset + done} while reading tensor {op.name!r}; "
                f"the file is truncated: copy it again"
            )
        done += n
    return done


def _slices(op: CopyOp) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(op.dst.offsets, op.dst.sizes))


def materialize(plan: ReadPlan, device: torch.device) -> tuple[dict[str, torch.Tensor], ReadStats]:
    """Allocate every target on `device` and fill it by executing `plan.ops` in order."""
    stats = ReadStats()
    tensors = {name: torch.empty(t.shape, dtype=t.dtype, device=device) for name, t in plan.targets.items()}
    # The planner already cut ops to the staging budget; one buffer of the largest op is reused.
    largest = max((op.nbytes for op in plan.ops), default=0)
    staging: Optional[torch.Tensor] = None
    fds: dict[str, int] = {}
    try:
        for op in plan.ops:
            fd = fds.get(op.file)
            if fd is None:
                try:
                    fd = fds[op.file] = os.open(op.file, os.O_RDONLY)
                except OSError as exc:
                    raise CheckpointError(f"cannot open {op.file}: {exc}") from exc
            dst = tensors[op.name][_slices(op)] if op.dst.sizes else tensors[op.name]
            direct = dst.device.type == "cpu" and dst.dtype == op.src_dtype and dst.is_contiguous()
            if not direct and staging is None:
                staging = torch.empty(largest, dtype=torch.uint8,
                                      pin_memory=device.type == "cuda" and torch.cuda.is_available())
            buf = dst.reshape(-1).view(torch.uint8) if direct else staging[: op.nbytes]
            view = memoryview(buf.numpy()).cast("B")
            pos = 0
            for runset in op.runs:
                for offset, length in runset.runs():
                    pos += _pread_into(fd, view[pos: pos + length], offset, op.file, op)
            stats.bytes_read += pos
            if not direct:
                dst.copy_(buf.view(op.src_dtype).view(op.shape))
    finally:
        for fd in fds.values():
            os.close(fd)
    return tensors, stats
