"""`sat-dist convert` (sat_dist/convert.py, sat_dist/writers/): tiny models, sources written by the
test side's own writers (sat_rules / cvx_fixtures, sharing no code with sat_dist), DeepSpeed's
ZeRO-3 layout (sat_dist.testing.zero3_writer), `torch.distributed.checkpoint.save` and
`safetensors.torch.save_file`; outputs read back by the real programs.

* A chain SAT mp=2 -> safetensors (sharded) -> SAT mp=4 -> DCP -> SAT mp=2, and ZeRO-3 ->
  safetensors: every output loads at TP 1, 2, 4 (forked gloo ranks) with the per-rank state-dict
  digests of the direct load of the source.
* SAT output: each mp file is byte for byte `torch.save({'module': shard})` of the test side's own
  SAT split (in sorted key order); the end of the chain loads in real SAT 0.4.12 (`.venv-sat`,
  `BaseModel.from_pretrained`) with SAT's split of the original weights.
* safetensors output: huggingface's shard/index layout, `model_config` in the header metadata;
  DCP output: `torch.distributed.checkpoint.load` into plain full tensors.
* diffusers output of tiny 2B / 5B-I2V / 1.5-I2V SAT DiTs (mp=2, with `conditioner.*` and
  `first_stage_model.*` keys beside the DiT): `CogVideoXTransformer3DModel.from_pretrained` loads
  it and its forward equals sat_dist's forward of the SAT source within 1e-5 x max|out| (fp32; the
  same tolerance and the same FinalLayer eps note as tests/test_diffusers_load.py); converted back to
  SAT (config from config.json alone) it loads with the diffusers folder's digests.
* Same input, same bytes: converting twice, and with 2 forked ranks instead of 1, gives identical
  files (sat, safetensors, diffusers); a 2-rank DCP holds the same tensors (its file names carry
  the writing rank).
* Keys outside the model (SAT, safetensors and DCP sources) are reported and dropped, or written to
  DST/extra/ with extra_keys="separate".
* Atomicity: a convert SIGKILLed after its first file leaves no DST; a failure on one rank of two
  fails both with the same error and leaves nothing; an existing DST needs --force.
* Memory: converting a model whose total is 24x its largest tensor (SAT mp=1, safetensors at 1/8
  of the total, DCP) raises the peak RSS (VmHWM, reset after the imports through
  /proc/self/clear_refs) by less than total/2, in a subprocess; loading the model whole, measured
  the same way, raises it by the model's size.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sat_dist
from cvx_fixtures import PREFIX, random_weights, shape_table, tiny_params, write_cogvideo_yaml, write_shipped
from sat_dist.convert import convert
from sat_dist.errors import ConfigError
from sat_dist.formats import model_config as source_config
from sat_dist.formats.diffusers_map import diffusers_config, sat_model_config
from sat_dist.models.cogvideox import DiTConfig
from sat_dist.placement import Replicate
from sat_dist.report import state_dict_digest
from sat_dist.testing.dist import run_ranks, values
from sat_dist.writers.base import Want, owners, pack, parse_size
from sat_dist.writers.sat import save_streaming
from sat_rules import CONFIGS, full_state_dict, sat_split, write_sat_checkpoint
from test_diffusers_load import _inputs, _reference, _released_config

REPO = Path(__file__).resolve().parents[1]
CFG = CONFIGS["gqa"]  # 8 heads, 4 KV heads (SAT's ratio split of query_key_value), vocab-parallel: TP 1, 2, 4
REL_TOL = 1e-5
EXTRAS = {"conditioner.embedders.0.transformer.encoder.block.0.layer.0.SelfAttention.q.weight": (6, 4),
          "conditioner.embedders.0.transformer.shared.weight": (10, 4), "first_stage_model.decoder.conv_in.bias": (3,)}


def _convert(rank, src, dst, to, kw):
    return convert(src, dst, to, **kw)


def conv(src, dst, to, world=1, **kw):
    return values(run_ranks(world, _convert, str(src), str(dst), to, kw))[0]


def _digest(rank, path, tp, config):
    return state_dict_digest(sat_dist.load_model(str(path), config, tp=tp).state_dict())


def digests(path, tp, config=None):
    return values(run_ranks(tp, _digest, path, tp, config))


def tree(root) -> dict[str, str]:
    """Every file under `root` (relative path) -> SHA-256 of its bytes."""
    out = {}
    for folder, _, names in os.walk(root):
        for n in names:
            p = os.path.join(folder, n)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


# --- GPT-style SAT model: the format chain --------------------------------------------------------

@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    base = tmp_path_factory.mktemp("chain")
    full = full_state_dict(CFG, seed=21)
    paths = {"sat2": base / "sat2"}
    write_sat_checkpoint(str(paths["sat2"]), CFG, full, 2)
    reports = {}
    for a, to, b, kw in (("sat2", "safetensors", "st", {"shard_size": "40KB"}), ("st", "sat", "sat4", {"tp": 4}),
                         ("sat4", "dcp", "dcp", {}), ("dcp", "sat", "sat2b", {"tp": 2})):
        paths[b] = base / b
        reports[b] = conv(paths[a], paths[b], to, **kw)
    return full, paths, reports


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_chain_loads_with_the_source_digests(chain, tp):
    _, paths, _ = chain
    want = digests(paths["sat2"], tp)
    for name in ("st", "sat4", "dcp", "sat2b"):
        assert digests(paths[name], tp) == want, (name, tp)


def test_sat_output_is_torch_save_of_sat_split(chain, tmp_path):
    full, paths, reports = chain
    root = paths["sat4"]
    assert (root / "latest").read_text() == "1"  # the safetensors source has no iteration
    mc = json.loads((root / "model_config.json").read_text())
    assert mc == {"model_class": "BaseModel", **CFG, "layernorm_order": "pre", "model_parallel_size": 4}
    assert sorted(os.listdir(root / "1")) == [f"mp_rank_{r:02d}_model_states.pt" for r in range(4)]
    for r in range(4):
        ref = tmp_path / str(r) / f"mp_rank_{r:02d}_model_states.pt"
        ref.parent.mkdir()
        torch.save({"module": {k: sat_split(k, full[k], 4, r, CFG) for k in sorted(full)}}, ref)
        assert (root / "1" / ref.name).read_bytes() == ref.read_bytes(), r
    assert reports["sat2b"].files[-1]["file"] == "model_config.json" and (paths["sat2b"] / "latest").read_text() == "1"
    assert [f["file"] for f in reports["sat4"].files] == ["1/" + n for n in sorted(os.listdir(root / "1"))] + [
        "latest", "model_config.json"]


def test_streaming_torch_save_is_byte_identical(tmp_path):
    """writers/sat.save_streaming == torch.save for mixed dtypes, a scalar, an empty tensor."""
    sd = {"b": torch.arange(6, dtype=torch.bfloat16), "a.w": torch.randn(5, 7), "s": torch.tensor(3.0),
          "e": torch.empty(0, 2), "i": torch.arange(4)}
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    torch.save({"module": sd}, tmp_path / "x" / "m.pt")
    wants = [Want(k, k, tuple(v.shape), Replicate(), v.dtype) for k, v in sd.items()]
    fetched = []

    def fetch(ws):
        fetched.append(ws[0].name)
        return {ws[0].name: sd[ws[0].name].clone()}

    save_streaming(str(tmp_path / "y" / "m.pt"), wants, fetch)
    assert (tmp_path / "y" / "m.pt").read_bytes() == (tmp_path / "x" / "m.pt").read_bytes()
    assert fetched == list(sd)  # one tensor at a time, in the order torch writes them


def test_safetensors_and_dcp_outputs_read_by_their_libraries(chain):
    full, paths, _ = chain
    st = paths["st"]
    index = json.loads((st / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"} and set(index["weight_map"]) == set(full)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in full.values())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    got = {}
    for s in shards:
        part = load_file(st / s)
        assert sum(t.numel() * 4 for t in part.values()) <= 40_000 or len(part) == 1
        assert all(index["weight_map"][k] == s for k in part)
        got.update(part)
    assert all(torch.equal(got[k], full[k]) for k in full)
    assert source_config(str(st)) == {"model_class": "BaseModel", **CFG, "layernorm_order": "pre",
                                      "model_parallel_size": 1}
    import torch.distributed.checkpoint as tdcp

    sd = {k: torch.zeros_like(v) for k, v in full.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: DCP says it loads in one process
        tdcp.load(sd, checkpoint_id=str(paths["dcp"]))
    assert all(torch.equal(sd[k], full[k]) for k in full)
    n = len(full)  # one .distcp per tensor (writers/dcp.py: bounded memory)
    assert sorted(os.listdir(paths["dcp"])) == sorted([".metadata", "model_config.json",
                                                       *(f"__0_{i}.distcp" for i in range(n))])


def test_sat_output_loads_in_real_sat(chain, sat_venv, tmp_path):  # noqa: F811
    """The end of the chain (SAT mp=2 <- DCP <- SAT mp=4 <- safetensors <- SAT mp=2) in SAT itself."""
    full, paths, _ = chain
    out = tmp_path / "sat_sd.pt"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    proc = subprocess.run([str(sat_venv / "bin" / "torchrun"), "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "sat_ref" / "load_converted.py"), "--ckpt", str(paths["sat2b"]),
                           "--out", str(out)], cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for r, sd in enumerate(torch.load(out, weights_only=True)):
        assert sorted(sd) == sorted(full)
        for k in full:
            assert torch.equal(sd[k], sat_split(k, full[k], 2, r, CFG)), (r, k)


def test_same_bytes_twice_and_from_two_ranks(chain, tmp_path):
    _, paths, _ = chain
    for to, kw in (("sat", {"tp": 4}), ("safetensors", {"shard_size": "40KB"}), ("dcp", {})):
        one = conv(paths["sat2"], tmp_path / f"{to}_a", to, **kw)
        conv(paths["sat2"], tmp_path / f"{to}_b", to, **kw)
        two = conv(paths["sat2"], tmp_path / f"{to}_w2", to, world=2, **kw)
        assert tree(tmp_path / f"{to}_a") == tree(tmp_path / f"{to}_b"), to
        assert len(two.ranks) == 2 and all(r["files"] and r["peak_rss_bytes"] > 0 for r in two.ranks), two.ranks
        assert sorted(f["file"] for f in one.files) == sorted(tree(tmp_path / f"{to}_a"))
        if to == "dcp":  # the .distcp names carry the writing rank; the same tensors
            names = os.listdir(tmp_path / "dcp_w2")
            assert {n.split("_")[2] for n in names if n.endswith(".distcp")} == {"0", "1"}
            assert len(names) == len(os.listdir(tmp_path / "dcp_a"))
            assert digests(tmp_path / "dcp_w2", 2) == digests(paths["sat2"], 2)
        else:
            assert tree(tmp_path / f"{to}_w2") == tree(tmp_path / f"{to}_a"), to


def _write_zero3(rank: int, out: str) -> None:
    from sat_dist.testing.zero3_writer import Zero3Spec, write_zero3_checkpoint

    full = full_state_dict(CFG, seed=4)
    shapes = OrderedDict((n, tuple(t.shape)) for n, t in full.items())
    write_zero3_checkpoint(out, "global_step1", Zero3Spec(param_shapes=shapes, groups=[list(shapes)]), lambda n: full[n])


def test_zero3_to_safetensors(tmp_path):
    """DeepSpeed ZeRO-3 (dp=2, fp32 partitions only) -> safetensors loads like the ZeRO-3 folder.
    The writer imports deepspeed (for its real pickled classes): it runs in a forked child so this
    process, whose forks the DeepSpeed tests check for a deepspeed-free load path, never imports it."""
    values(run_ranks(1, _write_zero3, str(tmp_path / "z3")))
    (tmp_path / "z3" / "model_config.json").write_text(json.dumps({"model_class": "BaseModel", **CFG}))
    rep = conv(tmp_path / "z3", tmp_path / "st", "safetensors")
    assert rep.source_format == "deepspeed-zero3" and rep.extra_keys["count"] == 0
    assert [f["file"] for f in rep.files] == ["model.safetensors"]
    assert digests(tmp_path / "st", 2) == digests(tmp_path / "z3", 2)


def test_refusals(chain, tmp_path):
    _, paths, _ = chain
    with pytest.raises(ConfigError, match="holds full tensors"):
        convert(str(paths["sat2"]), str(tmp_path / "x"), "safetensors", tp=2)
    with pytest.raises(ConfigError, match="not an output format"):
        convert(str(paths["sat2"]), str(tmp_path / "x"), "gguf")
    for to, kw, needle in (("sat", {"tp": 3}, "TP sizes that work for this model: [1, 2, 4]"),
                           ("diffusers", {}, "diffusers output holds the CogVideoX DiT"),
                           ("sat", {}, "already exists")):
        dst = paths["st"] if needle == "already exists" else tmp_path / "x"
        (err,) = run_ranks(1, _convert, str(paths["sat2"]), str(dst), to, kw)
        assert err.error_type == "GroupLoadError" and needle in err.error, err.error
        assert not (tmp_path / "x").exists() and not list(tmp_path.glob("x.tmp-*"))


# --- CogVideoX DiT: diffusers output, keys outside the model -----------------------------------------

def _released_weights(kind: str, seed: int) -> dict:
    """Tiny SAT DiT weights as released files hold them: no RoPE tables, no unused position
    embeddings, no 2B sincos table (the model computes them; random stand-ins would change the forward)."""
    full = random_weights(shape_table(tiny_params(kind)), seed=seed)
    drop = ("mixins.pos_embed.freqs_sin", "mixins.pos_embed.freqs_cos", "transformer.position_embeddings.weight")
    drop += ("mixins.pos_embed.pos_embedding",) if kind == "2b" else ()
    return {k: v for k, v in full.items() if k not in drop}


def _extras(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in EXTRAS.items()}


def _dit_source(base: Path, kind: str, seed: int) -> tuple[dict, str, str]:
    """A fine-tuned SAT CogVideoX transformer folder (mp=2, `conditioner.*`/`first_stage_model.*`
    beside `model.diffusion_model.*`) and its CogVideo YAML."""
    full = _released_weights(kind, seed)
    root = write_shipped(str(base / "transformer"), full, mp=2, extra_module=_extras())
    return full, root, write_cogvideo_yaml(str(base / "model.yaml"), tiny_params(kind))


def _forward(rank, path, tp, inputs, config):
    model = sat_dist.load_model(str(path), config, tp=tp)
    with torch.no_grad():
        return model(**inputs)


@pytest.mark.parametrize("kind", ["2b", "5b_i2v", "15_i2v"])
def test_diffusers_output_from_pretrained_forward(kind, tmp_path):
    _, src, yaml_path = _dit_source(tmp_path / "src", kind, seed=40)
    dst = tmp_path / "dif"
    rep = conv(src, dst, "diffusers", config=yaml_path, shard_size="60KB", extra_keys="separate")
    assert rep.extra_keys == {"count": 3, "names": sorted(EXTRAS), "action": "written to extra/"}
    extra = load_file(dst / "extra" / "model.safetensors")
    assert extra.keys() == EXTRAS.keys() and all(torch.equal(extra[k], v) for k, v in _extras().items())
    assert (dst / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert json.loads((dst / "config.json").read_text()) == diffusers_config(
        {"model_class": "DiffusionTransformer", **tiny_params(kind)})
    ref = _reference(kind, str(dst))  # diffusers' from_pretrained + forward
    scale = ref.abs().max().item()
    (ours,) = values(run_ranks(1, _forward, src, 1, _inputs(kind), yaml_path))
    err = (ours - ref).abs().max().item() / scale
    print(f"\n[convert diffusers] {kind}: |SAT source forward - diffusers(converted) forward| / max = {err:.2e}")
    assert ours.shape == ref.shape and err <= REL_TOL, err
    # two ranks write the same bytes; back to SAT mp=2 with no YAML: the diffusers folder's digests
    conv(src, tmp_path / "dif_w2", "diffusers", world=2, config=yaml_path, shard_size="60KB", extra_keys="separate")
    assert tree(tmp_path / "dif_w2") == tree(dst)
    back = conv(dst, tmp_path / "back", "sat", tp=2)
    assert back.source_format == "diffusers" and back.extra_keys["count"] == 0
    assert digests(tmp_path / "back", 2) == digests(dst, 2)


def _dcp_save(sd: dict, path: str) -> None:
    import torch.distributed.checkpoint as tdcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tdcp.save(sd, checkpoint_id=path)


@pytest.mark.parametrize("source", ["sat", "safetensors", "dcp"])
def test_keys_outside_the_model_reported_dropped_or_separate(source, tmp_path):
    full = _released_weights("5b", seed=50)
    yaml_path = write_cogvideo_yaml(str(tmp_path / "model.yaml"), tiny_params("5b"))
    stored = {**{PREFIX + k: v for k, v in full.items()}, **_extras()}
    src = tmp_path / "src"
    if source == "sat":
        write_shipped(str(src), full, mp=2, extra_module=_extras())
    elif source == "safetensors":
        src.mkdir()
        save_file(stored, src / "model.safetensors", metadata={"format": "pt"})
    else:
        _dcp_save(stored, str(src))
    dropped = conv(src, tmp_path / "drop", "sat", config=yaml_path)
    kept = conv(src, tmp_path / "sep", "safetensors", config=yaml_path, extra_keys="separate")
    for rep, action in ((dropped, "dropped"), (kept, "written to extra/")):
        assert rep.extra_keys == {"count": 3, "names": sorted(EXTRAS), "action": action}, rep.extra_keys
    (mp_file,) = (tmp_path / "drop").glob("*/mp_rank_00_model_states.pt")
    module = torch.load(mp_file, weights_only=True)["module"]
    assert sorted(module) == sorted(PREFIX + k for k in full) and not (tmp_path / "drop" / "extra").exists()
    extra = load_file(tmp_path / "sep" / "extra" / "model.safetensors")
    assert all(torch.equal(extra[k], v) for k, v in _extras().items()) and len(extra) == 3
    assert digests(tmp_path / "sep", 2) == digests(tmp_path / "drop", 2)


def test_diffusers_config_is_the_release_config():
    """diffusers_config(CogVideo's SAT YAML) == the config.json the diffusers releases carry
    (tests/test_diffusers_load.py), for all five variants; back through sat_model_config it is the
    same DiT. The one difference: 1.5's text length, 224 in SAT's YAML and 226 in the release (the
    1.5 code never uses it)."""
    from cvx_fixtures import load_params

    released = {"cogvideox_2b": ("1.0", 30, 30, False, False), "cogvideox_5b": ("1.0", 42, 48, True, False),
                "cogvideox_5b_i2v": ("1.0", 42, 48, True, True), "cogvideox1.5_5b": ("1.5", 42, 48, True, False),
                "cogvideox1.5_5b_i2v": ("1.5", 42, 48, True, True)}
    for name, args in released.items():
        sat = {"model_class": "DiffusionTransformer", **load_params(name)}
        ours, theirs = diffusers_config(sat), _released_config(*args)
        if args[0] == "1.5":
            theirs["max_text_seq_length"] = 224
        assert ours == theirs, name
        assert DiTConfig(**sat_model_config(ours)).arch == DiTConfig(**sat).arch, name
    bad = {"model_class": "DiffusionTransformer", **load_params("cogvideox_5b"), "use_SwiGLU": True}
    with pytest.raises(ConfigError, match="use_SwiGLU"):
        diffusers_config(bad)


# --- atomicity, failures, memory ---------------------------------------------------------------------

KILL = """
import sys, time
import sat_dist.writers.safetensors as w
real = w.save_file
def first_then_stall(*a, **k):
    real(*a, **k)
    print("WROTE", a[1], flush=True)
    time.sleep(60)
w.save_file = first_then_stall
from sat_dist.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_convert_leaves_no_dst_then_cli_report(chain, tmp_path):
    _, paths, _ = chain
    dst = tmp_path / "out"
    args = ["convert", str(paths["sat2"]), str(dst), "--to", "safetensors", "--shard-size", "40KB"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILL, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert line.startswith("WROTE"), line
    (tmp,) = tmp_path.glob("out.tmp-*")
    assert not dst.exists() and [p.name for p in tmp.iterdir()] == [os.path.basename(line.split()[1])]
    # the leftover does not stand in the way; the CLI prints the report
    proc = subprocess.run([sys.executable, "-m", "sat_dist", *args, "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["status"] == "ok" and rep["to"] == "safetensors" and rep["world_size"] == 1
    assert rep["bytes_written"] == sum(os.path.getsize(dst / f["file"]) for f in rep["files"])
    assert sorted(f["file"] for f in rep["files"]) == sorted(os.listdir(dst))
    assert rep["ranks"][0]["peak_rss_bytes"] > 0 and rep["ranks"][0]["bytes_read"] > 0
    proc = subprocess.run([sys.executable, "-m", "sat_dist", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "already exists" in proc.stderr and "--force" in proc.stderr
    before = tree(dst)
    proc = subprocess.run([sys.executable, "-m", "sat_dist", *args[:-2], "--force"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert tree(dst) != before and sorted(tree(dst)) == ["model.safetensors"]  # replaced: default 5GB, one file


def _fail_on_rank1(rank, src, dst):
    import sat_dist.writers.safetensors as w

    if rank == 1:
        def boom(*a, **k):
            raise OSError("disk full (test)")
        w.save_file = boom
    return convert(src, dst, "safetensors", shard_size="40KB")


def test_a_failing_rank_fails_both_and_leaves_nothing(chain, tmp_path):
    _, paths, _ = chain
    res = run_ranks(2, _fail_on_rank1, str(paths["sat2"]), str(tmp_path / "out"))
    assert {r.error_type for r in res} == {"GroupLoadError"} and len({r.error for r in res}) == 1
    assert "rank(s) [1]" in res[0].error and "disk full (test)" in res[0].error
    assert list(tmp_path.iterdir()) == []


RSS = """
import json, sys
import torch.distributed.checkpoint
from sat_dist.convert import convert

def peak():  # VmHWM: ru_maxrss of this mm only (ru_maxrss also carries the RSS of the pytest process that forked us)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

src, out = sys.argv[1], sys.argv[2]
with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark: the imports' peak must not hide ours
    f.write("5")
base = peak()
for to, kw in (("sat", {}), ("safetensors", {"shard_size": int(sys.argv[3])}), ("dcp", {})):
    convert(src, f"{out}/{to}", to, **kw)
growth = peak() - base
import torch  # the control: what holding the whole model costs, measured the same way
whole = torch.load(f"{src}/1000/mp_rank_00_model_states.pt", weights_only=True)
print(json.dumps({"growth": growth, "control": peak() - base}))
"""


def test_peak_rss_stays_far_below_the_model(tmp_path):
    cfg = dict(num_layers=8, hidden_size=512, num_attention_heads=8, vocab_size=1024, max_sequence_length=64)
    full = full_state_dict(cfg, seed=1)
    total = sum(t.numel() * t.element_size() for t in full.values())
    largest = max(t.numel() * t.element_size() for t in full.values())
    assert total >= 8 * largest, (total, largest)
    write_sat_checkpoint(str(tmp_path / "src"), cfg, full, 1)
    del full
    proc = subprocess.run([sys.executable, "-c", RSS, str(tmp_path / "src"), str(tmp_path), str(total // 8)],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    growth, control = got["growth"], got["control"]
    print(f"\n[convert RSS] model {total / 2**20:.0f} MiB (largest tensor {largest / 2**20:.0f} MiB): "
          f"peak RSS growth {growth / 2**20:.1f} MiB over sat, safetensors (shards of total/8), dcp; "
          f"torch.load of the model after them: {control / 2**20:.1f} MiB")
    assert growth < total / 2, (growth, total)
    assert control > 0.8 * total, (control, total)  # the measurement does see a whole model


def test_sizes_packing_and_owners():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size(123) == 123
    assert parse_size("1.5kb") == 1500
    with pytest.raises(ConfigError):
        parse_size("five")
    ws = [Want(str(i), str(i), (n,), Replicate(), torch.uint8) for i, n in enumerate([4, 4, 9, 1, 1, 3])]
    assert [[w.name for w in g] for g in pack(ws, 8)] == [["0", "1"], ["2"], ["3", "4", "5"]]
    assert pack([], 8) == []
    assert owners([5, 5, 5, 5], 2) == [0, 1, 0, 1] and owners([1, 9, 1], 2) == [1, 0, 1] and owners([3], 4) == [0]
