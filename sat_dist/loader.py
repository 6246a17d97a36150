"""load_model: config -> meta model -> plan -> materialize -> group agreement -> report.

Two agreement points bracket the I/O: after planning (so a bad config, a missing file or a TP
size that does not divide the heads stops every rank before any tensor byte is read) and after
materializing (status, eval flags and digests). Either raises the same error on every rank.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence, Union

from torch import nn

from . import collectives as C
from . import formats
from .agree import RankStatus, agree_loaded, agree_phase, describe, finalize, local_status
from .config import LoadConfig, resolve
from .errors import ConfigError
from .materialize import materialize
from .formats.base import IndexRequest
from .launch import detect_launch
from .models import TPInfo, build_meta_model, check_tp, collect_specs
from .plan import make_plan
from .report import LoadReport, RankReport, peak_rss_bytes, state_dict_digests
from .runtime import Runtime


def load_model(
    checkpoint: Optional[str] = None,
    config: Union[str, Sequence[str], None] = None,
    *,
    tp: Optional[int] = None,
    dtype: Optional[str] = None,
    device: Optional[str] = None,
    report: Optional[str] = None,
    overrides: Sequence[str] = (),
    tag: Optional[str] = None,
    weights: Optional[str] = None,
    timeout_s: Optional[float] = None,
    return_report: bool = False,
):
    """Load a checkpoint tensor-parallel on every rank of the job (torchrun/SLURM/MPI or single).

    Returns the module (eval mode, no grads, TP collectives in its forward); with
    `return_report=True`, `(module, LoadReport)`. The process group stays up for the forward;
    `sat_dist.shutdown()` destroys it if sat_dist created it.
    """
    t0 = time.perf_counter()
    files = [config] if isinstance(config, str) else list(config or [])
    cfg = resolve(checkpoint, files, overrides, tp=tp, dtype=dtype, device=device, report=report,
                  tag=tag, timeout_s=timeout_s, weights=weights)
    if not cfg.checkpoint:
        raise ConfigError("no checkpoint given: pass a path (or load.checkpoint in a config)")
    rt = C.setup(detect_launch(), cfg.tp, cfg.device, cfg.timeout_s)
    try:
        model, rep = load_with_runtime(rt, cfg, t0)
    except BaseException:
        C.teardown(rt)
        raise
    _RUNTIMES.append(rt)
    return (model, rep) if return_report else model


_RUNTIMES: list[Runtime] = []


def shutdown() -> None:
    """Destroy the process group sat_dist created (call before exit; gloo may abort otherwise)."""
    while _RUNTIMES:
        C.teardown(_RUNTIMES.pop())


def load_with_runtime(rt: Runtime, cfg: LoadConfig, t0: Optional[float] = None) -> tuple[nn.Module, LoadReport]:
    t0 = time.perf_counter() if t0 is None else t0
    err: Optional[BaseException] = None
    model = plan = specs = None
    try:
        check_tp(cfg.model, rt.tp)
        model = build_meta_model(cfg.model, TPInfo(rt.tp, rt.tp_rank, rt.tp_group))
        specs = collect_specs(model)
        prefix = getattr(model, "checkpoint_prefix", "")
        index, prefer = formats.open_index(IndexRequest(cfg.checkpoint, specs, rt.tp, rt.tp_rank, cfg.tag, prefix,
                                                        cfg.weights))
        # Tensors the file lacks but the model fills itself on load (index.meta["absent"]).
        specs = {n: s for n, s in specs.items() if n not in index.meta.get("absent", {})}
        # No --dtype: the reader's default (bf16 for a bf16 DeepSpeed run's fp32 masters), else as stored.
        dtype = cfg.torch_dtype or index.meta.get("default_dtype")
        plan = make_plan(specs, rt.tp, rt.tp_rank, index, dtype, prefer, cfg.staging_mib << 20)
    except Exception as exc:  # reported to every rank below, never swallowed
        err = exc
    agree_phase(rt, "plan", err, cfg.timeout_s)

    err, rep = None, None
    try:
        tensors, stats = materialize(plan, rt.device)
        model.load_state_dict(tensors, strict=True, assign=True)
        del tensors
        finalize(model)
        sd = model.state_dict()
        replicated = [n for n, s in specs.items() if s.layout.replicated]
        digest, replicated_digest = state_dict_digests(sd, replicated)
        rep = RankReport(
            rank=rt.rank, local_rank=rt.launch.local_rank, host=rt.host, tp_rank=rt.tp_rank,
            dp_rank=rt.dp_rank, device=str(rt.device), bytes_read=stats.bytes_read,
            bytes_needed=plan.bytes_needed, peak_rss_bytes=peak_rss_bytes(),
            seconds=round(time.perf_counter() - t0, 4), num_tensors=len(plan.targets),
            digest=digest,
        )
        status = local_status(rt, model, sd, replicated_digest, rep)
    except Exception as exc:
        status = RankStatus(rt.rank, describe(exc), rt.tp_rank, rt.dp_rank)
    statuses = agree_loaded(rt, status, cfg.timeout_s)
    report = LoadReport(
        status="ok", world_size=rt.world_size, tp=rt.tp, dp=rt.mesh.dp, checkpoint=cfg.checkpoint,
        seconds=round(time.perf_counter() - t0, 4), ranks=[s.report for s in statuses],
    )
    if cfg.report and rt.rank == 0:
        report.write(cfg.report)
    return model, report
