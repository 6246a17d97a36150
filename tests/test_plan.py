"""Planner unit tests: fake ranks for world sizes 1-8, no process group.

For each (saved N, loaded M, rank) the plan is computed exactly as a real rank would, executed
without a process group, and the result compared with the test's own SAT split. Byte counts
are exact, so they are asserted exactly.
"""
import math
import os

import pytest
import torch

from sat_dist import formats
from sat_dist.config import build_model_config
from sat_dist.errors import ConfigError, PlanError
from sat_dist.formats.base import IndexRequest
from sat_dist.index import CheckpointIndex, Piece, StoredTensor
from sat_dist.materialize import materialize
from sat_dist.models import TPInfo, build_meta_model, collect_specs
from sat_dist.placement import Box, Fragment, Layout, Split, files_needed, flat_range_boxes
from sat_dist.plan import byte_runs, make_plan, split_box
from sat_rules import CONFIGS, full_state_dict, sat_split, write_sat_checkpoint

# Plain attention (QKV stride 3); heads 8, MLP 840 = 2^3*3*5*7, vocab 1680: TP in {1,2,4,8}
# divides all, 3, 5, 6 and 7 divide the MLP only.
CFG = dict(CONFIGS["plain"], vocab_size=1680, inner_hidden_size=840)
# Grouped-query attention (ratio stride (8, 2, 2)) with a gated MLP: TP in {1, 2}.
GQA = dict(CONFIGS["plain"], num_multi_query_heads=2, is_gated_mlp=True, vocab_size=1680)


def write_all(tmp_path_factory, cfg, sizes):
    full = full_state_dict(cfg, seed=3)
    roots = {}
    for n in sizes:
        root = str(tmp_path_factory.mktemp(f"ckpt_n{n}"))
        write_sat_checkpoint(root, cfg, full, n)
        roots[n] = root
    return full, roots


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return write_all(tmp_path_factory, CFG, (1, 2, 4, 8))


@pytest.fixture(scope="module")
def saved_gqa(tmp_path_factory):
    return write_all(tmp_path_factory, GQA, (1, 2))


def specs_for(m: int, r: int, cfg=CFG):
    model_cfg = build_model_config(dict(cfg, model_class="BaseModel"))
    return collect_specs(build_meta_model(model_cfg, TPInfo(m, r)))


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("m", [1, 2])
def test_gqa_gated_every_rank_gets_sat_split(saved_gqa, n, m):
    full, roots = saved_gqa
    for r in range(m):
        specs = specs_for(m, r, GQA)
        index, prefer = formats.open_index(IndexRequest(roots[n], specs, m, r))
        tensors, stats = materialize(make_plan(specs, m, r, index, prefer=prefer), torch.device("cpu"))
        for name, t in tensors.items():
            assert torch.equal(t, sat_split(name, full[name], m, r, GQA)), (n, m, r, name)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_every_rank_gets_sat_split_and_reads_only_its_bytes(saved, n, m):
    full, roots = saved
    for r in range(m):
        specs = specs_for(m, r)
        index, prefer = formats.open_index(IndexRequest(roots[n], specs, m, r))
        plan = make_plan(specs, m, r, index, prefer=prefer, max_op_bytes=1 << 14)
        tensors, stats = materialize(plan, torch.device("cpu"))
        assert set(tensors) == set(full)
        for name, t in tensors.items():
            assert torch.equal(t, sat_split(name, full[name], m, r, CFG)), (n, m, r, name)
        # exact accounting: what was read is exactly what the rank needs, nothing more
        assert stats.bytes_read == plan.bytes_to_read == plan.bytes_needed
        assert plan.bytes_needed == sum(t.numel() * t.element_size() for t in tensors.values())
        # only overlapping files are opened: at M >= N one file, at M < N exactly N/M files
        assert len(plan.files) == max(1, n // m)
        assert all(op.nbytes <= 1 << 14 for op in plan.ops)


def test_world_sizes_3_to_7_rejected_before_planning():
    cfg = build_model_config(dict(CFG, model_class="BaseModel"))
    for m in (3, 5, 6, 7):
        with pytest.raises(ConfigError, match=r"TP=%d does not divide num_attention_heads=8" % m) as e:
            cfg.check_tp(m)
        assert "[1, 2, 4, 8]" in str(e.value)


def test_files_needed_is_pure_and_minimal():
    specs = specs_for(1, 0)
    assert files_needed(specs, 8, 2, 0) == [0, 1, 2, 3]
    assert files_needed(specs, 8, 2, 1) == [4, 5, 6, 7]
    assert files_needed(specs, 2, 8, 5) == [1]
    assert files_needed(specs, 1, 4, 3) == [0]


def test_byte_runs_row_block_is_one_run_and_column_block_one_per_row():
    st = StoredTensor("f", 1000, torch.float32, (6, 8), (8, 1))
    rows = byte_runs(st, Box((2, 0), (3, 8)))
    assert [(r.first, r.length, r.count) for r in rows] == [(1000 + 2 * 32, 96, 1)]
    cols = byte_runs(st, Box((0, 4), (6, 4)))
    assert [(r.first, r.length, r.step, r.count) for r in cols] == [(1016, 16, 32, 6)]
    assert sum(r.nbytes for r in cols) == 6 * 4 * 4
    cube = StoredTensor("f", 0, torch.bfloat16, (2, 3, 4), (12, 4, 1))
    runs = byte_runs(cube, Box((0, 1, 1), (2, 2, 2)))
    got = sorted(o for rs in runs for o, _ in rs.runs())
    want = sorted(2 * (i * 12 + j * 4 + 1) for i in range(2) for j in (1, 2))
    assert got == want and all(length == 4 for rs in runs for _, length in rs.runs())


def test_split_box_bounds_every_chunk_and_covers_the_region():
    for sizes in [(7, 5), (1, 17776, 3), (33,), (4, 3, 2)]:
        chunks = list(split_box(sizes, 4, 48))
        assert sum(math.prod(s) for _, s in chunks) == math.prod(sizes)
        assert all(math.prod(s) * 4 <= 48 for _, s in chunks)


def test_gqa_ratio_split_fragments():
    frags = Split(0, 2, 1, (8, 2, 2)).fragments((96, 4))  # q 64 rows, k 16, v 16
    assert [(f.logical.offsets[0], f.logical.sizes[0], f.local_offsets[0]) for f in frags] == [
        (32, 32, 0), (72, 8, 32), (88, 8, 40)]


def test_flat_range_boxes_cover_a_flat_range_in_order():
    t = torch.arange(3 * 4 * 5).reshape(3, 4, 5)
    for a, b in [(0, 60), (3, 57), (7, 8), (20, 40), (19, 41)]:
        parts = []
        for off, box in flat_range_boxes(t.shape, a, b):
            v = t[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))].reshape(-1)
            assert v[0].item() == off
            parts.append(v)
        assert torch.equal(torch.cat(parts), torch.arange(a, b))


