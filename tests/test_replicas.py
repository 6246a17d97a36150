"""Real-size, header-exact sparse replicas of every CogVideoX release component
(sat_dist/testing/replica.py): the writers are byte-exact against safetensors / torch.save, the
replicas have the releases' file sizes, `sat-dist inspect` sees every tensor, each rank's read plan
at TP 2 and 4 reads exactly what `sat-dist plan` predicts, and the VAE loads at real size reading
exactly its plan. Sparse files only (a few MiB of disk for ~107 GB of replicas), in tmp dirs."""
from __future__ import annotations

import collections
import json
import math
import os
import random
import time
import types
import zipfile
import zlib
from dataclasses import asdict

import pytest
import torch

import sat_dist
from sat_dist import formats
from sat_dist.capacity import capacity_plan, engine_plan
from sat_dist.cli import main as cli_main
from sat_dist.config import LoadConfig, build_model_config, resolve
from sat_dist.engine.layout import vae_model_config
from sat_dist.errors import ConfigError
from sat_dist.formats.safetensors_header import read_header, read_weight_map
from sat_dist.formats.torchfile import load_structure
from sat_dist.loader import _plan_component
from sat_dist.models import TPInfo, build_meta_model, collect_specs
from sat_dist.testing import replica as R
from sat_dist.testing import replica_files as F
from sat_dist.testing.dist import run_ranks

GIB = 2**30
# File sizes of THUDM/CogVideoX-5b-I2V at revision a6f0f4858a8395e7429d82493864ce92bf73af11 (the
# Hugging Face LFS sizes a public download-repair script checks, beside each file's SHA-256): every
# file of the release's transformer/, text_encoder/ and vae/. The replicas must have exactly these
# sizes: header lengths, shard cuts, dtypes and tensor order all have to be the release's for that.
RELEASE_FILE_SIZES = {
    ("CogVideoX-5b-I2V", "transformer/diffusion_pytorch_model-00001-of-00003.safetensors"): 4_992_465_072,
    ("CogVideoX-5b-I2V", "transformer/diffusion_pytorch_model-00002-of-00003.safetensors"): 4_985_800_640,
    ("CogVideoX-5b-I2V", "transformer/diffusion_pytorch_model-00003-of-00003.safetensors"): 1_272_025_856,
    ("t5-v1_1-xxl", "text_encoder/model-00001-of-00002.safetensors"): 4_994_582_224,
    ("t5-v1_1-xxl", "text_encoder/model-00002-of-00002.safetensors"): 4_530_066_360,
    ("vae", "vae/diffusion_pytorch_model.safetensors"): 862_388_596,
}
# (tensors, data bytes): ENVIRONMENT.md §9 gives 5B 1024 / 10.38 GiB and the T5-XXL encoder 219 / 8.87 GiB
EXPECTED = {("CogVideoX-5b", "diffusers"): (1024, 11_140_566_144), ("t5-v1_1-xxl", "diffusers"): (219, 9_524_621_312),
            ("vae", "diffusers"): (436, 862_335_628)}
# THUDM/CogVideoX-5b's transformer/config.json, as thu-ml/CogVideoX-RIFLEx-diffusers re-saved it from the
# release snapshot 8fc5b281006c82b82d34fd2543d2f0ebb4e7e321 (diffusers 0.32.2: every __init__ key)
CONFIG_5B = {
    "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 64, "dropout": 0.0,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 16, "max_text_seq_length": 226,
    "norm_elementwise_affine": True, "norm_eps": 1e-05, "num_attention_heads": 48, "num_layers": 42,
    "ofs_embed_dim": None, "out_channels": 16, "patch_bias": True, "patch_size": 2, "patch_size_t": None,
    "sample_frames": 49, "sample_height": 60, "sample_width": 90, "spatial_interpolation_scale": 1.875,
    "temporal_compression_ratio": 4, "temporal_interpolation_scale": 1.0, "text_embed_dim": 4096,
    "time_embed_dim": 512, "timestep_activation_fn": "silu", "use_learned_positional_embeddings": False,
    "use_rotary_positional_embeddings": True}
