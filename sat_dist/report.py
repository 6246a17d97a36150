"""The load report: per-rank facts every load proves about itself, its optional state-dict digest,
and the cheap fingerprints the group agreement compares.

The digest (SHA-256) is defined independently of sat_dist's internals so anyone can compare a load
with another loader, TP size or launcher without trusting this code. It costs about as much as the
load itself, so it is computed only when asked (a report file, `--digest`). Host tensors are hashed in
place; on CUDA, asking for it copies each tensor back to the host once (the definition hashes the
tensors in sorted-name order, which the reads, in file order, and the exchange's GPU-to-GPU
broadcasts do not follow). The default path never copies a weight back and never hashes.

The fingerprint is what the agreement compares on every load: per tensor, the wrapping int64 sum
of its 8-byte words and the sum of its 64 KiB block sums weighted by odd numbers, computed where
the tensor lives (on the GPU for a CUDA load) at memory bandwidth (~25 GB/s on one CPU core).
It detects any difference confined to one 8-byte word (any bit flip, a corrupted or zeroed
word) and any reordering of differing 64 KiB blocks; compensating changes of several words inside
one block can escape it. It is not a cryptographic check: the digest is.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Optional

import numpy as np
import torch

FP_BLOCK = 8192  # int64 words per fingerprint block (64 KiB)


def digest_header(name: str, t: torch.Tensor) -> bytes:
    return f"{name}|{list(t.shape)}|{str(t.dtype).removeprefix('torch.')}\n".encode()


def host_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous host tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def state_dict_digest(sd: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over sorted (name, shape, dtype, raw bytes) of `sd`: the load report's digest.
    Host tensors are hashed in place; a device tensor is copied to the host first."""
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach()
        t = (t if t.device.type == "cpu" else t.cpu()).contiguous()
        h.update(digest_header(name, t))
        h.update(host_bytes(t))
    return h.hexdigest()


def _tensor_fingerprint(t: torch.Tensor) -> torch.Tensor:
    """[sum of int64 words, sum of block sums * (2i+1)] of `t`'s bytes, as an int64 pair on its device."""
    b = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if b.numel() and b.data_ptr() % 8:
        b = b.clone()
    n8 = b.numel() // 8
    words = b[: n8 * 8].view(torch.int64)
    nb = n8 // FP_BLOCK
    sums = words[: nb * FP_BLOCK].view(nb, FP_BLOCK).sum(1)
    tail = words[nb * FP_BLOCK:].sum() + b[n8 * 8:].to(torch.int64).sum()
    weights = torch.arange(1, 2 * nb + 1, 2, dtype=torch.int64, device=b.device)
    return torch.stack([sums.sum() + tail, (sums * weights).sum() + tail * (2 * nb + 1)])


def _one_block(t: torch.Tensor) -> bool:
    """Whether `t`'s fingerprint is its plain word sum twice: 1 to FP_BLOCK - 1 words, no tail bytes."""
    nbytes = t.numel() * t.element_size()
    return 0 < nbytes < FP_BLOCK * 8 and nbytes % 8 == 0


def _by_device(names: list[str], sd: Mapping[str, torch.Tensor]) -> list[list[str]]:
    groups: dict = {}
    for n in names:
        groups.setdefault(sd[n].device, []).append(n)
    return list(groups.values())


