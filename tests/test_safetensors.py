"""The safetensors reader: files written by `safetensors.torch.save_file` (one file, and shards with
the index huggingface_hub/transformers write) load at TP 1, 2, 4 on forked gloo ranks with the same
per-rank digests as the SAT checkpoint of the same weights, reading only each rank's bytes; a
corpus of malformed files fails on every rank with a named error from header validation, no hang
and no allocation sized by the file's claims; `inspect` reads headers only.
"""
import json
import os
import shutil
import struct
import tracemalloc

import pytest
import torch
from safetensors.torch import save_file

import sat_dist
from sat_dist import formats
from sat_dist.cli import main as cli_main
from sat_dist.errors import CheckpointError, ConfigError, MalformedCheckpointError
from sat_dist.formats import safetensors as reader
from sat_dist.formats.base import IndexRequest
from sat_dist.formats.safetensors_header import read_header, read_weight_map
from sat_dist.placement import REPLICATED, TensorSpec
from sat_dist.testing.dist import run_ranks, values
from sat_rules import CONFIGS, full_state_dict, write_sat_checkpoint

PLAIN = CONFIGS["plain"]
MODEL_CONFIG = {"model_class": "BaseModel", **PLAIN, "model_parallel_size": 1}


def save_sharded(full: dict, folder: str, shards: int, first_metadata: dict | None = None) -> str:
    """Shards `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`, laid out as
    huggingface_hub's split_torch_state_dict_into_shards / transformers' save_pretrained do."""
    os.makedirs(folder, exist_ok=True)
    names = list(full)
    chunks = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, chunk in enumerate(chunks):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: full[k] for k in chunk}, os.path.join(folder, fname),
                  metadata={"format": "pt", **(first_metadata if i == 0 and first_metadata else {})})
        weight_map.update(dict.fromkeys(chunk, fname))
    total = sum(t.numel() * t.element_size() for t in full.values())
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return index


def write_config_json(folder: str) -> None:
    with open(os.path.join(folder, "model_config.json"), "w") as f:
        json.dump(MODEL_CONFIG, f)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """The same weights as a SAT mp=1 checkpoint, one safetensors file (config in the header
    metadata) and 3 shards + index (config in a model_config.json beside them); bf16 twins."""
    out = {}
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        full = full_state_dict(PLAIN, seed=11, dtype=dtype)
        sat_root = str(tmp_path_factory.mktemp(f"sat_{tag}"))
        write_sat_checkpoint(sat_root, PLAIN, full, 1)
        single = str(tmp_path_factory.mktemp(f"single_{tag}") / "weights.safetensors")
        save_file(full, single, metadata={"format": "pt", "model_config": json.dumps(MODEL_CONFIG)})
        shards = str(tmp_path_factory.mktemp(f"shards_{tag}"))
        index = save_sharded(full, shards, 3)
        write_config_json(shards)
        out[tag] = {"full": full, "sat": sat_root, "single": single, "sharded": index}
    return out


def _load(rank, path, tp, config=None):
    opened = []
    real = reader.read_header
    reader.read_header = lambda p: (opened.append(p), real(p))[1]
    _, rep = sat_dist.load_model(path, config, tp=tp, return_report=True, digest=True, exchange="off")
    return rep.ranks[rank], sorted(set(opened))


_SAT_DIGESTS: dict = {}


def _sat_digests(root: str, tp: int) -> list[str]:
    if (root, tp) not in _SAT_DIGESTS:
        _SAT_DIGESTS[root, tp] = [r.digest for r, _ in values(run_ranks(tp, _load, root, tp))]
    return _SAT_DIGESTS[root, tp]


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_load_equals_sat_load(ckpts, kind, tp):
    c = ckpts["fp32"]
    shard_files = sorted(set(read_weight_map(c["sharded"]).values()))
    want = _sat_digests(c["sat"], tp)
    for rank, (rep, opened) in enumerate(values(run_ranks(tp, _load, c[kind], tp))):
        assert (rep.rank, rep.tp_rank) == (rank, rank)
        assert rep.digest == want[rank], (kind, tp, rank)
        assert rep.bytes_needed * 1.0 <= rep.bytes_read <= 1.05 * rep.bytes_needed
        assert opened == ([c["single"]] if kind == "single" else shard_files)
    if tp > 1:  # each rank reads its shard, not the file
        data = sum(t.numel() * t.element_size() for t in c["full"].values())
        assert rep.bytes_read < 0.6 * data


def test_bf16_file_loads_like_bf16_sat(ckpts):
    c = ckpts["bf16"]
    for kind in ("single", "sharded"):
        got = [rep.digest for rep, _ in values(run_ranks(2, _load, c[kind], 2))]
        assert got == _sat_digests(c["sat"], 2), kind


