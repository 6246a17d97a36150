"""load_model: config -> meta model -> plan -> materialize -> group agreement -> report.

Two agreement points bracket the I/O: after planning (so a bad config, a missing file or a TP
size that does not divide the heads stops every rank before any tensor byte is read) and after
materializing (status, eval flags and digests). Either raises the same error on every rank.
"""
from __future__ import annotations

import hashlib
import sys
import time
from typing import Optional, Sequence, Union

from torch import nn

from . import collectives as C
from . import exchange
from . import formats
from .agree import (RankStatus, agree_loaded, agree_phase, agree_tags, describe, finalize, local_status, plan_dtypes,
                    write_error_report)
from .config import LoadConfig, resolve
from .errors import ConfigError, GroupLoadError, SatDistError
from .integrity import verify_load
from .materialize import materialize, pick_readers, staging_slots
from .formats.base import IndexRequest
from .launch import detect_launch, rank_and_world
from .lora import load as lora_load
from .lora import switch as lora_switch
from .models import TPInfo, build_meta_model, check_tp, collect_specs
from .pause import fail_point, pause_point
from .plan import make_plan
from .report import LoadReport, Progress, RankReport, fingerprints, peak_rss_bytes, state_dict_digest
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
    runtime_timeout_s: Optional[float] = None,
    return_report: bool = False,
    digest: Optional[bool] = None,
    exchange: Optional[str] = None,
    progress: Optional[bool] = None,
    verify: Union[bool, str, None] = None,
    lora: Sequence = (),
    lora_merge: Optional[bool] = None,
    lora_alpha: Optional[float] = None,
):
    """Load a checkpoint tensor-parallel on every rank of the job (torchrun/SLURM/MPI or single).

    Returns the module (eval mode, no grads, TP collectives in its forward); with
    `return_report=True`, `(module, LoadReport)`. The process group stays up for the forward;
    `sat_dist.shutdown()` destroys it if sat_dist created it. `digest`: put the SHA-256 state-dict
    digest in the report (default: only when `report` names a file to write); `exchange`: auto|on|off
    (ranks that need the same bytes split the reads); `progress`: rank 0's bar (default: on a TTY);
    `verify`: check every block this rank reads against the checkpoint's manifest (True) or the one at
    that path (integrity.py). `lora`: adapters merged into the rank's shard, each `PATH[:STRENGTH]` or
    (path, strength) — PEFT/diffusers `.safetensors` files or SAT LoRA checkpoints; a SAT LoraMixin fine-tune
    checkpoint is recognised by its names and merged too (`lora_alpha`: its scale alpha / r, default the
    YAML's or LoraMixin's 1); `lora_merge=False` keeps the low-rank path in the forward. `timeout_s` bounds every wait of the load; `runtime_timeout_s` is the
    groups' timeout afterwards (forwards; default `collectives.RUNTIME_TIMEOUT_S`). On failure, a
    `report` file gets status "error", the ranks and causes.
    """
    t0 = time.perf_counter()
    files = [config] if isinstance(config, str) else list(config or [])
    cfg = rt = None
    try:
        cfg = resolve(checkpoint, files, overrides, tp=tp, dtype=dtype, device=device, report=report,
                      tag=tag, timeout_s=timeout_s, runtime_timeout_s=runtime_timeout_s, weights=weights, digest=digest,
                      exchange=exchange, progress=progress, verify=verify, lora=list(lora) or None,
                      lora_merge=lora_merge, lora_alpha=lora_alpha)
        if not cfg.checkpoint:
            raise ConfigError("no checkpoint given: pass a path (or load.checkpoint in a config)")
        rt = C.setup(detect_launch(timeout_s=cfg.timeout_s), cfg.tp, cfg.device, cfg.timeout_s,
                     runtime_timeout_s=cfg.runtime_timeout_s)
        model, rep = load_with_runtime(rt, cfg, t0)
        C.enter_runtime(rt)  # the forwards are not bounded by the load's timeout
    except BaseException as exc:
        if rt is not None:  # a broadcast given up at the deadline may still be in flight on NCCL
            C.teardown(rt, abort=isinstance(exc, GroupLoadError) and exc.phase == "exchange")
        if isinstance(exc, SatDistError):  # rank 0 writes the report: status "error", the ranks and causes
            who = (rt.rank, rt.world_size) if rt is not None else rank_and_world()
            write_error_report(cfg.report if cfg else report, exc, cfg.checkpoint if cfg else checkpoint, *who)
        raise
    keep_runtime(rt)
    return (model, rep) if return_report else model


_RUNTIMES: list[Runtime] = []