def _small_fingerprints(ts: list[torch.Tensor], host: Optional[bool] = None) -> torch.Tensor:
    """_tensor_fingerprint of many one-block tensors on one device, as a (len(ts), 2) tensor, in a
    few ops instead of ten per tensor: a model's norms and biases are hundreds of tiny replicated
    tensors, and on a GPU each op is a launch. Their words are concatenated and summed per tensor:
    numpy's reduceat on the host, index_add_ on a device (`host` forces one; both wrap like sum)."""
    words = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in ts]).view(torch.int64)
    counts = [t.numel() * t.element_size() // 8 for t in ts]
    if words.device.type == "cpu" if host is None else host:
        starts = np.cumsum([0] + counts[:-1])
        sums = torch.from_numpy(np.add.reduceat(words.cpu().numpy(), starts)).to(words.device)
    else:
        owner = torch.repeat_interleave(torch.arange(len(ts), device=words.device),
                                        torch.tensor(counts, device=words.device), output_size=words.numel())
        sums = torch.zeros(len(ts), dtype=torch.int64, device=words.device).index_add_(0, owner, words)
    return torch.stack([sums, sums], dim=1)


def fingerprints(sd: Mapping[str, torch.Tensor], subsets: Mapping[str, Iterable[str]],
                 stand_ins: Mapping[str, Mapping[str, str]] = {}) -> dict[str, str]:
    """One fingerprint (hex) per named subset of `sd` (sorted names, shapes, dtypes and each
    tensor's word sums; see the module docstring). One pass over the tensors of the subsets, one
    device sync. `stand_ins[subset][name]` replaces the sums of a tensor whose bytes are equal on
    the ranks that compare that subset by construction (the exchange broadcast them to exactly
    those ranks from one read): its source signature."""
    subsets = {k: sorted(set(v)) for k, v in subsets.items()}
    names = sorted({n for k, v in subsets.items() for n in v if n not in stand_ins.get(k, {})})
    sums: dict[str, list[int]] = {}
    for group in _by_device(names, sd):  # one device sync per device: the rank's own, one
        small = [n for n in group if _one_block(sd[n])]
        big = [n for n in group if not _one_block(sd[n])]
        parts = [_small_fingerprints([sd[n] for n in small])] if small else []
        parts += [_tensor_fingerprint(sd[n])[None] for n in big]
        sums.update(zip(small + big, torch.cat(parts).cpu().tolist()))
    out = {}
    for key, subset in subsets.items():
        h = hashlib.blake2b(digest_size=16)
        alt = stand_ins.get(key, {})
        for n in subset:
            h.update(f"{n}|{list(sd[n].shape)}|{sd[n].dtype}|{alt[n] if n in alt else sums[n]}".encode())
        out[key] = h.hexdigest()
    return out


def write_json(path: str, obj) -> None:
    """Write `obj` as indented JSON, atomically (a reader never sees half a report)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def peak_rss_bytes() -> int:
    """ru_maxrss of this process (KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class Progress:
    """A tqdm bar of the group's bytes on rank 0 (rank 0's own bytes x the number of ranks, which
    read balanced shares), shown only for loads past `delay_s` on a TTY; otherwise a no-op.
    `update` is called from reader threads (tqdm serialises it)."""

    def __init__(self, enabled: bool, total: int, scale: int = 1, delay_s: float = 2.0):
        self.bar, self.scale = None, scale
        if enabled and total > 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total * scale, unit="B", unit_scale=True, unit_divisor=1024, delay=delay_s,
                            desc=f"sat_dist load ({scale} rank{'s' if scale > 1 else ''})", leave=False)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n * self.scale)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@dataclass
class RankReport:
    rank: int
    local_rank: int
    host: str
    tp_rank: int
    dp_rank: int
    device: str
    bytes_read: int  # fetched from storage by this rank, exactly
    bytes_needed: int
    peak_rss_bytes: int
    seconds: float
    num_tensors: int
    digest: Optional[str]  # None unless asked (a report file, --digest)
    bytes_received: int = 0  # tensor bytes received from peers by the exchange


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
        write_json(path, self.to_dict())

    def table(self) -> str:
        def mib(n: int) -> str:
            return f"{n / 2**20:9.1f}"
        lines = [f"{'rank':>4} {'host':<12} {'tp':>3} {'dp':>3} {'device':<8} {'read MiB':>9} {'recv MiB':>9} "
                 f"{'need MiB':>9} {'peak RSS MiB':>12} {'sec':>6}"]
        for r in self.ranks:
            lines.append(f"{r.rank:>4} {r.host[:12]:<12} {r.tp_rank:>3} {r.dp_rank:>3} {r.device:<8} "
                         f"{mib(r.bytes_read)} {mib(r.bytes_received)} {mib(r.bytes_needed)} "
                         f"{mib(r.peak_rss_bytes):>12} {r.seconds:6.2f}")
        return "\n".join(lines)
