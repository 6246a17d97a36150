"""torch.distributed.checkpoint folders written by `dcp.save` from 2- and 4-rank gloo DTensor jobs
(Shard(0), Shard(1), Replicate; 1-D and 2-D meshes; uneven shards) load at TP 1, 2, 4 with the
same per-rank digests as a SAT checkpoint of the same weights, reading only each rank's bytes.
Untrusted `.metadata` and items: foreign globals refused by name with no code run, truncation and
malformed metadata refused by name on every rank."""
import json
import os
import pickle
import shutil

import pytest
import torch
import torch.distributed.checkpoint  # noqa: F401 - imported once here, not in every forked rank
import torch.distributed.tensor  # noqa: F401

import sat_dist
from sat_dist import formats
from sat_dist.config import build_model_config
from sat_dist.errors import CheckpointError, UnsafeCheckpointError
from sat_dist.formats import dcp
from sat_dist.formats.base import IndexRequest
from sat_dist.formats.dcp_metadata import read_metadata
from sat_dist.placement import REPLICATED, Layout, TensorSpec
from sat_dist.testing.dist import run_ranks, values
from sat_dist.writer import model_config_dict
from sat_rules import full_state_dict, write_sat_checkpoint

# max_sequence_length 30: position embeddings shard unevenly (8, 8, 8, 6) over 4 saving ranks
CFG = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=1024, max_sequence_length=30)
SEED = 5
# name -> (saving world, mesh shape, key prefix, extra non-model entries, placement shift)
SAVES = {"w2": (2, (2,), "", False, 0), "w4": (4, (4,), "model.", True, 1), "w4_2d": (4, (2, 2), "", False, 2)}


def _placements(kind: int, ndim: int, mesh_dims: int):
    from torch.distributed.tensor import Replicate, Shard

    kind %= 3
    if mesh_dims == 1:
        return [(Shard(0), Shard(ndim - 1), Replicate())[kind]]
    return [(Shard(0), Shard(ndim - 1)), (Replicate(), Shard(0)), (Replicate(), Replicate())][kind]


def _row_split(full):
    """Matrices whose rows TP=4 splits evenly (saved again, Shard(0), under `rows.` in "w4")."""
    return {n: t for n, t in full.items() if t.dim() == 2 and t.shape[0] % 4 == 0}


def _save(rank, path, mesh_shape, prefix, extra, shift):
    import torch.distributed as dist
    import torch.distributed.checkpoint as tdcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", mesh_shape)
    full = full_state_dict(CFG, seed=SEED)
    seen = {1: shift, 2: shift}  # cycle the kinds separately over vectors and matrices
    sd = {}
    for name, t in sorted(full.items()):
        sd[prefix + name] = distribute_tensor(t, mesh, list(_placements(seen[t.dim()], t.dim(), len(mesh_shape))))
        seen[t.dim()] += 1
    if extra:  # other parts of a training save, outside the model's `model.` subtree: ignored by the load
        sd.update({"optimizer.step": 7, "optimizer.scale": torch.ones(3)})
        sd.update({"rows." + n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in _row_split(full).items()})
    tdcp.save(sd, checkpoint_id=path)
    return sorted(os.listdir(path))


def _model_config() -> dict:
    return model_config_dict(build_model_config({"model_class": "BaseModel", **CFG}))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("dcp")
    roots = {"sat": str(base / "sat")}
    write_sat_checkpoint(roots["sat"], CFG, full_state_dict(CFG, seed=SEED), 1)
    chunks = []
    for name, (world, mesh, prefix, extra, shift) in SAVES.items():
        roots[name] = str(base / name)
        listing = values(run_ranks(world, _save, roots[name], mesh, prefix, extra, shift))[0]
        assert ".metadata" in listing and sum(f.endswith(".distcp") for f in listing) == world
        with open(os.path.join(roots[name], "model_config.json"), "w") as f:
            json.dump(_model_config(), f)
        chunks += [t.chunks for t in read_metadata(roots[name]).tensors.values()]
    # the saves hold row and column chunks, 2-D grid chunks, uneven chunks and deduplicated replicas
    assert any(len(cs) > 1 and len(cs[0].sizes) == 2 and all(c.offsets[0] == 0 for c in cs) for cs in chunks)
    assert any(len({c.offsets[0] for c in cs}) == 2 == len({c.offsets[-1] for c in cs}) for cs in chunks)
    assert any(len({c.sizes for c in cs}) > 1 for cs in chunks)
    assert any(len(cs) == 1 for cs in chunks)
    return roots


