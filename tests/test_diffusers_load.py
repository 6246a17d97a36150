"""diffusers CogVideoX transformer folders, written by diffusers' own `save_pretrained`, loaded
into sat_dist's SAT DiT with no YAML (the model config comes from config.json) at TP 1 and 2 on
forked gloo ranks, for tiny configs of all five variants (2B, 5B, 5B-I2V, 1.5, 1.5-I2V), one of
them also sharded with an index (`max_shard_size`).

The weights start as SAT full tensors and reach diffusers through the test-side conversion
(`cvx_fixtures.to_diffusers`, which shares no code with sat_dist), so the loaded shards are checked
against SAT's own split of the SAT tensors, and the forward against diffusers' forward of the very
folder that was loaded (`from_pretrained`).

Forward tolerance: |ours - diffusers| <= 1e-5 * max|diffusers| in fp32; the worst seen over all
variants, TP sizes and ranks is 5.6e-7 (2B; fp32 accumulation order; printed with -s). A mapping
error (a swapped chunk or row block) would be O(1). One real difference is set aside, as
tests/test_cogvideox_forward.py does: SAT's FinalLayerMixin LayerNorm uses eps 1e-6 where
diffusers' `norm_out.norm` uses `norm_eps` (1e-5), so the reference's `norm_out.norm.eps` is set
to 1e-6; with diffusers' 1e-5 the difference is 3-4e-6 relative here (measured, not asserted).
bytes_read <= 1.05 * bytes_needed on every rank (it is exactly equal: only the rank's rows are read).
"""
import inspect
import json
import os
import shutil

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed

import sat_dist
from cvx_fixtures import dit_inputs, load_params, random_weights, sat_split, shape_table, tiny_params, to_diffusers
from sat_dist import formats
from sat_dist.errors import CheckpointError, ConfigError
from sat_dist.formats.diffusers_map import DIFFUSERS_DEFAULTS, sat_model_config, sources
from sat_dist.models.cogvideox import DiTConfig
from sat_dist.testing.dist import run_ranks, values

REL_TOL = 1e-5
WORST: dict = {}
# kind -> input (latent frames, height, width, text tokens); 1.0 runs at its configured grid, 1.5 on a sub-grid
CASES = {"2b": (3, 8, 12, 5), "5b": (3, 8, 12, 5), "5b_i2v": (3, 8, 12, 5), "15": (4, 4, 8, 3), "15_i2v": (4, 4, 8, 3)}


def _diffusers_kwargs(kind: str, p: dict) -> dict:
    """The tiny SAT params as CogVideoXTransformer3DModel arguments (as the convert script sets them)."""
    heads, v15 = p["num_attention_heads"], kind.startswith("15")
    return dict(num_attention_heads=heads, attention_head_dim=p["hidden_size"] // heads, in_channels=p["in_channels"],
                out_channels=p["out_channels"], time_embed_dim=p["time_embed_dim"], ofs_embed_dim=p.get("ofs_embed_dim"),
                text_embed_dim=24, num_layers=p["num_layers"], sample_width=p["latent_width"],
                sample_height=p["latent_height"], sample_frames=p["num_frames"], patch_size=2,
                patch_size_t=2 if v15 else None, patch_bias=not v15, max_text_seq_length=5,
                use_rotary_positional_embeddings=kind != "2b", use_learned_positional_embeddings=kind == "5b_i2v")


def _write(root: str, kind: str, seed: int, shard: bool = False) -> tuple[dict, str]:
    """SAT full weights -> diffusers keys -> diffusers' save_pretrained. Returns (SAT full, folder)."""
    full = random_weights(shape_table(tiny_params(kind)), seed=seed)
    model = CogVideoXTransformer3DModel(**_diffusers_kwargs(kind, tiny_params(kind)))
    missing, unexpected = model.load_state_dict(to_diffusers(full), strict=False)
    assert missing == [] and unexpected == (["patch_embed.pos_embedding"] if kind == "2b" else [])
    folder = os.path.join(root, "transformer")
    model.save_pretrained(folder, **({"max_shard_size": "100KB"} if shard else {}))
    return full, folder


def _inputs(kind: str) -> dict:
    return dit_inputs(kind, *CASES[kind], seed=7)


