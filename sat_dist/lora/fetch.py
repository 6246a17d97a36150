"""LoRA in `sat-dist convert`: a merged checkpoint, the adapters' ΔW added while the output is streamed.

`prepare` opens and plans the adapters at TP=1 (lora/load.prepare: `--lora` files, and a LoraMixin fine-tune
source itself, whose base is stored under `….original.*`); `rekey` gives the base index's pieces back their
model names. `MergingFetch` wraps convert's fetcher: a wanted tensor no adapter touches is fetched as before;
one that is touched is read whole (as stored) with its adapters' A and B (from their own files, or the base
checkpoint for in-checkpoint factors), merged by merge.apply (ΔW in fp32, then the cast to the output dtype,
exactly as a merged load at TP=1) and cut into the wanted boxes. Peak memory: one fp32 copy of one base tensor.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Callable, Mapping, Optional, Sequence

import torch

from ..index import CheckpointIndex, Piece
from ..materialize import materialize
from ..placement import REPLICATED, TensorSpec
from ..plan import ReadPlan, make_plan
from . import merge
from .load import LoraSetup, prepare as prepare_setup

CPU = torch.device("cpu")


def prepare(cfg, specs: Mapping[str, TensorSpec], prefix: str) -> Optional[LoraSetup]:
    """The convert's adapters planned at TP=1 (lora/load.prepare: `--lora`, and a LoraMixin fine-tune source
    itself), None when there are none."""
    setup = prepare_setup(cfg.model, cfg.checkpoint, cfg.tag, cfg.lora, True, cfg.lora_alpha, specs, prefix, 1, 0)
    return setup if setup.active else None


def rekey(index: CheckpointIndex, setup: Optional[LoraSetup]) -> CheckpointIndex:
    """The base index with the tensors read under other names (`….original.weight`) under their model names."""
    if setup is None or not setup.stored:
        return index
    back = {stored: name for name, stored in setup.stored.items()}
    pieces = {back.get(k, k): [Piece(back.get(k, k), p.stored, p.fragments) for p in v]
              for k, v in index.pieces.items()}
    return dataclasses.replace(index, pieces=pieces)


def _cut(full: torch.Tensor, want) -> torch.Tensor:
    """The part of model tensor `full` that output tensor `want` holds (its placement's fragments)."""
    place = want.placement(1, 0)
    if len(want.shape) == full.dim() and tuple(want.shape) == tuple(full.shape):
        frags = place.fragments(want.global_shape)
        if len(frags) == 1 and frags[0].logical.offsets == (0,) * full.dim():
            return full.to(want.dtype)
    out = torch.empty(want.shape, dtype=want.dtype)
    for f in place.fragments(want.global_shape):
        src = tuple(slice(o, o + s) for o, s in zip(f.logical.offsets, f.logical.sizes))
        dst = tuple(slice(o, o + s) for o, s in zip(f.local_offsets, f.logical.sizes))
        out[dst] = full[src]
    return out


class MergingFetch:
    """`fetch(wants)` as convert's fetcher, with the setup's LoRA merged into every touched tensor."""

    def __init__(self, plain: Callable, setup: LoraSetup, index: CheckpointIndex, prefer: Sequence[str],
                 dtypes: Mapping[str, torch.dtype], op_bytes: int):
        self.plain, self.setup, self.index, self.prefer = plain, setup, index, list(prefer)
        self.dtypes, self.op_bytes = dtypes, op_bytes
        self.own_bytes = 0
        self.ops = defaultdict(list)
        for op in setup.plan.merges:
            self.ops[op.base].append(op)
        self.where: dict[str, tuple[dict[str, TensorSpec], CheckpointIndex]] = {}
        external = iter(setup.external)
        for adapter, mine in zip(setup.plan.adapters, setup.plan.specs):
            idx = index if adapter.in_checkpoint else next(external)[1]
            for name, spec in mine.items():
                self.where[name] = (spec, idx)

    @property
    def bytes_read(self) -> int:
        return getattr(self.plain, "bytes_read", 0) + self.own_bytes

    def __call__(self, wants: Sequence) -> dict[str, torch.Tensor]:
        plain = [w for w in wants if w.source not in self.ops]
        out = self.plain(plain) if plain else {}
        by_source = defaultdict(list)
        for w in wants:
            if w.source in self.ops:
                by_source[w.source].append(w)
        for source, group in by_source.items():
            full = self._merged(source, group[0].global_shape)
            for w in group:
                out[w.name] = _cut(full, w)
            del full
        return {w.name: out[w.name] for w in wants}

    def _merged(self, source: str, shape) -> torch.Tensor:
        ops = self.ops[source]
        plan = make_plan({source: TensorSpec(tuple(shape), REPLICATED)}, 1, 0, self.index, None, self.prefer,
                         self.op_bytes)
        factors: dict[int, tuple[dict, CheckpointIndex]] = {}
        for name in sorted({n for op in ops for n in (op.a, op.b)}):
            spec, idx = self.where[name]
            factors.setdefault(id(idx), ({}, idx))[0][name] = spec
        for specs, idx in factors.values():
            sub = make_plan(specs, 1, 0, idx, None, (), self.op_bytes)
            plan = ReadPlan({**plan.targets, **sub.targets}, plan.ops + sub.ops)
        plan.ops.sort(key=lambda op: (op.file, op.first_byte))
        tensors, stats = materialize(plan, CPU, set(plan.targets), 1)
        self.own_bytes += stats.bytes_read
        only = dataclasses.replace(self.setup.plan, merges=list(ops), renames={})
        dtype = self.dtypes.get(source) or tensors[source].dtype
        merge.apply(only, tensors, {source: dtype}, None, True)
        return tensors[source]