def _report(rank, path, tp):
    _, rep = sat_dist.load_model(path, tp=tp, return_report=True, digest=True)
    return rep.ranks[rank]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_dcp_loads_like_sat_at_any_tp(ckpts, tp):
    sat_reps = values(run_ranks(tp, _report, ckpts["sat"], tp))
    for name in SAVES:
        for rank, (rep, sat_rep) in enumerate(zip(values(run_ranks(tp, _report, ckpts[name], tp)), sat_reps)):
            assert rep.digest == sat_rep.digest, (name, tp, rank)
            assert rep.bytes_needed == sat_rep.bytes_needed
            assert rep.bytes_read <= 1.05 * rep.bytes_needed, (name, rep.bytes_read, rep.bytes_needed)


def _specs(full, split_dim=None):
    layout = REPLICATED if split_dim is None else Layout(split_dim)
    return {n: TensorSpec(tuple(t.shape), layout) for n, t in full.items()}


def test_only_needed_files_are_opened(ckpts, monkeypatch):
    """TP=4 of a 4-rank Shard(0) save: rank r opens exactly saving rank r's .distcp file (and the
    model's own load found its tensors under `model.` beside `rows.` and `optimizer.`)."""
    row_split = _row_split(full_state_dict(CFG, seed=SEED))
    assert len(row_split) >= 5
    opened, real_open = [], os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: (opened.append(os.path.basename(p)), real_open(p, *a, **k))[1])
    for r in range(4):
        opened.clear()
        idx, files = dcp.index(IndexRequest(ckpts["w4"], _specs(row_split, 0), 4, r, prefix="rows."))
        assert [os.path.basename(f) for f in files] == [f"__{r}_0.distcp"] == opened
        assert idx.meta["key_prefix"] == "rows."
        assert all(len(idx.pieces[n]) == 1 for n in row_split)


def test_describe_and_model_config(ckpts):
    assert formats.reader_for(ckpts["w4_2d"]) is dcp and dcp.recognise(ckpts["w4_2d"], None)
    assert not dcp.recognise(ckpts["sat"], None)
    info = formats.describe(ckpts["w4"])
    full = full_state_dict(CFG)
    assert info["format"] == "dcp" and info["tensors"] == len(full) + 1 + len(_row_split(full))
    assert [f["file"] for f in info["files"]] == [f"__{r}_0.distcp" for r in range(4)]
    assert all(f["bytes"] == os.path.getsize(os.path.join(ckpts["w4"], f["file"])) for f in info["files"])
    text = formats.render(info)
    assert "version 1.0.0" in text and "1 non-tensor entries" in text and "model (" in text
    assert dcp.model_config(ckpts["w2"]) == _model_config() and dcp.model_config(ckpts["sat"] + "/1000") is None


