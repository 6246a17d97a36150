"""Integrity: `sat-dist manifest` (SHA-256 per block, written atomically) and `load --verify`, which
hashes the blocks under each rank's own reads. Randomized bit flips anywhere a rank reads are all
detected, naming the file and the block, on every rank."""
from __future__ import annotations

import json
import os
import random

import pytest

import sat_dist
from sat_dist import formats
from sat_dist.cli import main as cli_main
from sat_dist.config import build_model_config
from sat_dist.errors import IntegrityError
from sat_dist.formats.base import IndexRequest
from sat_dist.integrity import (MANIFEST_NAME, atomic_write, blocks_read, checkpoint_files, read_manifest,
                                verify_plan, write_manifest)
from sat_dist.models import TPInfo, build_meta_model, collect_specs
from sat_dist.plan import make_plan
from sat_dist.testing.dist import run_ranks, values
from sat_rules import CONFIGS, full_state_dict, write_sat_checkpoint

CFG = CONFIGS["plain"]
BLOCK = 4096


@pytest.fixture()
def ckpt(tmp_path):
    root = str(tmp_path / "ckpt")
    write_sat_checkpoint(root, CFG, full_state_dict(CFG, seed=4), 2)
    write_manifest(checkpoint_files(root), os.path.join(root, MANIFEST_NAME), BLOCK)
    return root


def _plan(root: str, tp: int, rank: int):
    model = build_meta_model(build_model_config(dict(model_class="BaseModel", **CFG)), TPInfo(tp, rank, None))
    specs = collect_specs(model)
    index, prefer = formats.open_index(IndexRequest(root, specs, tp, rank))
    return make_plan(specs, tp, rank, index, None, prefer, 1 << 20)


def _flip(path: str, offset: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))