def set_loras(model: nn.Module, loras: Sequence = ()):
    """Switch the adapters of a model `load_model` loaded, on every rank (each must call it alike): re-reads
    only the touched base rows and the adapters' rank parts (lora/switch.py). Returns this rank's SwitchStats."""
    return lora_switch.switch(model, loras)


def keep_runtime(rt: Runtime) -> None:
    """Keep `rt`'s process group up for the forwards until `shutdown()` (load_model, load_engine)."""
    _RUNTIMES.append(rt)


def shutdown() -> None:
    """Destroy the process group sat_dist created (call before exit; gloo may abort otherwise)."""
    while _RUNTIMES:
        C.teardown(_RUNTIMES.pop())


def load_with_runtime(rt: Runtime, cfg: LoadConfig, t0: Optional[float] = None) -> tuple[nn.Module, LoadReport]:
    return load_components(rt, [cfg], t0)[0]


def load_components(rt: Runtime, cfgs: Sequence[LoadConfig], t0: Optional[float] = None,
                    names: Sequence[str] = ()) -> list[tuple[nn.Module, LoadReport]]:
    """Load several models (an engine's components) on one runtime, bracketed by ONE plan agreement
    and ONE load agreement for all of them: every component is planned before any byte of any is
    read, and no rank returns unless every component loaded on every rank. Returns (model, report)
    per component, in order; `names` label the components in errors."""
    t0 = time.perf_counter() if t0 is None else t0
    names = list(names) or [f"component {i}" for i in range(len(cfgs))]
    timeout = max(c.timeout_s for c in cfgs)
    cfgs, err = agree_tags(rt, cfgs, timeout, names)  # the same options everywhere; each `latest` read once
    planned: list = []
    try:
        if err:
            raise err
        for name, cfg in zip(names, cfgs):
            planned.append(_plan_component(rt, cfg, name if len(cfgs) > 1 else ""))
    except Exception as exc:  # reported to every rank below, never swallowed
        err = exc
    offers = None if err else [exchange.signatures(rt, p, c.exchange) for c, (_, _, p, _) in zip(cfgs, planned)]
    offers = agree_phase(rt, "plan", err, timeout, None if err else plan_dtypes([p for _, _, p, _ in planned]), offers)

    try:
        parts = [_load_component(rt, cfg, model, specs, plan, lsetup, [o[i] for o in offers], t0)
                 for i, (cfg, (model, specs, plan, lsetup)) in enumerate(zip(cfgs, planned))]
        status = parts[0] if len(parts) == 1 else _merge(rt, names, parts)
    except GroupLoadError:  # a peer died during the exchange: the group cannot agree any more
        raise
    except Exception as exc:
        status = RankStatus(rt.rank, describe(exc), rt.tp_rank, rt.dp_rank)
    statuses = agree_loaded(rt, status, timeout)
    out = []
    for i, (cfg, (model, _, _, _)) in enumerate(zip(cfgs, planned)):
        report = LoadReport(
            status="ok", world_size=rt.world_size, tp=rt.tp, dp=rt.mesh.dp, checkpoint=cfg.checkpoint,
            seconds=round(time.perf_counter() - t0, 4),
            ranks=[s.report if len(cfgs) == 1 else s.report[i] for s in statuses],
        )
        if cfg.report and rt.rank == 0:
            report.write(cfg.report)
        out.append((model, report))
    return out


def _plan_component(rt: Runtime, cfg: LoadConfig, name: str):
    try:
        pause_point("index", rt.rank)
        check_tp(cfg.model, rt.tp)
        model = build_meta_model(cfg.model, TPInfo(rt.tp, rt.tp_rank, rt.tp_group))
        specs = collect_specs(model)
        prefix = getattr(model, "checkpoint_prefix", "")
        # Adapters are opened and checked against the model before the base is indexed (headers only).
        lsetup = lora_load.prepare(cfg.model, cfg.checkpoint, cfg.tag, cfg.lora, cfg.lora_merge, cfg.lora_alpha,
                                   specs, prefix, rt.tp, rt.tp_rank)
        read_specs = lsetup.reader_specs(specs)
        index, prefer = formats.open_index(IndexRequest(cfg.checkpoint, read_specs, rt.tp, rt.tp_rank, cfg.tag,
                                                        prefix, cfg.weights))
        # Tensors the file lacks but the model fills itself on load (index.meta["absent"]).
        absent = index.meta.get("absent", {})
        specs = {n: s for n, s in specs.items() if n not in absent}
        read_specs = {n: s for n, s in read_specs.items() if n not in absent}
        # No --dtype: the reader's default (bf16 for a bf16 DeepSpeed run's fp32 masters), else as stored.
        dtype = cfg.torch_dtype or index.meta.get("default_dtype")
        readers = pick_readers(cfg.readers, rt.launch.local_world_size)
        op_bytes = (cfg.staging_mib << 20) // staging_slots(readers)  # the staging budget, all buffers
        plan = make_plan(read_specs, rt.tp, rt.tp_rank, index, dtype, prefer, op_bytes)
        plan = lsetup.extend(plan, index, prefer, op_bytes)
        return model, specs, plan, lsetup
    except Exception as exc:
        if not name:
            raise
        try:  # say which component of an engine failed, keeping the error's type
            named = type(exc)(f"{name}: {exc}", *exc.args[1:])
        except Exception:
            raise exc from None
        raise named from exc