def test_plain_tensors_strided_bf16_scalar_empty(tmp_path):
    """One process, no group: DCP keeps a transposed tensor's strides in its item (clone() preserves
    them), so the stored view is read as strided, not assumed contiguous."""
    import warnings

    import torch.distributed.checkpoint as tdcp
    from sat_dist.materialize import materialize
    from sat_dist.plan import make_plan

    g = torch.Generator().manual_seed(3)
    sd = {"t": torch.randn(6, 4, generator=g).t(), "b": torch.randn(3, 2, generator=g).to(torch.bfloat16),
          "s": torch.tensor(1.5), "e": torch.empty(0, 3)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tdcp.save(sd, checkpoint_id=str(tmp_path))
    specs = {"t": TensorSpec((4, 6), Layout(1)), **{n: TensorSpec(tuple(sd[n].shape), REPLICATED) for n in "bse"}}
    for r in range(2):
        idx, files = dcp.index(IndexRequest(str(tmp_path), specs, 2, r))
        assert idx.pieces["t"][0].stored.stride == (1, 4)
        plan = make_plan(specs, 2, r, idx, None, files)
        got, stats = materialize(plan, torch.device("cpu"))
        assert torch.equal(got["t"], sd["t"].chunk(2, dim=1)[r])
        assert all(torch.equal(got[n], sd[n]) for n in "bse") and stats.bytes_read == plan.bytes_needed


# --- untrusted input --------------------------------------------------------------------------------

@pytest.fixture()
def w2(ckpts, tmp_path):
    root = str(tmp_path / "w2")
    shutil.copytree(ckpts["w2"], root)
    return root


def _rewrite_metadata(root, edit):
    """Test side (trusted): torch's own classes, edited, pickled back."""
    path = os.path.join(root, ".metadata")
    with open(path, "rb") as f:
        md = pickle.load(f)
    edit(md)
    with open(path, "wb") as f:
        pickle.dump(md, f)


def _load(rank, path, tp):
    sat_dist.load_model(path, tp=tp)


def _same_error_everywhere(results, *needles):
    assert {r.error_type for r in results} == {"GroupLoadError"}, [(r.error_type, r.error) for r in results]
    assert len({r.error for r in results}) == 1
    for needle in needles:
        assert needle in results[0].error, results[0].error


class _Evil:
    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return os.system, (f"touch {self.canary}",)


def test_forbidden_global_is_refused_by_name_without_running(w2, tmp_path):
    canary = tmp_path / "canary"
    path = os.path.join(w2, ".metadata")
    with open(path, "rb") as f:
        md = pickle.load(f)  # the genuine metadata (test side); then a copy carrying a payload
    md.planner_data = _Evil(canary)
    inside_real = pickle.dumps(md)
    with open(path, "wb") as f:  # a hand-written protocol-0 pickle naming os.system
        f.write(f"cos\nsystem\n(S'touch {canary}'\ntR.".encode())
    _same_error_everywhere(run_ranks(2, _load, w2, 2), "UnsafeCheckpointError", "'os.system'", "rank(s) [0, 1]")
    with open(path, "wb") as f:
        f.write(inside_real)
    with pytest.raises(UnsafeCheckpointError, match="'posix.system'"):
        dcp.describe(w2, None)
    assert not canary.exists()


def test_truncated_distcp_fails_every_rank(w2):
    md = read_metadata(w2)
    replicated = next(t for t in md.tensors.values() if len(t.chunks) == 1)  # every rank needs it
    item = replicated.chunks[0].item
    with open(os.path.join(w2, item.file), "r+b") as f:
        f.truncate(item.offset + item.length - 10)
    _same_error_everywhere(run_ranks(2, _load, w2, 2), item.file, "the file is truncated", "rank(s) [0, 1]")
    assert "TRUNCATED" in formats.render(dcp.describe(w2, None))


def _first_item(md):
    return next(iter(md.storage_data.values()))


def _first_tensor(md):
    return next(v for v in md.state_dict_metadata.values() if hasattr(v, "chunks"))


@pytest.mark.parametrize("edit, needle", [
    (lambda md: setattr(_first_item(md), "transform_descriptors", ["stream.zstd"]), "stream transform(s) ['stream.zstd']"),
    (lambda md: setattr(_first_item(md), "relative_path", "../elsewhere.distcp"), "not inside the folder"),
    (lambda md: setattr(_first_item(md), "offset", 10 ** 9), "the file is truncated"),
    (lambda md: setattr(_first_tensor(md).chunks[0], "sizes", torch.Size([10 ** 6] * len(_first_tensor(md).size))),
     "outside it"),
    (lambda md: _first_tensor(md).chunks.pop(), "the metadata is corrupt"),
    (lambda md: setattr(_first_tensor(md).chunks[-1], "offsets", torch.Size([1] * len(_first_tensor(md).size))),
     "has no storage entry"),
    (lambda md: setattr(list(md.storage_data.values())[1], "offset", 1), "overlap in"),
    (lambda md: setattr(_first_tensor(md).properties, "layout", torch.sparse_coo), "only strided"),
    (lambda md: setattr(_first_tensor(md).properties, "dtype", torch.float16), "dtype torch.float32 (metadata: torch.float16)"),
])
def test_malformed_metadata_is_refused_by_name(w2, edit, needle):
    _rewrite_metadata(w2, edit)
    full = full_state_dict(CFG, seed=SEED)
    with pytest.raises(CheckpointError) as exc:
        dcp.index(IndexRequest(w2, _specs(full), 1, 0))
    assert needle in str(exc.value)


def _patch_item(root, patch):
    """Apply `patch(item bytes) -> bytes` (same length) to the first tensor's first item on disk."""
    item = next(iter(read_metadata(root).tensors.values())).chunks[0].item
    with open(os.path.join(root, item.file), "r+b") as f:
        f.seek(item.offset)
        data = f.read(item.length)
        new = patch(bytearray(data))
        assert len(new) == len(data)
        f.seek(item.offset)
        f.write(new)


def _at(marker, rel, value, last=True):
    def patch(b):
        i = (b.rfind if last else b.find)(marker) + rel
        b[i:i + len(value)] = value
        return b
    return patch


def _index_w2(root, **kw):
    return dcp.index(IndexRequest(root, _specs(full_state_dict(CFG, seed=SEED)), 1, 0, **kw))


def test_zip64_directory_is_followed(w2):
    """torch writes zip64 end records too; an item whose plain end record defers to them still reads."""
    before = _index_w2(w2)[0].pieces
    _patch_item(w2, _at(b"PK\x05\x06", 10, b"\xff\xff"))  # entry count -> 0xFFFF: use the zip64 record
    assert _index_w2(w2)[0].pieces == before


@pytest.mark.parametrize("patch, needle", [
    (_at(b"PK\x05\x06", 0, b"\0" * 22), "no zip end record"),
    (_at(b"PK\x01\x02", 10, b"\x08", last=False), "is compressed"),
    (_at(b"little", 0, b"big\0\0\0"), "big-endian"),
    (_at(b"PK\x03\x04", 0, b"XXXX", last=False), "corrupt local header of 'data.pkl'"),
    (_at(b"FloatStorage", 0, b"FloatStorag_"), "'torch.FloatStorag_'"),
])
def test_corrupt_item_is_refused_by_name(w2, patch, needle):
    _patch_item(w2, patch)
    with pytest.raises(CheckpointError) as exc:
        _index_w2(w2)
    assert needle in str(exc.value)


def test_more_refusals(w2, ckpts):
    with pytest.raises(CheckpointError, match="non-tensor"):
        dcp.index(IndexRequest(ckpts["w4"], {"step": TensorSpec((), REPLICATED)}, 1, 0, prefix="optimizer."))
    with pytest.raises(sat_dist.errors.ConfigError, match="fp32"):
        _index_w2(w2, weights="fp32")
    meta = os.path.join(w2, ".metadata")
    data = open(meta, "rb").read()
    for content, needle in ((data[: len(data) // 2], "truncated or corrupt"), (pickle.dumps({"a": 1}), "not a DCP Metadata")):
        with open(meta, "wb") as f:
            f.write(content)
        with pytest.raises(CheckpointError, match=needle):
            _index_w2(w2)
    with open(meta, "wb") as f:
        f.write(data)
    os.remove(os.path.join(w2, "__1_0.distcp"))
    with pytest.raises(CheckpointError, match="cannot open .*__1_0.distcp"):
        _index_w2(w2)
    assert "MISSING" in formats.render(dcp.describe(w2, None))
