"""Tensor-parallel layers with SAT's parameter names, shapes and split rules.

Each layer records, per parameter, the full (logical) shape and its Layout, so the planner can
compute what this rank needs without the layer ever holding more than its shard. Forward
collectives are in `tp_ops` (inference only: no backward mappings needed).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..placement import REPLICATED, Layout, TensorSpec
from .tp_ops import gather_last_dim_from_tp, reduce_from_tp

Shape = tuple[int, ...]


class TPInfo:
    """The TP size, this rank's index and the group, shared by all layers of one model."""

    def __init__(self, size: int = 1, rank: int = 0, group=None):
        self.size, self.rank, self.group = size, rank, group


class _Sharded(nn.Module):
    """Base for layers whose parameters are TP shards; `specs` maps attribute -> TensorSpec."""

    def __init__(self, tp: TPInfo):
        super().__init__()
        self.tp = tp
        self.specs: dict[str, TensorSpec] = {}
        # Unmerged LoRA adapters (sat_dist.lora.merge.attach): (A, B, scale, boxes) on this rank's shard.
        self.lora: list = []

    def _param(self, name: str, global_shape: Shape, layout: Layout, dtype) -> None:
        spec = TensorSpec(tuple(global_shape), layout)
        local = spec.placement(self.tp.size, self.tp.rank).local_shape(spec.global_shape)
        self.register_parameter(name, nn.Parameter(torch.empty(local, dtype=dtype), requires_grad=False))
        self.specs[name] = spec


def lora_delta(x: torch.Tensor, y: torch.Tensor, adapters: list) -> torch.Tensor:
    """y[..., rows] += scale · (x[..., cols] Aᵀ) Bᵀ for each box of each adapter, before any TP collective:
    a column split's rows are its own, a row split's partial products join the all-reduce that follows."""
    for a, b, scale, boxes in adapters:
        for box, (b0, b1), (a0, a1) in boxes:
            (r0, c0), (n, m) = box.offsets, box.sizes
            y[..., r0:r0 + n] += F.linear(F.linear(x[..., c0:c0 + m], a[:, a0:a1]), b[b0:b1]) * scale
    return y


class ColumnParallelLinear(_Sharded):
    """Output features split on dim 0; `blocks` is SAT's stride (3 for fused QKV, a ratio list
    (heads, kv, kv) for grouped-query attention). The bias is split like the weight."""

    def __init__(self, in_features: int, out_features: int, tp: TPInfo, bias: bool = True,
                 blocks: tuple[int, ...] = (1,), dtype=torch.float32):
        super().__init__(tp)
        layout = Layout(0, tuple(blocks))
        self._param("weight", (out_features, in_features), layout, dtype)
        if bias:
            self._param("bias", (out_features,), layout, dtype)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return lora_delta(x, y, self.lora) if self.lora else y


class RowParallelLinear(_Sharded):
    """Input features split on dim 1; partial products are all-reduced, then the (replicated)
    bias is added once (SAT's final_bias=True)."""

    def __init__(self, in_features: int, out_features: int, tp: TPInfo, bias: bool = True, dtype=torch.float32):
        super().__init__(tp)
        self._param("weight", (out_features, in_features), Layout(1), dtype)
        if bias:
            self._param("bias", (out_features,), REPLICATED, dtype)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        y = reduce_from_tp(lora_delta(x, y, self.lora) if self.lora else y, self.tp.group)
        return y if self.bias is None else y + self.bias


class GatheredColumnLinear(ColumnParallelLinear):
    """A column split whose output is all-gathered: every rank gets the whole output from 1/TP of
    the weight (for replicated linears with a small output, e.g. CogVideoX's AdaLN modulations)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gather_last_dim_from_tp(super().forward(x), self.tp.group)


class ScatteredRowLinear(RowParallelLinear):
    """A row split fed the whole input: each rank multiplies its slice of the input features and
    the partial products are all-reduced (for replicated linears whose output TP need not divide)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.chunk(self.tp.size, dim=-1)[self.tp.rank])


class VocabParallelEmbedding(_Sharded):
    """Rows [r*V/n, (r+1)*V/n) on rank r; out-of-range ids contribute zeros, then all-reduce."""

    def __init__(self, num_embeddings: int, dim: int, tp: TPInfo, dtype=torch.float32):
        super().__init__(tp)
        self.num_embeddings = num_embeddings
        self._param("weight", (num_embeddings, dim), Layout(0), dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        per = self.num_embeddings // self.tp.size
        start = self.tp.rank * per
        outside = (ids < start) | (ids >= start + per)
        local = (ids - start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.tp.group)


class Embedding(nn.Module):
    """A replicated lookup table with nn.Embedding's state-dict key (`weight`) but no init:
    nn.Embedding's normal_ on the meta device imports torch._dynamo (about 1 s per process)."""

    def __init__(self, num_embeddings: int, dim: int, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim, dtype=dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class LayerNorm(nn.LayerNorm):
    """sat.ops.LayerNorm (torch fallback without apex): 16-bit inputs on CPU are normalised in fp32.
    SAT's CPU 16-bit branch also drops `eps` (torch's default 1e-5 is used); this keeps the configured
    eps, as SAT does on GPU and in fp32, so CPU half precision may differ from SAT's at ~eps level."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
            w = None if self.weight is None else self.weight.float()
            b = None if self.bias is None else self.bias.float()
            return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)
        return super().forward(x)


def collect_specs(model: nn.Module) -> dict[str, TensorSpec]:
    """TensorSpec for every state_dict entry: sharded layers say so, all else is replicated."""
    specs: dict[str, TensorSpec] = {}
    for mod_name, module in model.named_modules():
        local = getattr(module, "specs", None)
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(local, dict):
            for attr, spec in local.items():
                specs[prefix + attr] = spec
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name not in specs:
            specs[name] = TensorSpec(tuple(tensor.shape), REPLICATED)
    return {name: specs[name] for name in model.state_dict(keep_vars=True)}