def test_manifest_cli_writes_every_file_atomically(tmp_path):
    root = str(tmp_path / "ckpt")
    write_sat_checkpoint(root, CFG, full_state_dict(CFG), 1)
    assert cli_main(["manifest", root, "--block-mib", "1"]) == 0
    m = json.load(open(os.path.join(root, MANIFEST_NAME)))
    assert set(m["files"]) == {"latest", "model_config.json", "1000/mp_rank_00_model_states.pt"}
    size = os.path.getsize(os.path.join(root, "1000", "mp_rank_00_model_states.pt"))
    assert m["files"]["1000/mp_rank_00_model_states.pt"]["bytes"] == size
    assert len(m["files"]["1000/mp_rank_00_model_states.pt"]["sha256"]) == -(-size // (1 << 20))
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")]
    # written again: the manifest does not list itself
    assert cli_main(["manifest", root]) == 0
    assert MANIFEST_NAME not in json.load(open(os.path.join(root, MANIFEST_NAME)))["files"]


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = str(tmp_path / "out.json")
    atomic_write(path, b"old")

    with pytest.raises(TypeError):
        atomic_write(path, None)  # fails mid-write
    assert open(path, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["out.json"]


def test_blocks_cover_every_planned_byte(ckpt):
    for rank in range(2):
        plan = _plan(ckpt, 2, rank)
        sizes = {f: os.path.getsize(f) for f in plan.files}
        blocks = blocks_read(plan, BLOCK, sizes)
        for op in plan.ops:
            for rs in op.runs:
                for off, n in rs.runs():
                    assert {off // BLOCK, (off + n - 1) // BLOCK} <= blocks[op.file]
        # a rank at TP=2 reads its own mp file, and about its share of it
        assert len(blocks) == 1
        f = next(iter(blocks))
        assert len(blocks[f]) <= -(-sizes[f] // BLOCK)


def test_random_bit_flips_in_read_bytes_are_all_detected(ckpt):
    """200 random flips, each in a byte some rank's plan reads (plus the headers it parsed): the
    rank's verification names the file and the block holding the byte."""
    manifest = read_manifest(os.path.join(ckpt, MANIFEST_NAME))
    plans = [_plan(ckpt, 2, r) for r in range(2)]
    rng = random.Random(13)
    detected = 0
    for _ in range(200):
        rank = rng.randrange(2)
        plan = plans[rank]
        op = rng.choice(plan.ops)
        off, n = rng.choice(list(rng.choice(op.runs).runs()))
        byte, bit = off + rng.randrange(n), rng.randrange(8)
        _flip(op.file, byte, bit)
        try:
            with pytest.raises(IntegrityError) as err:
                verify_plan(plan, manifest)
            assert f"{op.file}: block {byte // BLOCK} " in str(err.value), str(err.value)
            detected += 1
        finally:
            _flip(op.file, byte, bit)
    assert detected == 200
    for plan in plans:  # restored: clean again
        verify_plan(plan, manifest)


def _load(rank, path, verify):
    sat_dist.load_model(path, tp=2, verify=verify, timeout_s=60)
    return "loaded"


def test_verify_fails_every_rank_naming_file_and_block(ckpt):
    assert values(run_ranks(2, _load, ckpt, True)) == ["loaded", "loaded"]
    plan = _plan(ckpt, 2, 1)
    op = plan.ops[len(plan.ops) // 2]
    byte = op.runs[0].first + 3
    _flip(op.file, byte, 5)
    results = run_ranks(2, _load, ckpt, True)
    assert {r.error_type for r in results} == {"GroupLoadError"}, [(r.error_type, r.error) for r in results]
    assert len({r.error for r in results}) == 1
    msg = results[0].error
    assert "rank(s) [1]" in msg and "IntegrityError" in msg and f"block {byte // BLOCK} " in msg, msg
    assert "mp_rank_01_model_states.pt" in msg and "copy it again" in msg


def test_verify_refuses_missing_manifest_and_changed_sizes(ckpt, tmp_path):
    os.rename(os.path.join(ckpt, MANIFEST_NAME), str(tmp_path / "elsewhere.json"))
    results = run_ranks(2, _load, ckpt, True)
    assert "does not exist" in results[0].error and "sat-dist manifest" in results[0].error
    assert values(run_ranks(2, _load, ckpt, str(tmp_path / "elsewhere.json"))) == ["loaded", "loaded"]
    with open(os.path.join(ckpt, "1000", "mp_rank_00_model_states.pt"), "ab") as f:
        f.write(b"x")
    results = run_ranks(2, _load, ckpt, str(tmp_path / "elsewhere.json"))
    assert "has 1 more" not in results[0].error and "the manifest" in results[0].error
    assert "rank(s) [0]" in results[0].error, results[0].error


def test_manifest_is_validated(tmp_path):
    bad = tmp_path / "m.json"
    for text in ("[]", "{", json.dumps({"format": "sat-dist-manifest", "algorithm": "sha256", "block_bytes": 0,
                                        "files": {}}),
                 json.dumps({"format": "sat-dist-manifest", "algorithm": "sha256", "block_bytes": 4096,
                             "files": {"a": {"bytes": 5000, "sha256": ["0" * 64]}}})):
        bad.write_text(text)
        with pytest.raises(IntegrityError, match="not a usable sat-dist manifest"):
            read_manifest(str(bad))


def _load_dp(rank, path):
    sat_dist.load_model(path, tp=1, verify=True, timeout_s=60, exchange="on")
    return "loaded"


def test_verify_with_the_exchange_each_rank_checks_what_it_reads(tmp_path):
    """TP=1 on 2 ranks: the exchange splits the reading; a flip in any tensor fails every rank with the
    agreed error (phase 'verify'), naming the one rank that read the block, before any collective of the
    read phase."""
    root = str(tmp_path / "ckpt")
    write_sat_checkpoint(root, CFG, full_state_dict(CFG, seed=4), 1)
    write_manifest(checkpoint_files(root), os.path.join(root, MANIFEST_NAME), BLOCK)
    assert values(run_ranks(2, _load_dp, root)) == ["loaded", "loaded"]
    plan = _plan(root, 1, 0)
    op = max(plan.ops, key=lambda o: o.nbytes)
    byte = op.runs[0].first + op.nbytes // 2
    _flip(op.file, byte, 2)
    results = run_ranks(2, _load_dp, root)
    assert {r.error_type for r in results} == {"GroupLoadError"} and len({r.error for r in results}) == 1
    msg = results[0].error
    assert "during 'verify'" in msg and f"block {byte // BLOCK} " in msg, msg
    assert msg.count("IntegrityError") == 1, msg  # only the rank that reads the block checks it
