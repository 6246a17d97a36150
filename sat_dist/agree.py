"""Group-wide agreement: no rank returns a model unless every rank loaded it, in eval mode.

Each agreement point is one all-gather of a small status object. The error raised on failure is
built only from the gathered statuses, so every rank raises exactly the same GroupLoadError
naming the failing rank(s) and their causes. A peer that died surfaces as a collective error
within the process-group timeout instead of a hang.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from . import collectives as C
from .errors import GroupLoadError, SatDistError
from .report import RankReport
from .runtime import Runtime


@dataclass
class RankStatus:
    rank: int
    error: Optional[str] = None
    tp_rank: int = 0
    dp_rank: int = 0
    training: list = field(default_factory=list)  # modules still in training mode
    grads: list = field(default_factory=list)  # parameters still requiring grad
    meta: list = field(default_factory=list)  # tensors never materialized
    replicated_digest: Optional[str] = None
    digest: Optional[str] = None
    report: Optional[RankReport] = None


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _gather(rt: Runtime, status: RankStatus, phase: str, timeout_s: float) -> list[RankStatus]:
    try:
        return C.all_gather_objects(status)
    except Exception as exc:
        raise GroupLoadError(
            f"sat_dist: rank {rt.rank} could not reach its peers during '{phase}' (a rank died, or did "
            f"not answer within the {timeout_s:.0f}s timeout): {describe(exc)}",
            {rt.rank: describe(exc)},
        ) from exc


def _raise(statuses: list[RankStatus], phase: str, problems: dict[int, str]) -> None:
    world = len(statuses)
    lines = [f"sat_dist load failed on rank(s) {sorted(problems)} of {world} during '{phase}':"]
    lines += [f"  rank {r}: {msg}" for r, msg in sorted(problems.items())]
    raise GroupLoadError("\n".join(lines), problems)


def agree_phase(rt: Runtime, phase: str, error: Optional[BaseException], timeout_s: float) -> None:
    """Every rank reports whether `phase` succeeded; any failure fails all ranks identically."""
    status = RankStatus(rt.rank, describe(error) if error else None, rt.tp_rank, rt.dp_rank)
    statuses = _gather(rt, status, phase, timeout_s)
    problems = {s.rank: s.error for s in statuses if s.error}
    if problems:
        _raise(statuses, phase, problems)


def finalize(model: nn.Module) -> None:
    """Inference state: eval everywhere, no parameter requiring grad."""
    model.eval()
    model.requires_grad_(False)


def local_status(rt: Runtime, model: nn.Module, sd: dict, replicated_digest: str, report: RankReport,
                 shard_digest: Optional[str] = None) -> RankStatus:
    """`replicated_digest` / `shard_digest`: fingerprints (report.fingerprints) of the replicated
    tensors and of the whole shard, compared across all ranks / across DP replicas."""
    return RankStatus(
        rank=rt.rank,
        tp_rank=rt.tp_rank,
        dp_rank=rt.dp_rank,
        training=[n or "<root>" for n, m in model.named_modules() if m.training],
        grads=[n for n, p in model.named_parameters() if p.requires_grad],
        meta=[n for n, t in list(sd.items()) + list(model.named_buffers()) if t.is_meta],
        replicated_digest=replicated_digest,
        digest=shard_digest if shard_digest is not None else report.digest,
        report=report,
    )


def agree_loaded(rt: Runtime, status: RankStatus, timeout_s: float) -> list[RankStatus]:
    """The final check: every rank loaded, is in eval mode with no grads, replicated tensors are
    identical on all ranks, and DP replicas of the same TP rank hold identical shards."""
    statuses = _gather(rt, status, "agree", timeout_s)
    problems: dict[int, str] = {}
    for s in statuses:
        if s.error:
            problems[s.rank] = s.error
        elif s.training or s.grads or s.meta:
            problems[s.rank] = (f"not in inference state: training modules {s.training[:5]}, "
                                f"params requiring grad {s.grads[:5]}, unmaterialized {s.meta[:5]}")
    if not problems:
        ref = statuses[0].replicated_digest
        for s in statuses:
            if s.replicated_digest != ref:
                problems[s.rank] = (f"replicated tensors differ from rank 0's (digest {s.replicated_digest[:12]} "
                                    f"vs {ref[:12]}): the checkpoint files disagree or a read was corrupted")
        by_tp: dict[int, RankStatus] = {}
        for s in statuses:
            first = by_tp.setdefault(s.tp_rank, s)
            if s.digest != first.digest:
                problems[s.rank] = (f"TP shard {s.tp_rank} differs from its DP replica on rank {first.rank} "
                                    f"(digest {s.digest[:12]} vs {first.digest[:12]})")
    if problems:
        _raise(statuses, "agree", problems)
    return statuses


__all__ = ["RankStatus", "SatDistError", "agree_loaded", "agree_phase", "describe", "finalize", "local_status"]
