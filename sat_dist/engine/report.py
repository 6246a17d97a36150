"""The engine's one report: every component's load (per rank: bytes read, bytes needed, RSS,
digest — `report.LoadReport`) and every sample run (seconds per step, encode/decode seconds), plus
each rank's peak device memory, gathered once at the end (`Engine.finish`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from ..report import LoadReport, peak_rss_bytes, write_json

MIB = 1 << 20


def peak_device_bytes(device: torch.device) -> int:
    """Peak allocated device memory of this process (CUDA), else its peak RSS (CPU runs)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


def max_reserved_bytes(device: torch.device) -> Optional[int]:
    """Peak memory the CUDA caching allocator reserved (what nvidia-smi sees of this process's tensors,
    above `peak_device_bytes` by the allocator's slack); None off CUDA."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_reserved(device))
    return None


@dataclass
class RunRecord:
    """One sample, as its group's leader saw it."""

    prompt: str
    seed: int
    steps: int
    frames: int
    height: int
    width: int
    guidance_scale: float
    dynamic_cfg: bool
    cfg_parallel: bool
    rank: int
    seconds_encode: float = 0.0
    seconds_per_step: list = field(default_factory=list)
    seconds_decode: float = 0.0
    out: Optional[str] = None
    # bytes this rank sent (sat_dist/commcount.py's convention), by kind tp|sp|cfg|decode: "encode" (T5),
    # "per_step" (the denoising loop's total / steps), "steps_total", "decode" (the SP latents' gather and
    # the decode's gathers); the leader's here, every rank's in EngineReport.ranks[i]["comm_bytes"]
    comm_bytes: dict = field(default_factory=dict)


@dataclass
class EngineReport:
    layout: str
    root: str
    world_size: int
    tp: int
    dp: int
    cfg_parallel: bool
    seconds_load: float
    components: dict  # name -> LoadReport
    vae_tiling: bool = True
    runs: list = field(default_factory=list)  # RunRecord (each group's leader's; gathered by finish)
    ranks: list = field(default_factory=list)  # per rank: rank, device, peak_device_bytes, max_memory_reserved, comm_bytes (per run)
    status: str = "ok"
    sp: int = 1  # sequence parallel size (each replica: tp x sp ranks)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("components", "runs")}
        d["components"] = {n: r.to_dict() for n, r in self.components.items()}
        d["runs"] = [asdict(r) for r in self.runs]
        for r in d["runs"]:
            steps = r["seconds_per_step"]
            r["mean_seconds_per_step"] = round(sum(steps) / len(steps), 4) if steps else None
        return d

    def write(self, path: str) -> None:
        write_json(path, self.to_dict())

    def table(self) -> str:
        """Per component and rank: MiB read / needed, then the load time."""
        lines = [f"{'component':<13} {'rank':>4} {'tp':>3} {'dp':>3} {'read MiB':>9} {'need MiB':>9} {'sec':>7}"]
        for name, rep in self.components.items():
            rep: LoadReport
            for r in rep.ranks:
                lines.append(f"{name:<13} {r.rank:>4} {r.tp_rank:>3} {r.dp_rank:>3} {r.bytes_read / MIB:9.1f} "
                             f"{r.bytes_needed / MIB:9.1f} {r.seconds:7.2f}")
        lines.append(f"engine loaded on {self.world_size} ranks (tp={self.tp} x dp={self.dp}"
                     f"{f', sp={self.sp}' if self.sp > 1 else ''}"
                     f"{', CFG parallel' if self.cfg_parallel else ''}) in {self.seconds_load:.2f}s, eval agreed")
        return "\n".join(lines)
