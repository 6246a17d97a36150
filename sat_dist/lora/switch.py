"""Switch a loaded model's adapters without reloading its base: `switch(rt, model, loras)`.

Merged: each rank re-reads from the base checkpoint only its rows of the tensors that the old or the new
adapters touch, plus the new adapters' rank parts, and merges afresh — the weights equal a fresh load with
the new adapters bit for bit (nothing is unmerged, so no bf16 drift). Unmerged: only the new factors are
read and handed to the layers. Like a load, the group agrees first on the plan (a LoRA for another model
fails every rank before a byte is read), then on the result (every rank read and merged, DP replicas hold
equal shards); only then are the new weights copied into the model, so a failed switch changes nothing.
A LoraMixin fine-tune's own LoRA (in its checkpoint) stays: `loras` are the adapters on top of it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ..agree import RankStatus, agree_loaded, agree_phase, describe
from ..config import parse_lora_arg
from ..errors import ConfigError
from ..materialize import materialize, pick_readers
from ..plan import ReadPlan, make_plan
from ..runtime import Runtime
from . import files, merge
from .load import STATE_ATTR, LoraSetup, external_indices, join, state, unmerged_dtypes
from .plan import plan_loras


@dataclass
class SwitchStats:
    """One rank's switch: what it read (exactly the plan's bytes) and which base tensors it rewrote."""

    bytes_read: int
    bytes_base: int  # of which the touched base rows
    bytes_factors: int  # and the adapters' rank parts
    touched: list[str]
    seconds: float = 0.0


def _plan(old: LoraSetup, model: nn.Module, loras: Sequence[tuple[str, float]]) -> tuple[LoraSetup, ReadPlan]:
    keep = [(a, s) for a, s in zip(old.plan.adapters, old.plan.strengths) if a.in_checkpoint]
    adapters = [a for a, _ in keep] + [files.open_adapter(p, old.specs, old.prefix, old.alpha) for p, _ in loras]
    strengths = [s for _, s in keep] + [s for _, s in loras]
    files.check_sequence(adapters)
    lp = plan_loras(adapters, strengths, old.specs, old.tp, old.rank, old.stored)
    # the run's dtype of every base tensor either set touches: the model's own
    dtypes = {n: model.get_parameter(n).dtype for n in old.plan.touched | lp.touched}
    new = dataclasses.replace(old, plan=lp, dtypes=dtypes)
    new.external = external_indices(lp, old.tp, old.rank, old.prefix)
    parts = []
    if old.merge:  # the touched base rows, under the names they are stored with
        specs = {old.stored.get(n, n): old.specs[n] for n in sorted(old.plan.touched | lp.touched)}
        parts.append(make_plan(specs, old.tp, old.rank, old.base_index, None, old.prefer, old.op_bytes))  # as stored
    in_ckpt = {n: s for a, m in zip(lp.adapters, lp.specs) if a.in_checkpoint for n, s in m.items()}
    if in_ckpt:
        parts.append(make_plan(in_ckpt, old.tp, old.rank, old.base_index, None, old.prefer, old.op_bytes))
    plan = join(ReadPlan(targets={}), *parts, *new.external_plans())
    if not old.merge:
        unmerged_dtypes(plan, lp, new.dtypes)
    return new, plan


def _digest(tensors: dict, names: Sequence[str]) -> str:
    h = hashlib.sha256()
    for n in names:
        t = tensors[n].detach().contiguous().cpu()
        h.update(n.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def switch(model: nn.Module, loras: Sequence, readers: Optional[int] = None) -> SwitchStats:
    """Replace `model`'s adapters by `loras` (PATH[:STRENGTH] or (path, strength); [] for none) on every
    rank of the group that loaded it; raises the same GroupLoadError everywhere on failure, the model
    unchanged. Every rank must call it with the same `loras`."""
    t0 = time.perf_counter()
    old = state(model)
    if old is None or old.runtime is None:
        raise ConfigError("set_loras: this model was not loaded by sat_dist.load_model / load_engine")
    rt: Runtime = old.runtime
    timeout_s = old.timeout_s
    err: Optional[BaseException] = None
    new = plan = None
    try:
        parsed = [parse_lora_arg(x) for x in loras]
        new, plan = _plan(old, model, parsed)
    except Exception as exc:
        err = exc
    agree_phase(rt, "lora-plan", err, timeout_s)
    status = RankStatus(rt.rank, None, rt.tp_rank, rt.dp_rank)
    tensors: dict = {}
    stats = SwitchStats(0, 0, 0, [])
    try:
        tensors, rs = materialize(plan, rt.device, set(plan.targets), pick_readers(readers, rt.launch.local_world_size))
        lora_names = new.plan.lora_names()
        factors = sum(op.nbytes for op in plan.ops if op.name in lora_names)
        touched = sorted(old.plan.touched | new.plan.touched) if old.merge else []
        stats = SwitchStats(rs.bytes_read, rs.bytes_read - factors, factors, touched)
        if new.merge:
            merge.apply(new.plan, tensors, new.dtypes, model, True)
            for n in touched:  # the rows of tensors no adapter touches any more: back to the run's dtype
                tensors[n] = tensors[n].to(new.dtypes[n])
        replicated = [n for n in touched if old.specs[n].layout.replicated]
        status.replicated_digest = _digest(tensors, replicated)
        status.digest = _digest(tensors, [n for n in touched if n not in replicated]) if rt.world_size > rt.tp else ""
    except Exception as exc:
        status.error = describe(exc)
    agree_loaded(rt, status, timeout_s)  # every rank read and merged; replicas agree: now change the model
    with torch.no_grad():
        if new.merge:
            for n in stats.touched:
                model.get_parameter(n).copy_(tensors[n])
        else:
            merge.apply(new.plan, tensors, new.dtypes, model, False)
    setattr(model, STATE_ATTR, new)
    stats.seconds = round(time.perf_counter() - t0, 4)
    return stats