TPS = {"CogVideoX-2b": (2, 3)}  # 30 heads: TP=4 is refused (below); the 48-head DiTs: 2 and 4
SHARD_LIMIT = 5 * 10**9


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """Every component in both layouts, sparse: {(component, layout): Written}."""
    root = str(tmp_path_factory.mktemp("replicas"))
    return {(c, l): R.write_component(folder, c, l) for folder, c, l in
            R.targets(root, list(R.COMPONENTS), ["diffusers", "sat"])}


# --- the writers are exact -----------------------------------------------------------------------

def test_crc32_of_zeros_and_combine_match_zlib():
    for n in (0, 1, 7, 64, 4095, 65537, 3 << 20):
        assert F.crc32_zeros(n) == zlib.crc32(bytes(n)), n
    rnd = random.Random(0)
    a, b = rnd.randbytes(1000), rnd.randbytes(12345)
    assert F.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_safetensors_header_is_save_files(tmp_path):
    from safetensors.torch import save_file

    shapes = {"z.last": ((7,), torch.float32), "a.first": ((2, 5), torch.float32), "m.half": ((3, 4), torch.float16),
              "b.bf": ((9,), torch.bfloat16), "c.f64": ((2,), torch.float64), "i.idx": ((4,), torch.int64),
              "u.mask": ((5,), torch.bool), "e.empty": ((0, 3), torch.bfloat16), "s.scalar": ((), torch.float32)}
    entries = [(n, s, d) for n, (s, d) in shapes.items()]
    for meta in ({"format": "pt"}, None):
        ref, mine = tmp_path / "ref.safetensors", tmp_path / "mine.safetensors"
        save_file({n: torch.zeros(s, dtype=d) for n, (s, d) in shapes.items()}, str(ref), metadata=meta)
        size = F.write_safetensors(str(mine), entries, meta, F.Filler("zeros"))
        assert mine.read_bytes() == ref.read_bytes() and size == ref.stat().st_size
    F.write_safetensors(str(mine), entries, {"format": "pt"}, F.Filler("random", 3))  # real bytes, same header
    from safetensors import safe_open

    with safe_open(str(mine), "pt") as f:
        assert sorted(f.keys()) == sorted(shapes) and f.get_tensor("a.first").view(torch.uint8).any()
    header = F.safetensors_header(entries, {"format": "pt"})[0]
    assert mine.read_bytes()[:len(header)] == header


def _zip_diff(a: bytes, b: bytes) -> list[int]:
    return [i for i, (x, y) in enumerate(zip(a, b)) if x != y]


def test_torch_zip_is_torch_save_of_zeros(tmp_path):
    """The sparse SAT file equals torch.save of all-zero tensors byte for byte, but for the random
    serialization id (its data and CRC); its CRCs are right (testzip), and torch loads it with mmap."""
    shapes = [("model.diffusion_model.a.weight", (48, 64), torch.bfloat16), ("b.bias", (64,), torch.bfloat16),
              ("c.table", (3, 5, 7), torch.float32), ("d.one", (1,), torch.float16)]
    (tmp_path / "ref").mkdir()
    (tmp_path / "mine").mkdir()
    ref = str(tmp_path / "ref" / "mp_rank_00_model_states.pt")
    mine = str(tmp_path / "mine" / "mp_rank_00_model_states.pt")
    torch.save({"module": collections.OrderedDict((n, torch.zeros(s, dtype=d)) for n, s, d in shapes)}, ref)
    F.write_torch_zip(mine, lambda empty: {"module": collections.OrderedDict((n, empty(s, d)) for n, s, d in shapes)},
                      F.Filler("zeros"))
    a, b = open(ref, "rb").read(), open(mine, "rb").read()
    assert len(a) == len(b)
    sid = next(i for i in zipfile.ZipFile(mine).infolist() if i.filename.endswith(".data/serialization_id"))
    local, data, cd = F._central_directory(mine)[sid.filename]
    allowed = set(range(data, data + sid.file_size)) | set(range(data + sid.file_size + 4, data + sid.file_size + 8)) \
        | set(range(cd + 16, cd + 20))
    assert set(_zip_diff(a, b)) <= allowed
    assert zipfile.ZipFile(mine).testzip() is None
    loaded = torch.load(mine, mmap=True, weights_only=True)["module"]
    assert [(k, tuple(v.shape), v.dtype) for k, v in loaded.items()] == shapes
    assert all(not v.any() for v in loaded.values())
    # random fill: real bytes, right CRCs, what torch loads is what the records hold
    rnd = str(tmp_path / "mine" / "random.pt")
    F.write_torch_zip(rnd, lambda empty: {"module": {n: empty(s, d) for n, s, d in shapes}}, F.Filler("random", 5))
    assert zipfile.ZipFile(rnd).testzip() is None
    t = torch.load(rnd, mmap=True, weights_only=True)["module"]["c.table"]
    with zipfile.ZipFile(rnd) as zf:
        key = next(n for n in zf.namelist() if n.endswith("/data/2"))
        raw = t.contiguous().view(torch.uint8)
        assert zf.read(key) == raw.numpy().tobytes() and raw.any()