def _piece(name, file, shape, box, local=(0, 0)):
    st = StoredTensor(file, 0, torch.float32, shape, (shape[1], 1))
    return Piece(name, st, (Fragment(box, local),))


def test_plan_validation_rejects_gaps_and_overlaps():
    spec = {"w": collect_specs(torch.nn.Linear(4, 4, bias=False))["weight"]}
    gap = CheckpointIndex("root", "test", {"w": [_piece("w", "a", (2, 4), Box((0, 0), (2, 4)))]})
    with pytest.raises(PlanError, match="covers 8 of its 16"):
        make_plan(spec, 1, 0, gap)
    overlap = CheckpointIndex("root", "test", {"w": [
        _piece("w", "a", (3, 4), Box((0, 0), (3, 4))), _piece("w", "b", (3, 4), Box((1, 0), (3, 4)))]})
    with pytest.raises(PlanError, match="overlap"):
        make_plan(spec, 1, 0, overlap)
    with pytest.raises(PlanError, match="not in the checkpoint"):
        make_plan(spec, 1, 0, CheckpointIndex("root", "test", {}))


def test_replicated_tensor_read_once_from_preferred_file(saved):
    _, roots = saved
    specs = specs_for(2, 1)
    index, prefer = formats.open_index(IndexRequest(roots[4], specs, 2, 1))
    plan = make_plan(specs, 2, 1, index, prefer=prefer)
    ln = [op for op in plan.ops if op.name == "transformer.final_layernorm.weight"]
    assert len(ln) == 1 and os.path.basename(ln[0].file) == "mp_rank_02_model_states.pt"


def test_dtype_cast_only_when_asked(saved):
    full, roots = saved
    specs = specs_for(2, 0)
    index, prefer = formats.open_index(IndexRequest(roots[1], specs, 2, 0))
    kept, _ = materialize(make_plan(specs, 2, 0, index, prefer=prefer), torch.device("cpu"))
    cast, _ = materialize(make_plan(specs, 2, 0, index, dtype=torch.bfloat16, prefer=prefer), torch.device("cpu"))
    name = "transformer.layers.0.attention.dense.weight"
    assert kept[name].dtype == torch.float32 and cast[name].dtype == torch.bfloat16
    assert torch.equal(cast[name], sat_split(name, full[name], 2, 0, CFG).to(torch.bfloat16))


def test_layout_placements():
    assert Layout().placement(4, 2).local_shape((8, 8)) == (8, 8)
    assert Layout(1).placement(4, 2).local_shape((8, 8)) == (8, 2)
