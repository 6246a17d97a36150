"""Group-wide agreement: no rank returns a model unless every rank loaded it, in eval mode.

Each agreement point is one all-gather of a small status object. The error raised on failure is
built only from the gathered statuses, so every rank raises exactly the same GroupLoadError
naming the failing rank(s) and their causes; after planning the ranks also compare their stored
dtypes (TP ranks read different mp files, which could come from different saves). Before planning,
rank 0 reads each `latest` once and every rank indexes that tag. A peer that died or stalls surfaces
within the process-group timeout, and the error names the rank(s) that never arrived (every rank
marks its arrival in the store first: `collectives.unreachable`). With `--report`, a failed load's
report says so (`error_report`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from torch import nn

from . import collectives as C
from . import errors, formats
from .config import LoadConfig
from .errors import CheckpointError, GroupLoadError, SatDistError
from .integrity import atomic_write_json
from .pause import pause_point
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
    dtypes: Optional[tuple] = None  # plan_dtypes(): (common stored dtype, the exceptions)
    carry: Any = None  # what the phase also gathers (after planning: each component's exchange.Offer)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _gather(rt: Runtime, obj: Any, phase: str, timeout_s: float) -> list:
    """All-gather `obj` at agreement point `phase`. Each rank first marks its arrival in the store,
    so when the collective fails (a peer died, or did not come within the timeout) the error names
    the rank(s) that never arrived."""
    pause_point(phase, rt.rank)
    C.mark_arrival(rt, phase)
    t0 = time.monotonic()
    try:
        return C.all_gather_objects(obj, rt.ctrl_group)
    except Exception as exc:
        raise C.unreachable(rt, phase, exc, time.monotonic() - t0, timeout_s) from exc


def _raise(statuses: Sequence[Any], phase: str, problems: dict[int, str]) -> None:
    world = len(statuses)
    lines = [f"sat_dist load failed on rank(s) {sorted(problems)} of {world} during '{phase}':"]
    lines += [f"  rank {r}: {msg}" for r, msg in sorted(problems.items())]
    raise GroupLoadError("\n".join(lines), problems, phase)


# What a rank loads depends on these: every rank must have the same (or the ranks would read different
# bytes, or different collectives); `--report`, `--digest` and the progress bar are about output, and
# every rank takes rank 0's (a `--report` given on the head node only still gets every rank's digest).
OUTPUT_OPTIONS = ("report", "digest", "progress")


def load_options(cfg: LoadConfig) -> dict[str, Any]:
    """The options of one load that every rank must share, as the user would name them."""
    model = hashlib.sha256(repr(cfg.model).encode()).hexdigest()[:12]
    return {"checkpoint": os.path.abspath(cfg.checkpoint) if cfg.checkpoint else None, "--tag": cfg.tag,
            "--tp": cfg.tp, "--dtype": cfg.dtype or "as stored", "--weights": cfg.weights,
            "--verify": cfg.verify, "model config (--config, model.* overrides)": model,
            "--lora": [(os.path.abspath(p), s) for p, s in cfg.lora], "--lora-merge": cfg.lora_merge,
            "--lora-alpha": cfg.lora_alpha}


def option_problems(options: list[list[dict]], names: Sequence[str] = ()) -> dict[int, str]:
    """Ranks whose load options differ from rank 0's, each naming the option and both values."""
    out: dict[int, str] = {}
    ref = options[0]
    for rank, mine in enumerate(options[1:], start=1):
        if len(mine) != len(ref):
            out[rank] = f"ConfigError: loads {len(mine)} component(s) where rank 0 loads {len(ref)}"
            continue
        diffs = [f"{names[i] + ' ' if len(ref) > 1 and i < len(names) else ''}{k} {m[k]!r} (rank 0: {r.get(k)!r})"
                 for i, (m, r) in enumerate(zip(mine, ref)) for k in m if m[k] != r.get(k)]
        if diffs:
            out[rank] = (f"ConfigError: started with other load options than rank 0: {'; '.join(diffs)}; start every "
                         f"rank (every node) with the same command line")
    return out


