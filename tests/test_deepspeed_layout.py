"""The ZeRO flat-partition arithmetic on edge cases real fixtures here do not reach, in one process:
dp=12 (natural sort: rank 10 after rank 9), params smaller than dp (ranks holding only padding),
3-D params, ZeRO-1/2 params straddling many partitions, ZeRO-3 sub-groups cutting mid-list, and
TP splits of every kind. The files are laid out by this test's own writer, written from the rules
in FORMATS.md section 2 (independent of sat_dist and of bench/ds_zero3_writer.py); `zero_stage`
is pickled as a plain int so no DeepSpeed class is needed."""
import math
import os
from collections import OrderedDict

import pytest
import torch

from sat_dist.formats import deepspeed as ds
from sat_dist.materialize import materialize
from sat_dist.models.layers import TensorSpec
from sat_dist.placement import REPLICATED, Layout
from sat_dist.plan import make_plan
from sat_rules import strided_split

SPECS = {
    "qkv": TensorSpec((18, 5), Layout(0, (1, 1, 1))),
    "dense": TensorSpec((3, 9), Layout(1)),
    "tiny": TensorSpec((1,), REPLICATED),
    "cube": TensorSpec((6, 3, 2), Layout(0)),
    "bias": TensorSpec((7,), REPLICATED),
}


# SAT's split of each, written with torch ops (not sat_dist's placements).
SPLIT = {
    "qkv": lambda t, n, r: strided_split(t, n, r, [1, 1, 1]),
    "dense": lambda t, n, r: t.chunk(n, 1)[r],
    "tiny": lambda t, n, r: t,
    "cube": lambda t, n, r: t.chunk(n, 0)[r],
    "bias": lambda t, n, r: t,
}


def _full():
    g = torch.Generator().manual_seed(3)
    return {n: torch.randn(s.global_shape, generator=g) for n, s in SPECS.items()}


def _model_states(shapes_groups, dp, frozen=None):
    return {"module": OrderedDict((n, torch.empty(0)) for n in SPECS), "buffer_names": [], "optimizer": None,
            "param_shapes": [OrderedDict((n, torch.Size(SPECS[n].global_shape)) for n in g) for g in shapes_groups],
            "frozen_param_shapes": OrderedDict(), "shared_params": {}, "frozen_param_fragments": OrderedDict(),
            "dp_world_size": dp, "mp_world_size": 1}


def write_zero3(root, full, dp, sub_groups):
    tag = os.path.join(root, "global_step7")
    os.makedirs(tag)
    for r in range(dp):
        flats = []
        for sg in sub_groups:
            parts = []
            for n in sg:
                flat, q = full[n].reshape(-1), math.ceil(full[n].numel() / dp)
                part = torch.full((q,), float("nan"))  # padding: garbage in DeepSpeed, NaN here
                piece = flat[r * q: (r + 1) * q]
                part[: piece.numel()] = piece
                parts.append(part)
            flats.append(torch.cat(parts))
        torch.save({"optimizer_state_dict": {"zero_stage": 3, "partition_count": dp, "fp32_flat_groups": flats,
                                             "optimizer_state_dict": {"state": {i: {"exp_avg": torch.full_like(f, 7.0)}
                                                                                for i, f in enumerate(flats)}}}},
                   os.path.join(tag, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
        torch.save(_model_states(sub_groups, dp), os.path.join(tag, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("global_step7")


def write_zero12(root, full, dp, groups, stage=2):
    tag = os.path.join(root, "global_step7")
    os.makedirs(tag)
    flats = []
    for g in groups:
        flat = torch.cat([full[n].reshape(-1) for n in g])
        align = 2 * dp
        padded = torch.cat([flat, torch.full((-flat.numel() % align,), float("nan"))])
        flats.append((padded, flat.numel()))
    for r in range(dp):
        saved, pads = [], []
        for padded, n in flats:
            p = padded.numel() // dp
            pad = max(0, min(p, (r + 1) * p - n))
            saved.append(padded[r * p: (r + 1) * p - pad].clone())
            pads.append(pad)
        torch.save({"optimizer_state_dict": {"zero_stage": stage, "partition_count": [dp] * len(groups),
                                             "single_partition_of_fp32_groups": saved, "group_paddings": pads}},
                   os.path.join(tag, f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
    torch.save(_model_states(groups, dp) | {"module": {n: full[n].bfloat16() for n in SPECS}},
               os.path.join(tag, "mp_rank_00_model_states.pt"))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("global_step7")


def _load_all_ranks(root, full, tp):
    """Index, plan and read every TP rank; each tensor must be the full tensor's SAT split."""
    for rank in range(tp):
        index, prefer = ds.read(root, SPECS, tp, rank, weights="fp32")
        plan = make_plan(SPECS, tp, rank, index, index.meta.get("default_dtype"), prefer)
        tensors, stats = materialize(plan, torch.device("cpu"))
        for n in SPECS:
            want = SPLIT[n](full[n], tp, rank)
            assert torch.equal(tensors[n], want.to(tensors[n].dtype)), (tp, rank, n)
        assert stats.bytes_read == plan.bytes_needed
        yield index


@pytest.mark.parametrize("dp", [3, 5, 12])
@pytest.mark.parametrize("tp", [1, 3])
def test_zero3_partitions(tmp_path, dp, tp):
    full = _full()
    write_zero3(str(tmp_path), full, dp, [["qkv", "tiny"], ["dense", "cube", "bias"]])
    for index in _load_all_ranks(str(tmp_path), full, tp):
        assert index.format == "deepspeed-zero3" and index.meta["dp_size"] == dp


@pytest.mark.parametrize("dp", [2, 5, 12])
def test_zero12_flat_groups(tmp_path, dp):
    full = _full()
    write_zero12(str(tmp_path), full, dp, [["tiny", "qkv", "cube"], ["bias", "dense"]])
    for index in _load_all_ranks(str(tmp_path), full, 3):
        assert index.meta["default_dtype"] == torch.bfloat16  # bf16_ prefix: the run was bf16


def test_files_sorted_by_rank_number(tmp_path):
    full = _full()
    write_zero3(str(tmp_path), full, 12, [list(SPECS)])
    ckpt = ds.discover(str(tmp_path))
    ranks = [int(os.path.basename(p).split("_")[3]) for p in ckpt.optim_files[0]]
    assert ranks == list(range(12)) and ckpt.dp_size == 12 and ckpt.zero3 and not ckpt.bf16