# --- the real-size replicas ----------------------------------------------------------------------

def _blocks(path: str) -> int:
    return os.stat(path).st_blocks * 512


def test_replicas_are_sparse_release_sized_and_named(replicas):
    on_disk = apparent = 0
    for (component, layout), w in replicas.items():
        for rel, size in w.files.items():
            path = os.path.join(w.out, rel)
            assert os.path.getsize(path) == size
            on_disk, apparent = on_disk + _blocks(path), apparent + size
            if rel.endswith(".safetensors"):
                assert size <= SHARD_LIMIT, (component, rel)
            if (component, rel) in RELEASE_FILE_SIZES:
                assert size == RELEASE_FILE_SIZES[component, rel], (component, rel)
        assert sum(w.files.values()) > w.data_bytes  # data + headers
        names = sorted(w.files)
        if layout == "sat":
            assert names == ["transformer/1000/mp_rank_00_model_states.pt", "transformer/latest"]
        elif component in R.RELEASES:
            n = sum(r.endswith(".safetensors") for r in names)
            shards = ([f"transformer/diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
                      + ["transformer/diffusion_pytorch_model.safetensors.index.json"]) if n > 1 else \
                ["transformer/diffusion_pytorch_model.safetensors"]
            assert names == sorted(["transformer/config.json", *shards])
    assert all(k in {(c, r) for (c, _), w in replicas.items() for r in w.files} for k in RELEASE_FILE_SIZES)
    assert apparent > 100e9 and on_disk < 32 << 20, (apparent, on_disk)  # ~107 GB apparent, a few MiB used
    # 2B (3.4 GB fp16) is one file, as released; the 5B-class DiTs three 5 GB shards
    assert replicas["CogVideoX-2b", "diffusers"].files.keys() == {"transformer/config.json",
                                                                   "transformer/diffusion_pytorch_model.safetensors"}


def _meta_names(component: str, layout: str) -> list:
    if component in R.RELEASES:
        return R.sat_entries(component) if layout == "sat" else R.dit_entries(component)
    return R.t5_entries() if component == "t5-v1_1-xxl" else R.vae_entries()


def _check_with_reference_readers(w, layout: str, tensors: int) -> None:
    """safetensors' own reader accepts every file; torch.load(mmap=True, weights_only=True) reads the
    SAT zip (zip64 past 4 GiB), whose CRCs are those of the zeros its holes read as."""
    if layout == "sat":
        path = os.path.join(w.root, "1000", "mp_rank_00_model_states.pt")
        module = torch.load(path, mmap=True, weights_only=True)["module"]
        assert len(module) == tensors and all(not t.is_meta for t in module.values())
        with zipfile.ZipFile(path) as zf:
            data = [i for i in zf.infolist() if "/data/" in i.filename]
            assert len(data) == tensors and all(i.CRC == F.crc32_zeros(i.file_size) for i in data)
            if w.data_bytes > 2**32:  # all but 2B (3.4 GB): records past 4 GiB, in zip64 form
                assert max(i.header_offset for i in data) > 2**32
        return
    from safetensors import safe_open

    n = 0
    for rel in (x for x in w.files if x.endswith(".safetensors")):
        with safe_open(os.path.join(w.out, rel), "pt") as f:
            keys = list(f.keys())
            n += len(keys)
            assert f.get_slice(keys[-1]).get_shape() is not None and f.metadata() == {"format": "pt"}
    assert n == tensors


def test_inspect_and_headers_hold_every_tensor_of_the_real_classes(replicas):
    for (component, layout), w in replicas.items():
        want = _meta_names(component, layout)
        want_bytes = sum(math.prod(s) * d.itemsize for _, s, d in want)
        assert (w.tensors, w.data_bytes) == (len(want), want_bytes)
        if (component, layout) in EXPECTED:
            assert (len(want), want_bytes) == EXPECTED[component, layout]
        info = formats.describe(w.root)  # `sat-dist inspect`
        if layout == "sat":
            module = load_structure(os.path.join(w.root, "1000", "mp_rank_00_model_states.pt"))["module"]
            got = [(k, tuple(v.shape), v.dtype) for k, v in module.items()]
            assert f"module: {len(want)} tensors, {want_bytes} bytes" in info["files"][0]["holds"]
        else:
            assert (info["tensors"], info["data_bytes"]) == (len(want), want_bytes)
            got = []
            for f in (x for x in w.files if x.endswith(".safetensors")):
                got += [(n, tuple(t.shape), t.dtype) for n, t in read_header(os.path.join(w.out, f)).tensors.items()]
            index = [x for x in w.files if x.endswith(".index.json")]
            if index:
                where = read_weight_map(os.path.join(w.out, index[0]))
                assert sorted(where) == sorted(n for n, _, _ in want)
        assert sorted(got) == sorted(want), component
        _check_with_reference_readers(w, layout, len(want))
    # config.json as the releases': diffusers and transformers read them back
    from diffusers import CogVideoXTransformer3DModel
    from transformers import AutoConfig

    cfg = CogVideoXTransformer3DModel.load_config(replicas["CogVideoX-5b", "diffusers"].root)
    assert {k: v for k, v in cfg.items() if not k.startswith("_")} == CONFIG_5B
    t5 = AutoConfig.from_pretrained(replicas["t5-v1_1-xxl", "diffusers"].root)
    assert (t5.d_model, t5.d_ff, t5.num_layers, t5.num_heads, t5.vocab_size) == (4096, 10240, 24, 64, 32128)
    # the published sizes: 5B 10.38 GiB bf16, T5-XXL encoder 8.87 GiB (ENVIRONMENT.md §9)
    assert round(replicas["CogVideoX-5b", "diffusers"].data_bytes / GIB, 2) == 10.38
    assert round(replicas["t5-v1_1-xxl", "diffusers"].data_bytes / GIB, 2) == 8.87


# --- per-rank read plans == `sat-dist plan` -------------------------------------------------------

def _loader_plan(cfg: LoadConfig, tp: int, rank: int):
    """The read plan exactly as the loader builds it (loader._plan_component), one process, no
    process group: a stand-in runtime with this rank's TP coordinates."""
    rt = types.SimpleNamespace(tp=tp, tp_rank=rank, tp_group=None, rank=rank,
                               launch=types.SimpleNamespace(local_world_size=tp))
    return _plan_component(rt, cfg, "")[2]


def _plan_cli(capsys, *argv) -> types.SimpleNamespace:
    """`sat-dist plan ... --json`, in this process: the rows as objects."""
    capsys.readouterr()
    assert cli_main(["plan", *argv, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    return types.SimpleNamespace(dtype=got["dtype"], total_bytes=got["total_bytes"],
                                 rows=[types.SimpleNamespace(**r) for r in got["rows"]])


def _absent_bytes(model_cfg, dtype: torch.dtype) -> int:
    """Bytes `plan` counts for tensors the releases do not store (the DiT computes them, `if_absent`):
    replicated tables, the same on every rank."""
    specs = collect_specs(build_meta_model(model_cfg, TPInfo(1, 0, None)))
    assert all(s.layout.replicated for s in specs.values() if s.if_absent)
    return sum(math.prod(s.global_shape) * dtype.itemsize for s in specs.values() if s.if_absent)


def _check_ranks(cfg: LoadConfig, rows, absent: int = 0) -> list[int]:
    """Every rank's read plan at each TP size == the plan row's per-rank bytes (less `absent`)."""
    out = []
    for row in rows:
        assert row.valid, row.reason
        for rank in range(row.tp):
            plan = _loader_plan(cfg, row.tp, rank)
            assert plan.bytes_to_read == plan.bytes_needed == row.param_bytes - absent, (row.tp, rank)
            out.append(plan.bytes_to_read)
    return out


@pytest.mark.parametrize("layout", ["diffusers", "sat"])
@pytest.mark.parametrize("component", list(R.RELEASES))
def test_dit_rank_plans_read_what_sat_dist_plan_predicts(replicas, capsys, component, layout):
    """Each rank's read plan (sum of its copy ops) at TP 2 and 4 == `sat-dist plan --config <yaml>
    --tp 2 4`'s per-rank bytes == `sat-dist plan <replica>`'s, less the few tables `plan` counts that
    no release stores (the DiT computes them on load)."""
    rel, w = R.RELEASES[component], replicas[component, layout]
    tps = TPS.get(component, (2, 4))
    predicted = capacity_plan([rel.config_path], list(tps))  # `sat-dist plan --config configs/<yaml> --tp ...`
    assert predicted.dtype == {torch.float16: "fp16", torch.bfloat16: "bf16"}[rel.dtype]
    by_path = _plan_cli(capsys, w.root, *(["--config", rel.config_path] if layout == "sat" else []),
                        "--tp", *map(str, tps))  # `sat-dist plan <replica folder>`: its config.json, stored dtype
    assert by_path.dtype == predicted.dtype and by_path.total_bytes == predicted.total_bytes
    assert [(r.tp, r.param_bytes) for r in by_path.rows] == [(r.tp, r.param_bytes) for r in predicted.rows]
    cfg = resolve(w.root, [rel.config_path] if layout == "sat" else [], tp=tps[0])
    absent = _absent_bytes(cfg.model, rel.dtype)
    assert 0 < absent < 100 << 20  # RoPE tables / position_embeddings / 2B's sincos table
    per_rank = _check_ranks(cfg, predicted.rows, absent)
    # the ranks of one TP size together read each stored sharded byte once and each replicated one tp times
    row = predicted.rows[-1]
    assert sum(per_rank[-row.tp:]) == predicted.total_bytes - absent + (row.tp - 1) * (row.replicated_bytes - absent)
    if component == "CogVideoX-2b":  # 30 heads: TP=4 refused by plan and by the loader's plan alike
        assert not capacity_plan([rel.config_path], [4]).rows[0].valid
        with pytest.raises(ConfigError, match="TP=4 does not divide"):
            _loader_plan(cfg, 4, 0)


def test_t5_and_vae_rank_plans_read_what_sat_dist_plan_predicts(replicas, capsys, tmp_path):
    # T5-XXL: `sat-dist plan <text_encoder> --tp 2 4` (its config.json, bf16 from the headers) and the
    # text_encoder rows of `sat-dist plan --engine --config configs/cogvideox_5b.yaml --tp 2 4`
    t5 = replicas["t5-v1_1-xxl", "diffusers"]
    by_path = _plan_cli(capsys, t5.root, "--tp", "2", "4")
    engine = engine_plan([R.RELEASES["CogVideoX-5b"].config_path], [2, 4]).components["text_encoder"]
    assert by_path.dtype == engine.dtype == "bf16" and by_path.total_bytes == engine.total_bytes == t5.data_bytes
    assert [r.param_bytes for r in by_path.rows] == [r.param_bytes for r in engine.rows]
    _check_ranks(resolve(t5.root, tp=2), by_path.rows)
    # VAE: replicated (every rank reads all of it), fp32 as released: `sat-dist plan <vae file> --config vae.json`
    vae = replicas["vae", "diffusers"]
    cfg_json = tmp_path / "vae_model.json"
    cfg_json.write_text(json.dumps(vae_model_config(os.path.dirname(vae.root))))
    by_path = _plan_cli(capsys, vae.root, "--config", str(cfg_json), "--tp", "2", "4")
    assert by_path.dtype == "fp32"
    vae_cfg = LoadConfig(model=build_model_config(vae_model_config(os.path.dirname(vae.root))), checkpoint=vae.root)
    assert _check_ranks(vae_cfg, by_path.rows) == [vae.data_bytes] * 6


# --- one real-size load --------------------------------------------------------------------------

def _load_report(rank: int, path: str, config: str) -> dict:
    model, rep = sat_dist.load_model(path, config, tp=1, return_report=True, progress=False)
    assert not any(t.is_meta for t in model.state_dict().values())
    return asdict(rep.ranks[rank])


def test_vae_loads_at_real_size_reading_exactly_its_plan(replicas, tmp_path):
    """`load_model` of the real-size VAE replica (sparse: reads as zeros) at TP=1, on a forked rank:
    bytes read == the plan's, every tensor materialised, < 20 s and < 6 GiB RSS."""
    vae = replicas["vae", "diffusers"]
    cfg_json = tmp_path / "vae_model.json"
    cfg_json.write_text(json.dumps(vae_model_config(os.path.dirname(vae.root))))
    t0 = time.perf_counter()
    result = run_ranks(1, _load_report, vae.root, str(cfg_json))[0]
    seconds = time.perf_counter() - t0
    assert result.ok, result.traceback
    rank = result.value
    plan = _loader_plan(LoadConfig(model=build_model_config(json.loads(cfg_json.read_text())),
                                   checkpoint=vae.root), 1, 0)
    assert rank["bytes_read"] == plan.bytes_to_read == vae.data_bytes == 862_335_628
    assert rank["bytes_needed"] == plan.bytes_needed
    assert rank["peak_rss_bytes"] < 6 * GIB and seconds < 20, (rank, seconds)


# --- the CLI -------------------------------------------------------------------------------------

def test_cli_writes_one_component_into_out_and_refuses_foreign_folders(tmp_path, capsys):
    out = tmp_path / "vae_only"
    assert R.main([str(out), "--component", "VAE"]) == 0
    manifest = json.loads((out / R.MANIFEST).read_text())
    assert manifest["files"] == {"vae/config.json": (out / "vae" / "config.json").stat().st_size,
                                 "vae/diffusion_pytorch_model.safetensors": 862_388_596}
    assert R.main([str(out), "--component", "vae"]) == 0  # a replica's folder is rewritten
    assert "vae" in capsys.readouterr().out
    foreign = tmp_path / "foreign"
    (foreign / "vae").mkdir(parents=True)
    (foreign / "vae" / "keep.txt").write_text("not a replica")
    with pytest.raises(SystemExit):
        R.main([str(foreign), "--component", "vae"])
    assert "holds files no replica wrote" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        R.main([str(tmp_path / "x"), "--component", "vae", "--layout", "sat"])
    assert "--layout sat is for the DiTs only" in capsys.readouterr().err
    assert (foreign / "vae" / "keep.txt").exists()


# --- convert dry runs ------------------------------------------------------------------------------

@pytest.mark.parametrize("component", list(R.RELEASES))
def test_convert_dry_run_of_every_dit_replica_in_both_directions(replicas, tmp_path, component):
    """`sat-dist convert --dry-run` plans the conversion a user would run on each real-size release
    (diffusers -> SAT and SAT -> diffusers): every tensor mapped, the writer's checks passed, no byte
    read, nothing written; both directions plan the same tensors and bytes."""
    from sat_dist.convert import convert

    rel = R.RELEASES[component]
    out = []
    for layout, to in (("diffusers", "sat"), ("sat", "diffusers")):
        w = replicas[component, layout]
        dst = str(tmp_path / f"{layout}-to-{to}")
        rep = convert(w.root, dst, to, config=[rel.config_path] if layout == "sat" else None, dry_run=True)
        assert rep.status == "dry-run" and rep.files == [] and not os.path.exists(dst)
        out.append((rep.tensors, rep.planned_bytes))
    assert out[0] == out[1] and out[0][0] > 500


def test_convert_of_a_t5_encoder_is_a_named_error(replicas, tmp_path):
    from sat_dist.convert import convert

    with pytest.raises(ConfigError, match="holds a T5EncoderModel: load it as it is"):
        convert(replicas["t5-v1_1-xxl", "diffusers"].root, str(tmp_path / "t5"), "safetensors", dry_run=True)
