"""The ZeRO flat-partition arithmetic on edge cases real fixtures here do not reach, in one process:
dp=12 (natural sort: rank 10 after rank 9), params smaller than dp (ranks holding only padding),
3-D params, ZeRO-1/2 params straddling many partitions, ZeRO-3 sub-groups cutting mid-list, and
TP splits of every kind. The files are laid out by this test's own writer, written from the rules
in microsoft/DeepSpeed deepspeed/utils/zero_to_fp32.py (independent of sat_dist and of
sat_dist/testing/zero3_writer.py); `zero_stage` is pickled as a plain int so no DeepSpeed class
is needed."""
import math
import os
from collections import OrderedDict

import pytest
import torch

from sat_dist.errors import CheckpointError
from sat_dist.formats import deepspeed as ds
from sat_dist.formats.base import IndexRequest
from sat_dist.materialize import materialize
from sat_dist.placement import REPLICATED, Layout, TensorSpec
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


def write_zero12(root, full, dp, groups, stage=2, padding="spread", tied=None):
    """padding: "spread" (DeepSpeed 0.19: each rank strips its own share), "last" (older DeepSpeed:
    the whole group padding is stripped from the last rank's slice, `group[:P - padding]`, even when
    it exceeds P), "kept" (BF16_Optimizer: no zero_stage, slices saved with their padding).
    tied: {alias: owner} recorded in shared_params, the alias saved in `module` as DeepSpeed does."""
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
            part = padded[r * p: (r + 1) * p]
            if padding == "spread":
                pad = max(0, min(p, (r + 1) * p - n))
            else:
                pad = padded.numel() - n if r == dp - 1 else 0
            saved.append((part if padding == "kept" else part[: p - pad]).clone())
            pads.append(pad)
        osd = {"zero_stage": stage, "partition_count": [dp] * len(groups),
               "single_partition_of_fp32_groups": saved, "group_paddings": pads}
        if padding == "kept":
            del osd["zero_stage"]
        torch.save({"optimizer_state_dict": osd}, os.path.join(tag, f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
    module = {n: full[n].bfloat16() for n in SPECS} | {a: full[o].bfloat16() for a, o in (tied or {}).items()}
    torch.save(_model_states(groups, dp) | {"module": module, "shared_params": dict(tied or {})},
               os.path.join(tag, "mp_rank_00_model_states.pt"))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("global_step7")


def _read_fp32(root, specs, tp, rank):
    return ds.index(IndexRequest(root, specs, tp, rank, weights="fp32"))


def _load_all_ranks(root, full, tp, specs=SPECS, dtype=None):
    """Index, plan and read every TP rank; each tensor must be the full tensor's SAT split."""
    for rank in range(tp):
        index, prefer = _read_fp32(root, specs, tp, rank)
        plan = make_plan(specs, tp, rank, index, dtype or index.meta.get("default_dtype"), prefer)
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


@pytest.mark.parametrize("padding", ["last", "kept"])
@pytest.mark.parametrize("dp", [2, 12])
def test_zero12_padding_layouts_of_other_deepspeed_versions(tmp_path, dp, padding):
    """Older DeepSpeed strips the whole group padding from the last rank only (at dp=12 the second
    group's padding, 14, exceeds its slice, 4: that rank's file holds garbage); BF16_Optimizer keeps
    it. The partition size comes from param_shapes, so all three layouts read the same bytes."""
    full = _full()
    write_zero12(str(tmp_path), full, dp, [["tiny", "qkv", "cube"], ["bias", "dense"]], padding=padding)
    for index in _load_all_ranks(str(tmp_path), full, 3):
        assert index.meta["stage"] == (1 if padding == "kept" else 2)


def test_zero12_truncated_partition_named(tmp_path):
    full = _full()
    write_zero12(str(tmp_path), full, 2, [list(SPECS)])
    path = os.path.join(str(tmp_path), "global_step7", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    obj = torch.load(path, weights_only=True)
    obj["optimizer_state_dict"]["single_partition_of_fp32_groups"][0] = torch.zeros(5)
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=r"bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt: param group 0 "
                                              r"partition holds 5 fp32 elements .* put 82 "):
        _read_fp32(str(tmp_path), SPECS, 1, 0)


def test_zero12_tied_alias_reads_the_owners_fp32_master(tmp_path):
    """A tied alias (shared_params) is saved in `module` in 16 bits, and recorded only in rank 0's
    file: with --weights fp32 it must take the owner's fp32 master, not the 16-bit copy."""
    full = _full()
    specs = SPECS | {"bias_tied": TensorSpec((7,), REPLICATED)}
    write_zero12(str(tmp_path), full, 2, [list(SPECS)], tied={"bias_tied": "bias"})
    for rank in range(3):
        index, prefer = _read_fp32(str(tmp_path), specs, 3, rank)
        tensors, _ = materialize(make_plan(specs, 3, rank, index, torch.float32, prefer), torch.device("cpu"))
        assert torch.equal(tensors["bias_tied"], full["bias"]) and torch.equal(tensors["bias"], full["bias"])


def test_zero3_frozen_param_shape_is_checked(tmp_path):
    """Frozen params (frozen_param_shapes) are checked against the config like trainable ones."""
    full = _full()
    write_zero3(str(tmp_path), full, 2, [["qkv", "tiny", "dense", "bias"]])
    for r in range(2):
        path = os.path.join(str(tmp_path), "global_step7", f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        ms = torch.load(path, weights_only=True)
        ms["frozen_param_shapes"] = OrderedDict(cube=torch.Size((3, 6, 2)))
        ms["frozen_param_fragments"] = OrderedDict(cube=torch.zeros(18))
        torch.save(ms, path)
    with pytest.raises(CheckpointError, match=r"tensor 'cube' has shape \[3, 6, 2\] in the checkpoint but the "
                                              r"model config gives \[6, 3, 2\]"):
        _read_fp32(str(tmp_path), SPECS, 1, 0)


def test_files_sorted_by_rank_number(tmp_path):
    full = _full()
    write_zero3(str(tmp_path), full, 12, [list(SPECS)])
    ckpt = ds.discover(str(tmp_path))
    ranks = [int(os.path.basename(p).split("_")[3]) for p in ckpt.optim_files[0]]
    assert ranks == list(range(12)) and ckpt.dp_size == 12 and ckpt.zero3 and not ckpt.bf16


def test_fp16_run_defaults_to_fp16(tmp_path):
    """ds_config fp16.enabled (no bf16_ prefix): served in fp16 unless --dtype says otherwise, so
    trainable params (fp32 masters) and frozen ones/buffers (16-bit in the run) agree."""
    full = _full()
    write_zero3(str(tmp_path), full, 2, [list(SPECS)])
    index, _ = _read_fp32(str(tmp_path), SPECS, 1, 0)
    assert "default_dtype" not in index.meta  # an fp32 run: stored dtype
    path = os.path.join(str(tmp_path), "global_step7", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    torch.save(torch.load(path, weights_only=True) | {"ds_config": {"fp16": {"enabled": True}}}, path)
    index, _ = _read_fp32(str(tmp_path), SPECS, 1, 0)
    assert index.meta["default_dtype"] == torch.float16
    assert ds.describe(str(tmp_path))["run_dtype"] == "fp16"