def agree_tags(rt: Runtime, cfgs: Sequence[LoadConfig], timeout_s: float, names: Sequence[str] = ()
               ) -> tuple[list[LoadConfig], Optional[SatDistError]]:
    """The first agreement of a load. Every rank's load options are compared (a difference fails every
    rank, naming the option and the values); the output options follow rank 0. Rank 0 reads each
    checkpoint's `latest` once and every rank indexes the tag it read, so a checkpoint being saved
    while the job starts cannot give ranks different iterations. Returns the configs with their tag
    and rank 0's output options set, and rank 0's error reading `latest` (reported at 'plan')."""
    mine: dict[str, Any] = {"options": [load_options(c) for c in cfgs], "tags": None,
                            "output": [{k: getattr(c, k) for k in OUTPUT_OPTIONS} for c in cfgs]}
    if rt.rank == 0:
        try:
            mine["tags"] = [c.tag if c.tag is not None or not c.checkpoint else formats.latest_tag(c.checkpoint)
                            for c in cfgs]
        except SatDistError as exc:
            mine["tags"] = (type(exc).__name__, str(exc))
        except Exception as exc:
            mine["tags"] = ("CheckpointError", describe(exc))
    got = _gather(rt, mine, "tag", timeout_s)
    problems = option_problems([g["options"] for g in got], names)
    if problems:
        _raise(got, "tag", problems)
    cfgs = [dataclasses.replace(c, **out) for c, out in zip(cfgs, got[0]["output"])]
    tags = got[0]["tags"]
    if isinstance(tags, tuple):
        return list(cfgs), getattr(errors, tags[0], CheckpointError)(tags[1])
    return [dataclasses.replace(c, tag=t) for c, t in zip(cfgs, tags)], None


def plan_dtypes(plans: Sequence[Any]) -> tuple[str, dict[str, str]]:
    """(the most common stored dtype, {tensor: dtype} of the others) over `plans`' targets: what
    every rank must agree on (TP ranks read different mp files, which could disagree)."""
    all_ = {f"{i}:{n}" if len(plans) > 1 else n: str(t.stored_dtype).removeprefix("torch.")
            for i, p in enumerate(plans) for n, t in p.targets.items()}
    common = Counter(all_.values()).most_common(1)[0][0] if all_ else ""
    return common, {n: d for n, d in all_.items() if d != common}


def _dtype_problems(statuses: list[RankStatus]) -> dict[int, str]:
    ref = statuses[0]
    if not ref.dtypes:
        return {}
    common, odd = ref.dtypes
    out = {}
    for s in statuses[1:]:
        if not s.dtypes or s.dtypes == ref.dtypes:
            continue
        c, o = s.dtypes
        if c != common:
            out[s.rank] = (f"CheckpointError: its files store the tensors as {c} where rank 0's store {common}: "
                           f"the model-parallel files come from different saves; restore the files of one save")
            continue
        diff = sorted(n for n in set(o) | set(odd) if o.get(n, c) != odd.get(n, common))
        out[s.rank] = (f"CheckpointError: tensor(s) {diff[:5]} are stored as {[o.get(n, c) for n in diff[:5]]} "
                       f"in its files but as {[odd.get(n, common) for n in diff[:5]]} in rank 0's: the model-parallel "
                       f"files come from different saves; restore the files of one save")
    return out


def agree_phase(rt: Runtime, phase: str, error: Optional[BaseException], timeout_s: float,
                dtypes: Optional[tuple[str, dict[str, str]]] = None, carry: Any = None) -> list[Any]:
    """Every rank reports whether `phase` succeeded (and, after planning, its stored dtypes); any
    failure or disagreement fails all ranks identically. `carry` rides along in the same all-gather
    (one collective less); returns every rank's, in rank order."""
    status = RankStatus(rt.rank, describe(error) if error else None, rt.tp_rank, rt.dp_rank)
    status.dtypes, status.carry = dtypes, carry
    statuses = _gather(rt, status, phase, timeout_s)
    problems = {s.rank: s.error for s in statuses if s.error} or _dtype_problems(statuses)
    if problems:
        _raise(statuses, phase, problems)
    return [s.carry for s in statuses]


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


def error_report(exc: BaseException, checkpoint: Optional[str], rank: int, world_size: Optional[int]) -> dict:
    """The `--report` JSON of a failed load: status "error", the failing ranks and their causes."""
    failures = getattr(exc, "failures", None) or {rank: describe(exc)}
    return {"status": "error", "checkpoint": checkpoint, "world_size": world_size,
            "phase": getattr(exc, "phase", None) or None, "error_type": type(exc).__name__, "error": str(exc),
            "agreed": getattr(exc, "agreed", False), "reported_by": rank,
            "failures": [{"rank": r, "cause": c} for r, c in sorted(failures.items())]}


def write_error_report(path: Optional[str], exc: BaseException, checkpoint: Optional[str], rank: int,
                       world_size: Optional[int]) -> None:
    """Rank 0 writes the error report when a report was asked for (never masks the error itself)."""
    if path and rank == 0:
        try:
            atomic_write_json(path, error_report(exc, checkpoint, rank, world_size))
        except OSError:
            pass


__all__ = ["RankStatus", "SatDistError", "agree_loaded", "agree_phase", "agree_tags", "describe", "error_report",
           "finalize", "load_options", "local_status", "option_problems", "plan_dtypes", "write_error_report"]