def _reference(kind: str, folder: str, eps_final: float = 1e-6) -> torch.Tensor:
    """diffusers' own forward of the saved folder, RoPE computed as its pipelines do."""
    model = CogVideoXTransformer3DModel.from_pretrained(folder).eval()
    model.norm_out.norm.eps = eps_final  # SAT's FinalLayerMixin eps (module docstring)
    t, h, w, _ = CASES[kind]
    p, inp = tiny_params(kind), _inputs(kind)
    rope = None
    if kind.startswith("15"):
        rope = get_3d_rotary_pos_embed(16, None, (h // 2, w // 2), t // 2, grid_type="slice",
                                       max_size=(p["latent_height"] // 2, p["latent_width"] // 2))
    elif kind != "2b":
        rope = get_3d_rotary_pos_embed(16, ((0, 0), (h // 2, w // 2)), (h // 2, w // 2), t)
    x = torch.cat([inp["x"], inp["concat_images"]], 2) if "concat_images" in inp else inp["x"]
    with torch.no_grad():
        return model(x, inp["context"], inp["timesteps"], ofs=inp.get("ofs"), image_rotary_emb=rope,
                     return_dict=False)[0]


def _load_run(rank, path, tp, inputs):
    model, rep = sat_dist.load_model(path, tp=tp, return_report=True)
    with torch.no_grad():
        out = model(**inputs)
    r = rep.ranks[rank]
    return out, {k: v.clone() for k, v in model.state_dict().items()}, r.bytes_read, r.bytes_needed


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {kind: _write(str(tmp_path_factory.mktemp(f"dif_{kind}")), kind, 300 + i) for i, kind in enumerate(CASES)}
    out["15_i2v_sharded"] = _write(str(tmp_path_factory.mktemp("dif_sharded")), "15_i2v", 399, shard=True)
    return out


@pytest.mark.parametrize("case", [*CASES, "15_i2v_sharded"])
def test_load_and_forward_match_diffusers_at_tp_1_2(folders, case):
    kind = case.removesuffix("_sharded")
    full, folder = folders[case]
    if case.endswith("sharded"):
        assert len([n for n in os.listdir(folder) if n.endswith(".safetensors")]) > 4
    assert shape_table(formats.model_config(folder)) == shape_table(tiny_params(kind))  # config.json alone
    ref = _reference(kind, folder)
    scale = ref.abs().max().item()
    diffusers_sd = CogVideoXTransformer3DModel.from_pretrained(folder).state_dict()
    sincos = CogVideoXTransformer3DModel(**_diffusers_kwargs(kind, tiny_params(kind))).patch_embed.pos_embedding \
        if kind == "2b" else None  # diffusers' non-persistent table (float64 there)
    for tp in (1, 2):
        for rank, (out, sd, read, needed) in enumerate(values(run_ranks(tp, _load_run, folder, tp, _inputs(kind)))):
            err = (out - ref).abs().max().item() / scale
            WORST[case] = max(WORST.get(case, 0.0), err)
            assert out.shape == ref.shape and err <= REL_TOL, (case, tp, rank, err)
            assert read <= 1.05 * needed, (case, tp, rank, read, needed)
            for name, value in sd.items():
                if name in full and any(s.name in diffusers_sd for s in sources(name, full[name].shape)):
                    assert torch.equal(value, sat_split(name, full[name], tp, rank)), (case, tp, name)
            if kind == "2b":  # not stored: computed, equal to diffusers' own sincos buffer
                torch.testing.assert_close(sd["mixins.pos_embed.pos_embedding"], sincos.float(), atol=1e-6, rtol=0)
    print(f"\n[diffusers load] {case}: worst |ours - diffusers| / max|ref| = {WORST[case]:.2e} over TP 1, 2")


def _split_run(rank, path, tp, inputs):
    model, rep = sat_dist.load_model(path, tp=tp, overrides=["model.adaln_split=true"], exchange="on",
                                     return_report=True)
    with torch.no_grad():
        out = model(**inputs)
    return out, {k: v.clone() for k, v in model.state_dict().items()}, rep.ranks[rank]


@pytest.mark.parametrize("kind", ["5b", "15_i2v"])
def test_adaln_split_layout_from_a_diffusers_folder(folders, kind):
    """The opt-in split layout reads its row/column blocks of diffusers' renamed and re-cut tensors
    (norm1/norm2.linear = chunk pairs of SAT's fused modulation) and still equals diffusers' forward;
    TP2 x DP2 with the exchange on: the DP replicas split the reading of those blocks too."""
    full, folder = folders[kind]
    ref = _reference(kind, folder)
    rows = [k for k in full if "adaLN_modulation" in k or "text_proj" in k]
    for rank, (out, sd, rep) in enumerate(values(run_ranks(4, _split_run, folder, 2, _inputs(kind)))):
        tp_rank = rank % 2
        assert (out - ref).abs().max().item() <= REL_TOL * ref.abs().max().item(), (kind, rank)
        for name in rows:
            assert torch.equal(sd[name], full[name].chunk(2, 0)[tp_rank]), (kind, rank, name)
        assert torch.equal(sd["time_embed.0.weight"], full["time_embed.0.weight"].chunk(2, 1)[tp_rank])
        assert rep.bytes_received > 0 and rep.bytes_read < rep.bytes_needed, (kind, rank)


def test_map_tiles_every_sat_tensor_as_the_fixture_conversion_does():
    """Each Source's boxes hold exactly what cvx_fixtures.to_diffusers puts in that diffusers
    tensor, and together they cover every stored SAT tensor once."""
    for kind in CASES:
        full = random_weights(shape_table(tiny_params(kind)), seed=1)
        conv, seen = to_diffusers(full), set()
        for name, value in full.items():
            srcs = sources(name, value.shape)
            covered = 0
            for src in srcs:
                assert conv[src.name].shape == src.shape
                for f in src.fragments:
                    sat_box = tuple(slice(o, o + s) for o, s in zip(f.logical.offsets, f.logical.sizes))
                    loc_box = tuple(slice(o, o + s) for o, s in zip(f.local_offsets, f.logical.sizes))
                    assert torch.equal(conv[src.name][loc_box], value[sat_box]), (kind, name, src.name)
                    covered += f.logical.numel
                seen.add(src.name)
            assert covered == (value.numel() if srcs else 0), (kind, name)
        assert seen == set(conv), kind


def _released_config(version: str, layers: int, heads: int, rotary: bool, i2v: bool) -> dict:
    """config.json as huggingface/diffusers scripts/convert_cogvideox_to_diffusers.py writes it."""
    init = ({"patch_size": 2, "patch_size_t": None, "patch_bias": True, "sample_height": 60, "sample_width": 90,
             "sample_frames": 49} if version == "1.0" else
            {"patch_size": 2, "patch_size_t": 2, "patch_bias": False, "sample_height": 300, "sample_width": 300,
             "sample_frames": 81})
    return {"_class_name": "CogVideoXTransformer3DModel", "_diffusers_version": "0.42.1", **DIFFUSERS_DEFAULTS,
            "in_channels": 32 if i2v else 16, "num_layers": layers, "num_attention_heads": heads,
            "use_rotary_positional_embeddings": rotary, "ofs_embed_dim": 512 if i2v and version == "1.5" else None,
            "use_learned_positional_embeddings": i2v and version == "1.0", **init}


def test_config_json_gives_the_released_architectures():
    """config.json -> the same DiT as configs/*.yaml (CogVideo's SAT configs) for all five releases.
    The one field that differs: 1.5's text_length (SAT YAML 224, diffusers 226), which the 1.5 code
    never uses (it splits at the context's length and has no learned positions)."""
    sig = inspect.signature(CogVideoXTransformer3DModel.__init__).parameters
    assert DIFFUSERS_DEFAULTS == {k: sig[k].default for k in sig if k != "self"}
    released = {"cogvideox_2b": ("1.0", 30, 30, False, False), "cogvideox_5b": ("1.0", 42, 48, True, False),
                "cogvideox_5b_i2v": ("1.0", 42, 48, True, True), "cogvideox1.5_5b": ("1.5", 42, 48, True, False),
                "cogvideox1.5_5b_i2v": ("1.5", 42, 48, True, True)}
    for name, args in released.items():
        ours = DiTConfig(**sat_model_config(_released_config(*args))).arch
        theirs = DiTConfig(model_class="DiffusionTransformer", **load_params(name)).arch
        if args[0] == "1.5":
            theirs = theirs.__class__(**{**theirs.__dict__, "text_length": 226})
        assert ours == theirs, name


def test_pipeline_root_describe_and_errors(folders, tmp_path):
    full, folder = folders["5b"]
    root = os.path.dirname(folder)
    with open(os.path.join(root, "model_index.json"), "w") as fh:
        json.dump({"_class_name": "CogVideoXPipeline", "transformer": ["diffusers", "CogVideoXTransformer3DModel"]}, fh)
    assert formats.reader_for(root).NAME == "diffusers" and formats.model_config(root) == formats.model_config(folder)
    info = formats.describe(root)
    assert info["format"] == "diffusers" and info["model_config"]["num_layers"] == 2 and "3D RoPE" in info["summary"][0]

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "activation_fn": "gelu"}))
    with pytest.raises(ConfigError, match="activation_fn='gelu' is not supported"):
        formats.model_config(str(bad))
    (bad / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file
    weights = load_file(str(bad / "diffusion_pytorch_model.safetensors"))
    del weights["transformer_blocks.1.attn1.to_k.weight"]
    save_file(weights, str(bad / "diffusion_pytorch_model.safetensors"))
    (err,) = run_ranks(1, _load_run, str(bad), 1, _inputs("5b"))
    assert "missing tensors ['transformer_blocks.1.attn1.to_k.weight']" in err.error, err.error
    with pytest.raises(CheckpointError, match="variant 'fp16'"):
        formats.describe(folder, "fp16")