def test_yaml_config_for_a_bare_file(ckpts, tmp_path):
    """No metadata, no model_config.json: the model comes from a YAML `model:` section."""
    path = str(tmp_path / "bare.safetensors")
    save_file(ckpts["fp32"]["full"], path)
    assert formats.model_config(path) is None
    yaml = tmp_path / "model.yaml"
    yaml.write_text("model:\n" + "".join(f"  {k}: {v}\n" for k, v in PLAIN.items()))
    (rep, _), = values(run_ranks(1, _load, path, 1, str(yaml)))
    assert rep.digest == _sat_digests(ckpts["fp32"]["sat"], 1)[0]


# --- the reader on its own (one process) -----------------------------------------------------------

def test_header_locates_every_dtype_like_the_package(tmp_path):
    """Offsets, dtypes and shapes from our header parse give back exactly what save_file wrote,
    including 0-rank and empty tensors (allowed by the format)."""
    g = torch.Generator().manual_seed(0)
    tensors = {"f64": torch.randn(3, 2, dtype=torch.float64, generator=g), "f16": torch.randn(2, 3, 4).half(),
               "bf16": torch.randn(5, generator=g).bfloat16(), "i64": torch.arange(7), "i16": torch.arange(4).short(),
               "i8": torch.arange(-3, 3).to(torch.int8), "u8": torch.arange(9).to(torch.uint8),
               "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(3.5), "empty": torch.empty(0, 4)}
    if hasattr(torch, "float8_e4m3fn"):
        tensors["f8"] = torch.randn(6, generator=g).to(torch.float8_e4m3fn)
    path = str(tmp_path / "all.safetensors")
    save_file(tensors, path, metadata={"k": "v"})
    h = read_header(path)
    assert h.metadata == {"k": "v"} and set(h.tensors) == set(tensors) and h.size == os.path.getsize(path)
    raw = open(path, "rb").read()
    for name, t in tensors.items():
        st = h.tensors[name]
        assert (st.dtype, st.shape) == (t.dtype, tuple(t.shape)), name
        got = torch.frombuffer(bytearray(raw[st.byte_offset:st.byte_offset + st.extent_bytes()]) or bytearray(1),
                               dtype=torch.uint8)[:st.extent_bytes()]
        assert torch.equal(got, t.contiguous().reshape(-1).view(torch.uint8)), name


def _specs(full: dict) -> dict:
    return {k: TensorSpec(tuple(v.shape), REPLICATED) for k, v in full.items()}


def test_only_shards_holding_model_tensors_are_opened(ckpts, tmp_path):
    """With a prefix, a shard holding only other tensors (T5 `conditioner.*`) is never opened:
    here it is garbage, so opening it would fail."""
    full = ckpts["fp32"]["full"]
    stored = {"model." + k: v for k, v in full.items()}
    stored["conditioner.embedders.0.weight"] = torch.ones(4, 4)
    index = save_sharded(stored, str(tmp_path), 2)
    wm = read_weight_map(index)
    junk = os.path.join(tmp_path, "model-00003-of-00003.safetensors")
    with open(junk, "wb") as f:
        f.write(b"not a safetensors file at all")
    wm["conditioner.embedders.0.weight"] = junk
    with open(index, "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: os.path.basename(v) for k, v in wm.items()}}, f)
    idx, files = reader.index(IndexRequest(index, _specs(full), 2, 1, prefix="model."))
    assert files == sorted(set(wm.values()) - {junk}) and len(files) == 2
    assert set(idx.pieces) == set(full) and all(len(p) == 1 for p in idx.pieces.values())
    piece = idx.pieces["transformer.word_embeddings.weight"][0]
    assert piece.stored.shape == tuple(full["transformer.word_embeddings.weight"].shape)
    with pytest.raises(MalformedCheckpointError, match="model-00003-of-00003"):
        read_header(junk)


def test_reader_refusals(ckpts, tmp_path):
    c = ckpts["fp32"]
    specs = _specs(c["full"])
    with pytest.raises(ConfigError, match="--weights fp32"):
        reader.index(IndexRequest(c["single"], specs, 1, 0, weights="fp32"))
    with pytest.raises(ConfigError, match="--tag"):
        reader.index(IndexRequest(c["single"], specs, 1, 0, tag="1000"))
    bad = dict(specs)
    bad["transformer.final_layernorm.bias"] = TensorSpec((65,), REPLICATED)
    with pytest.raises(CheckpointError, match=r"'transformer.final_layernorm.bias' has shape \[64\]"):
        reader.index(IndexRequest(c["sharded"], bad, 1, 0))
    extra = {**specs, "transformer.extra": TensorSpec((1,), REPLICATED)}
    with pytest.raises(CheckpointError, match="missing tensors.*transformer.extra"):
        reader.index(IndexRequest(c["single"], extra, 1, 0))
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.safetensors.index.json", "b.safetensors.index.json"):
        shutil.copy(c["sharded"], two / name)
    assert reader.recognise(str(two), None)
    with pytest.raises(CheckpointError, match="2 safetensors indexes"):
        reader.locate(str(two))


def test_recognise(ckpts, tmp_path):
    c = ckpts["fp32"]
    assert reader.recognise(c["single"], None) and reader.recognise(c["sharded"], None)
    assert reader.recognise(os.path.dirname(c["sharded"]), None)
    assert not reader.recognise(c["sat"], None)
    assert not reader.recognise(str(tmp_path / "nope.safetensors"), None)
    (tmp_path / "x.bin").write_bytes(b"x")
    assert not reader.recognise(str(tmp_path / "x.bin"), None) and not reader.recognise(str(tmp_path), None)
    assert formats.reader_for(c["sat"]) is formats.sat and formats.reader_for(c["single"]) is reader


def test_model_config_sources(ckpts, tmp_path):
    c = ckpts["fp32"]
    assert formats.model_config(c["single"]) == MODEL_CONFIG  # header metadata
    assert formats.model_config(c["sharded"]) == MODEL_CONFIG  # model_config.json beside the index
    assert formats.model_config(c["sat"])["model_parallel_size"] == 1  # SAT folder
    meta = save_sharded(c["full"], str(tmp_path / "meta"), 2, {"model_config": json.dumps(MODEL_CONFIG)})
    assert formats.model_config(meta) == MODEL_CONFIG  # the first shard's metadata
    save_file({"w": torch.ones(2)}, str(tmp_path / "bad.safetensors"), metadata={"model_config": "{oops"})
    with pytest.raises(MalformedCheckpointError, match="model_config.*not valid JSON"):
        formats.model_config(str(tmp_path / "bad.safetensors"))
    assert formats.model_config(str(tmp_path / "missing")) is None


def test_inspect_json_reads_headers_only(ckpts, capsys):
    c = ckpts["fp32"]
    data = sum(t.numel() * t.element_size() for t in c["full"].values())
    assert cli_main(["inspect", c["single"], "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "safetensors" and info["tensors"] == len(c["full"]) and info["dtypes"] == ["F32"]
    assert info["data_bytes"] == data and info["metadata_keys"] == ["format", "model_config"]
    assert info["files"][0]["bytes"] == os.path.getsize(c["single"])
    assert cli_main(["inspect", c["sharded"]]) == 0
    text = capsys.readouterr().out
    assert "3 shards listed by model.safetensors.index.json" in text and "model-00002-of-00003.safetensors" in text
    info = formats.describe(os.path.dirname(c["sharded"]))
    assert [f["tensors"] for f in info["files"]] == [10, 9, 9] and info["data_bytes"] == data


# --- the malformed corpus --------------------------------------------------------------------------

def _parts(path: str) -> tuple[dict, bytes]:
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _assemble(header: bytes, data: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def _corpus(single: str) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, what the error must say)."""
    header, data = _parts(single)
    names = [k for k in header if k != "__metadata__"]
    enc = lambda h: json.dumps(h).encode()  # noqa: E731
    a, b = "transformer.layers.0.attention.dense.weight", "transformer.layers.1.attention.dense.weight"

    def edit(fn):
        h = json.loads(json.dumps(header))
        fn(h)
        return _assemble(enc(h), data)

    ok = enc(header)
    size = 8 + len(ok) + len(data)
    dup_text = ok.decode().replace(f'"{b}":', f'"{a}":').encode()
    return {
        "header_past_eof": (_assemble(ok, data, size), f"says {size} bytes but only {size - 8} follow"),
        "huge_header_length": (_assemble(ok, data, 2 ** 62), "over the format's limit"),
        "tiny_file": (b"\x01\x02", "fewer than the 8-byte header length"),
        "non_utf8": (_assemble(b'{"\xff\xfe": 1}', data), "not valid UTF-8"),
        "not_json": (_assemble(b'{"a": [1, 2', data), "not valid JSON"),
        "non_object_json": (_assemble(b"[1, 2, 3]", data), "JSON list, not an object"),
        "unknown_dtype": (edit(lambda h: h[names[0]].update(dtype="F19")), "unknown dtype 'F19'"),
        "size_not_shape_x_dtype": (edit(lambda h: h[a].update(dtype="F16")), "needs"),
        "offsets_out_of_range": (edit(lambda h: h[a].update(data_offsets=[o + 10 ** 9 for o in h[a]["data_offsets"]])),
                                 "data section is truncated or the offsets are out of range"),
        "begin_after_end": (edit(lambda h: h[a].update(data_offsets=h[a]["data_offsets"][::-1])), "begin <= end"),
        "negative_shape": (edit(lambda h: h[a].update(shape=[-64, -64])), "non-negative integers"),
        "overlapping_offsets": (edit(lambda h: h[b].update(data_offsets=h[a]["data_offsets"])), "overlap"),
        "duplicate_names": (_assemble(dup_text, data), f"names {a!r} twice"),
        "metadata_not_str": (edit(lambda h: h["__metadata__"].update(format=1)), "but 'format' maps to 1"),
        "truncated_data": (_assemble(ok, data[:-100]), "data section is truncated"),
    }


@pytest.fixture(scope="module")
def corpus(ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    out = {}
    for name, (blob, says) in _corpus(ckpts["fp32"]["single"]).items():
        folder = root / name
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(blob)
        write_config_json(str(folder))
        out[name] = (str(folder / "model.safetensors"), says)
    return out


def test_corpus_fails_in_header_validation_without_big_allocation(corpus):
    for name, (path, says) in corpus.items():
        tracemalloc.start()
        try:
            with pytest.raises(MalformedCheckpointError) as exc:
                read_header(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert path in str(exc.value) and says in str(exc.value), (name, str(exc.value))
        assert "copy or download it again" in str(exc.value)
        assert peak < 256 << 10, (name, peak)  # the header is 3 KB; nothing sized by the file's claims


def _try_load(rank, path, tp):
    sat_dist.load_model(path, tp=tp)


LOAD_CASES = ["header_past_eof", "huge_header_length", "non_utf8", "non_object_json", "unknown_dtype",
              "size_not_shape_x_dtype", "offsets_out_of_range", "overlapping_offsets", "duplicate_names",
              "truncated_data"]


@pytest.mark.parametrize("name", LOAD_CASES)
def test_corpus_fails_on_every_rank(corpus, name):
    path, says = corpus[name]
    results = run_ranks(2, _try_load, path, 2, timeout=60)
    for r in results:
        assert r.error_type == "MalformedCheckpointError", (name, r.rank, r.error_type, r.error)
        assert path in r.error and says in r.error


def _sharded_with(tmp_path, full: dict, damage) -> str:
    index = save_sharded(full, str(tmp_path), 3, {"model_config": json.dumps(MODEL_CONFIG)})
    damage(tmp_path)
    return index


def test_index_naming_a_missing_shard_fails_on_every_rank(ckpts, tmp_path):
    index = _sharded_with(tmp_path, ckpts["fp32"]["full"],
                          lambda d: os.remove(d / "model-00002-of-00003.safetensors"))
    for r in run_ranks(2, _try_load, index, 2, timeout=60):
        assert r.error_type == "CheckpointError", (r.error_type, r.error)
        assert "shard 'model-00002-of-00003.safetensors'" in r.error and "does not exist" in r.error


def test_damaged_later_shard_is_agreed_by_the_group(ckpts, tmp_path):
    """The first shard (which carries the config) is sound; a later one is truncated: every rank
    raises the same GroupLoadError naming both ranks' MalformedCheckpointError, before any read."""
    def truncate(d):
        p = d / "model-00003-of-00003.safetensors"
        p.write_bytes(p.read_bytes()[:-64])

    index = _sharded_with(tmp_path, ckpts["fp32"]["full"], truncate)
    results = run_ranks(2, _try_load, index, 2, timeout=60)
    assert {r.error_type for r in results} == {"GroupLoadError"}
    assert len({r.error for r in results}) == 1
    msg = results[0].error
    assert "during 'plan'" in msg and msg.count("MalformedCheckpointError") == 2
    assert "model-00003-of-00003.safetensors" in msg and "data section is truncated" in msg


def test_weight_map_and_header_disagree(ckpts, tmp_path):
    full = ckpts["fp32"]["full"]
    index = save_sharded(full, str(tmp_path), 2)
    data = json.load(open(index))
    key = "transformer.final_layernorm.weight"
    data["weight_map"][key] = next(v for k, v in data["weight_map"].items() if v != data["weight_map"][key])
    json.dump(data, open(index, "w"))
    with pytest.raises(MalformedCheckpointError, match=f"puts tensor '{key}' in .*whose header has no such tensor"):
        reader.index(IndexRequest(index, _specs(full), 1, 0))
    with open(index, "w") as f:
        f.write('{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}')
    with pytest.raises(MalformedCheckpointError, match="names 'a' twice"):
        read_weight_map(index)
    with open(index, "w") as f:
        f.write('{"weight_map": [1]}')
    with pytest.raises(MalformedCheckpointError, match="'weight_map' is missing"):
        read_weight_map(index)