def _load_component(rt: Runtime, cfg: LoadConfig, model: nn.Module, specs: dict, plan, lsetup, offers: list,
                    t0: float) -> RankStatus:
    share = exchange.plan_exchange(rt, plan, offers)
    pause_point("read", rt.rank)
    if cfg.verify:  # the blocks under this rank's own reads (what it receives, its sender verified),
        err = None      # agreed before any collective of the read phase: every rank raises the same error
        try:
            verify_load(lsetup.base_only(plan), cfg.checkpoint, cfg.verify if isinstance(cfg.verify, str) else None,
                        share.read)
        except Exception as exc:
            err = exc
        agree_phase(rt, "verify", err, cfg.timeout_s)
    show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    own = sum(op.nbytes for op in plan.ops if op.name in share.read)
    bar = Progress(show and rt.rank == 0, own, rt.world_size)
    err: Optional[BaseException] = None
    try:
        fail_point("read", rt.rank, rt.device)
        tensors, stats = materialize(plan, rt.device, share.read, pick_readers(cfg.readers, rt.launch.local_world_size),
                                     bar.update, exchange.stripe(rt, offers))
    except Exception as exc:  # with the exchange on, agreed before any broadcast (below)
        err = exc
    finally:
        bar.close()
    if exchange.wanted(offers):
        # Agree before the exchange: a rank whose read failed (a CUDA OOM allocating its shard, a short
        # read) would otherwise go to the final agreement while its peers wait in a broadcast — a hang
        # until NCCL's watchdog kills the job, its real error never printed. Every rank raises it here.
        pause_point("exchange", rt.rank)
        agree_phase(rt, "read", err, cfg.timeout_s)
    elif err is not None:
        raise err
    received = exchange.run(rt, share, tensors, cfg.timeout_s)
    # ΔW in fp32 on the rank's slice, before the cast to the run's dtype (or the factors to the layers)
    lsetup.runtime, lsetup.timeout_s = rt, cfg.timeout_s
    lsetup.apply(tensors, model)
    model.load_state_dict(tensors, strict=True, assign=True)
    del tensors
    finalize(model)
    sd = model.state_dict()
    replicated = [n for n, s in specs.items() if s.layout.replicated]
    # The agreement compares replicated tensors across all ranks and shards across DP replicas
    # (none when dp == 1); the exchange's broadcasts are equal by construction (their signatures stand in).
    fps = fingerprints(sd, {"replicated": replicated, "shard": sd if rt.mesh.dp > 1 else ()},
                       {"replicated": share.shared(world_only=True), "shard": share.shared()})
    want_digest = cfg.digest if cfg.digest is not None else bool(cfg.report)
    rep = RankReport(
        rank=rt.rank, local_rank=rt.launch.local_rank, host=rt.host, tp_rank=rt.tp_rank,
        dp_rank=rt.dp_rank, device=str(rt.device), bytes_read=stats.bytes_read,
        bytes_needed=plan.bytes_needed, peak_rss_bytes=peak_rss_bytes(),
        seconds=round(time.perf_counter() - t0, 4), num_tensors=len(plan.targets),
        digest=state_dict_digest(sd) if want_digest else None, bytes_received=received,
    )
    return local_status(rt, model, sd, fps["replicated"], rep, fps["shard"])


def _merge(rt: Runtime, names: Sequence[str], parts: list[RankStatus]) -> RankStatus:
    """One status for all components: findings labelled by component, digests chained in order,
    `report` the list of per-component RankReports."""
    def chain(values: list) -> str:
        return hashlib.sha256("|".join(values).encode()).hexdigest()

    def label(attr: str) -> list:
        return [f"{n}: {x}" for n, p in zip(names, parts) for x in getattr(p, attr)]

    return RankStatus(rt.rank, None, rt.tp_rank, rt.dp_rank, label("training"), label("grads"), label("meta"),
                      chain([p.replicated_digest for p in parts]), chain([p.digest for p in parts]),
                      [p.report for p in parts])
