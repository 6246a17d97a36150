"""Pure LoRA planning: which part of each A and B this rank reads, and where B·A lands in its shard.

The rule (e.g. hao-ai-lab/FastVideo `fastvideo/layers/lora/linear.py`), derived here from the base
tensor's own Layout rather than per layer: a column-parallel base (split on dim 0) needs the rank's rows
of B and all of A; a row-parallel base (split on dim 1) the rank's columns of A and all of B; a replicated
base both whole. A and B become TensorSpecs with those layouts, so the ordinary planner reads exactly
those bytes (SAT's own mp files store them split the same way), and `MergeOp.boxes` says, per fragment of
the rank's shard, which rows of the local B and columns of the local A make its ΔW. No I/O.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from ..errors import LoraError, PlanError
from ..placement import REPLICATED, Box, Fragment, Layout, TensorSpec
from .files import AdapterFile, Pair

Span = tuple[int, int]  # [start, stop)


@dataclass(frozen=True)
class MergeOp:
    """ΔW[box] = scale · B[b_rows] @ A[:, a_cols] for each (box, b_rows, a_cols) of `boxes` (local coords)."""

    base: str  # the model's tensor (the plan's target after `LoraPlan.renames`)
    a: str  # plan names of the local A and B
    b: str
    scale: float  # the format's scale x the user's strength
    boxes: tuple[tuple[Box, Span, Span], ...]


@dataclass
class LoraPlan:
    """Every adapter of one load, planned for one rank."""

    adapters: list[AdapterFile]
    strengths: list[float]
    specs: list[dict[str, TensorSpec]] = field(default_factory=list)  # per adapter: plan name -> spec
    keys: list[dict[str, str]] = field(default_factory=list)  # per adapter: plan name -> key in its file
    merges: list[MergeOp] = field(default_factory=list)
    renames: dict[str, str] = field(default_factory=dict)  # plan name -> model name (LoraMixin's `original`)

    @property
    def touched(self) -> set[str]:
        return {m.base for m in self.merges}

    def lora_names(self) -> set[str]:
        return {n for s in self.specs for n in s}


def plan_name(i: int, adapter: AdapterFile, key: str) -> str:
    """A LoRA tensor's name in the read plan: its own key when it lives in the base checkpoint (one index
    for both), else prefixed by the adapter's position (two files may use the same keys)."""
    return key if adapter.in_checkpoint else f"lora{i}:{key}"


def _block_bounds(spec: TensorSpec) -> list[int]:
    """Row boundaries of a dim-0 split's blocks (SAT's stride), independent of the TP size."""
    total, blocks = spec.global_shape[0], spec.layout.blocks
    unit = total // sum(blocks)
    return list(itertools.accumulate([0] + [unit * b for b in blocks]))


def layouts(pair: Pair, base: TensorSpec, where: str) -> tuple[Layout, Layout]:
    """(A's layout, B's layout) for `pair` of a base tensor laid out as `base`."""
    split = base.layout.split_dim
    if split is None:
        return REPLICATED, REPLICATED
    if split == 1:
        return Layout(1, base.layout.blocks), REPLICATED
    bounds = set(_block_bounds(base))
    sizes = []
    for frag in sorted(pair.rows, key=lambda f: f.local_offsets[0]):
        lo, n = frag.logical.offsets[0], frag.logical.sizes[0]
        inner = sorted(b for b in bounds if lo <= b <= lo + n)
        if not inner or inner[0] != lo or inner[-1] != lo + n:
            raise LoraError(f"{where}: {pair.target} writes rows [{lo}, {lo + n}) of {pair.base}, which cut one of "
                            f"its tensor-parallel blocks; this LoRA cannot be split like the model")
        sizes += [b - a for a, b in zip(inner, inner[1:])]
    return REPLICATED, Layout(0, tuple(sizes))


def _local(frags: Sequence[Fragment], dim: int, lo: int, n: int, what: str) -> Span:
    for f in frags:
        flo, fn = f.logical.offsets[dim], f.logical.sizes[dim]
        if flo <= lo and lo + n <= flo + fn:
            start = f.local_offsets[dim] + lo - flo
            return start, start + n
    raise PlanError(f"{what}: [{lo}, {lo + n}) along dim {dim} is not in one piece of this rank's part")


def merge_boxes(pair: Pair, base: TensorSpec, a: TensorSpec, b: TensorSpec, tp: int, rank: int
                ) -> tuple[tuple[Box, Span, Span], ...]:
    """(W local box, B local rows, A local columns) for every piece of this rank's W that the pair writes."""
    wfr = base.placement(tp, rank).fragments(base.global_shape)
    afr = a.placement(tp, rank).fragments(a.global_shape)
    bfr = b.placement(tp, rank).fragments(b.global_shape)
    out = []
    for wf in wfr:
        for pf in pair.rows:
            inter = wf.logical.intersect(pf.logical)
            if inter is None:
                continue
            box = Box(tuple(lo + i - o for lo, i, o in zip(wf.local_offsets, inter.offsets, wf.logical.offsets)),
                      inter.sizes)
            b_row = inter.offsets[0] - pf.logical.offsets[0] + pf.local_offsets[0]
            out.append((box, _local(bfr, 0, b_row, inter.sizes[0], pair.b),
                        _local(afr, 1, inter.offsets[1], inter.sizes[1], pair.a)))
    return tuple(out)


def plan_loras(adapters: Sequence[AdapterFile], strengths: Sequence[float], specs: Mapping[str, TensorSpec],
               tp: int, rank: int, stored: Mapping[str, str] | None = None) -> LoraPlan:
    """Plan every adapter for TP rank `rank` of `tp`. `stored`: model tensor -> the name it is read under
    (a LoraMixin fine-tune keeps the base in `….original.weight`). Errors name the file and the tensor."""
    lp = LoraPlan(list(adapters), list(strengths), renames={v: k for k, v in (stored or {}).items()})
    for i, (adapter, strength) in enumerate(zip(adapters, strengths)):
        mine: dict[str, TensorSpec] = {}
        keys: dict[str, str] = {}
        for pair in adapter.pairs:
            base = specs.get(pair.base)
            if base is None:
                raise LoraError(f"{adapter.path}: {pair.target} adapts {pair.base}, which this model does not have")
            try:
                base.placement(tp, rank).local_shape(base.global_shape)
                la, lb = layouts(pair, base, adapter.path)
                a, b = TensorSpec(pair.a_shape, la), TensorSpec(pair.b_shape, lb)
                b.placement(tp, rank).local_shape(b.global_shape)
            except ValueError as exc:
                raise LoraError(f"{adapter.path}: {pair.target} cannot be split {tp} ways: {exc}") from exc
            na, nb = plan_name(i, adapter, pair.a), plan_name(i, adapter, pair.b)
            mine[na], mine[nb] = a, b
            keys[na], keys[nb] = pair.a, pair.b
            lp.merges.append(MergeOp(pair.base, na, nb, pair.scale * strength,
                                     merge_boxes(pair, base, a, b, tp, rank)))
        lp.specs.append(mine)
        lp.keys.append(keys)
    return lp


def in_checkpoint_names(adapter: AdapterFile) -> dict[str, str]:
    """Model tensor -> stored name of the base tensors a LoraMixin fine-tune keeps under `original`."""
    out = {}
    for pair in adapter.pairs:
        linear = pair.base[: -len(".weight")]
        out[pair.base] = f"{linear}.original.weight"
        out[f"{linear}.bias"] = f"{linear}.original.bias"
    return out

