"""The load report: per-rank facts every load proves about itself, and the state-dict digest.

The digest is defined independently of sat_dist's internals so anyone can compare a load with
another loader, TP size or launcher without trusting this code.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

import torch


def _digest_records(name: str, t: torch.Tensor) -> tuple[bytes, bytes]:
    t = t.detach().contiguous().cpu()
    head = f"{name}|{list(t.shape)}|{str(t.dtype).removeprefix('torch.')}\n".encode()
    return head, t.reshape(-1).view(torch.uint8).numpy().tobytes()


def state_dict_digests(sd: Mapping[str, torch.Tensor], subset: Iterable[str]) -> tuple[str, str]:
    """`state_dict_digest` of all of `sd` and of only `subset`, in one pass: each tensor is copied
    to the host and turned into bytes once (a CUDA shard's replicated part would be copied twice)."""
    full, part, subset = hashlib.sha256(), hashlib.sha256(), set(subset)
    for name in sorted(sd):
        head, data = _digest_records(name, sd[name])
        for h in (full, part) if name in subset else (full,):
            h.update(head)
            h.update(data)
    return full.hexdigest(), part.hexdigest()


def state_dict_digest(sd: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over sorted (name, shape, dtype, raw bytes) of `sd`: the load report's digest."""
    return state_dict_digests(sd, ())[0]


def peak_rss_bytes() -> int:
    """ru_maxrss of this process (KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


@dataclass
class RankReport:
    rank: int
    local_rank: int
    host: str
    tp_rank: int
    dp_rank: int
    device: str
    bytes_read: int
    bytes_needed: int
    peak_rss_bytes: int
    seconds: float
    num_tensors: int
    digest: str


@dataclass
class LoadReport:
    status: str
    world_size: int
    tp: int
    dp: int
    checkpoint: str
    seconds: float
    ranks: list

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ranks"] = [asdict(r) if not isinstance(r, dict) else r for r in self.ranks]
        return d

    def write(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        os.replace(tmp, path)

    def table(self) -> str:
        def mib(n: int) -> str:
            return f"{n / 2**20:9.1f}"
        lines = [f"{'rank':>4} {'host':<12} {'tp':>3} {'dp':>3} {'device':<8} {'read MiB':>9} "
                 f"{'need MiB':>9} {'peak RSS MiB':>12} {'sec':>6}"]
        for r in self.ranks:
            lines.append(f"{r.rank:>4} {r.host[:12]:<12} {r.tp_rank:>3} {r.dp_rank:>3} {r.device:<8} "
                         f"{mib(r.bytes_read)} {mib(r.bytes_needed)} {mib(r.peak_rss_bytes):>12} {r.seconds:6.2f}")
        return "\n".join(lines)
