"""sat_dist's CogVideoX forward (loaded through the public API, forked gloo ranks) against the
`diffusers` CogVideoXTransformer3DModel given the same tiny weights converted from SAT's keys.

Compared end to end at TP 1, 2 and 3, fp32, tolerance |ours - ref| <= 1e-5 * max|ref|, for:
  2B-style (Basic3D sincos, Conv2d patches), 5B-style (v1.0 3D RoPE tables), 5B-I2V-style
  (learnable pos_embedding, concat_images), 1.5-I2V-style (Linear [2,2,2] patches, ofs, RoPE for a
  sub-grid of the table, text shorter than text_length).

Where SAT's DiT and diffusers' differ, the test says so and checks that part against a formula:
  - FinalLayerMixin.norm_final is a LayerNorm with eps 1e-6; diffusers' norm_out.norm uses norm_eps
    (1e-5). The reference's eps is set to SAT's value; the final layer is checked against the
    written-out formula, and the 1e-5 reference is shown to differ by more than rounding.
  - SAT stores/computes its position tables itself (sincos parameter, v1.0 RoPE buffers, 1.5 RoPE
    attributes); diffusers recomputes sincos and takes RoPE from the pipeline. The tables are
    compared with diffusers' get_3d_sincos_pos_embed / get_3d_rotary_pos_embed at full 2B/5B size.
  - The timestep embedding is checked against its formula ([cos | sin], SAT's order).
"""
import math

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed, get_3d_sincos_pos_embed

import sat_dist
from cvx_fixtures import (dit_inputs, random_weights, shape_table, tiny_params, to_diffusers, write_cogvideo_yaml, write_shipped,
                          write_tiny_shipped)
from sat_dist.testing.dist import run_ranks, values
from sat_dist.models import TPInfo
from sat_dist.models.cogvideox import CogVideoXDiT, DiTConfig, rope_freqs_3d, sincos_3d, timestep_embedding

REL_TOL = 1e-5  # of max|reference|; fp32 accumulation-order differences are ~5e-7 relative here
WORST: dict = {}  # kind -> worst relative error seen (printed at the end with -s)

# kind -> input (latent frames, height, width, text tokens)
CASES = {"2b": (2, 8, 12, 5), "5b": (2, 8, 12, 5), "5b_i2v": (3, 8, 12, 5), "15_i2v": (4, 4, 8, 3)}


def _inputs(kind: str) -> dict:
    return dit_inputs(kind, *CASES[kind], seed=42)


def _reference(kind: str, params: dict, full: dict, eps_final: float = 1e-6) -> torch.Tensor:
    """diffusers' transformer with the converted weights (RoPE computed as its pipeline does)."""
    t, h, w, _ = CASES[kind]
    v15, rope = kind.startswith("15"), kind != "2b"
    heads = params["num_attention_heads"]
    model = CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=params["hidden_size"] // heads,
        in_channels=params["in_channels"], out_channels=params["out_channels"], time_embed_dim=params["time_embed_dim"],
        ofs_embed_dim=params.get("ofs_embed_dim"), text_embed_dim=24, num_layers=params["num_layers"],
        sample_width=params["latent_width"], sample_height=params["latent_height"], sample_frames=params["num_frames"],
        patch_size=2, patch_size_t=2 if v15 else None, max_text_seq_length=5, spatial_interpolation_scale=1.875,
        use_rotary_positional_embeddings=rope, use_learned_positional_embeddings=kind == "5b_i2v")
    missing, unexpected = model.load_state_dict(to_diffusers(full), strict=False)
    assert missing == [] and unexpected == (["patch_embed.pos_embedding"] if kind == "2b" else [])
    model.eval()
    model.norm_out.norm.eps = eps_final  # SAT's FinalLayerMixin LayerNorm (see module docstring)
    inp = _inputs(kind)
    x = torch.cat([inp["x"], inp["concat_images"]], 2) if "concat_images" in inp else inp["x"]
    image_rotary_emb = None
    if rope and v15:
        image_rotary_emb = get_3d_rotary_pos_embed(16, None, (h // 2, w // 2), t // 2, grid_type="slice",
                                                   max_size=(params["latent_height"] // 2, params["latent_width"] // 2))
    elif rope:
        image_rotary_emb = get_3d_rotary_pos_embed(16, ((0, 0), (h // 2, w // 2)), (h // 2, w // 2), t)
    with torch.no_grad():
        return model(x, inp["context"], inp["timesteps"], ofs=inp.get("ofs"), image_rotary_emb=image_rotary_emb,
                     return_dict=False)[0]


def _forward(rank, config, tp, inputs, dtype=None):
    model = sat_dist.load_model(None, config, tp=tp, dtype=dtype)
    with torch.no_grad():
        return model(**inputs)


def _sat_tables(kind, params, full):
    """The tables released files hold, computed as SAT does (diffusers' functions here)."""
    if kind == "2b":  # SAT's own sincos table, as a fine-tuned 2B file holds it
        p = params["modules"]["pos_embed_config"]["params"]
        sin = get_3d_sincos_pos_embed(params["hidden_size"], (6, 4), 3, spatial_interpolation_scale=1.875)
        full["mixins.pos_embed.pos_embedding"] = torch.cat(
            [torch.zeros(p["text_length"], params["hidden_size"]), sin.flatten(0, 1).float()]).unsqueeze(0)
    if kind in ("5b", "5b_i2v"):  # the v1.0 files hold the RoPE tables
        cos, sin = get_3d_rotary_pos_embed(16, ((0, 0), (4, 6)), (4, 6), 3)
        full["mixins.pos_embed.freqs_cos"], full["mixins.pos_embed.freqs_sin"] = cos, sin


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    return {kind: write_tiny_shipped(tmp_path_factory.mktemp(f"fwd_{kind}"), kind, 200 + i, {}, _sat_tables)
            for i, kind in enumerate(CASES)}


@pytest.mark.parametrize("kind", list(CASES))
def test_forward_matches_diffusers_at_tp_1_2_3(shipped, kind):
    params, full, config = shipped[kind]
    ref = _reference(kind, params, full)
    t, h, w, _ = CASES[kind]
    assert ref.shape == (2, t, 4, h, w)
    scale = ref.abs().max().item()
    ours_tp1 = None
    for tp in (1, 2, 3):
        for rank, out in enumerate(values(run_ranks(tp, _forward, config, tp, _inputs(kind)))):
            assert out.shape == ref.shape and out.dtype == torch.float32
            err = (out - ref).abs().max().item() / scale
            WORST[kind] = max(WORST.get(kind, 0.0), err)
            assert err <= REL_TOL, (kind, tp, rank, err)
            if tp == 1:
                ours_tp1 = out
            else:
                assert (out - ours_tp1).abs().max().item() <= REL_TOL * scale
    note = ""
    if kind == "2b":  # the eps difference is real: diffusers' own eps gives a visibly larger error
        default = (ours_tp1 - _reference(kind, params, full, eps_final=1e-5)).abs().max().item() / scale
        assert default > 5 * WORST[kind]
        note = f"; with diffusers' norm_out eps 1e-5 instead: {default:.2e}"
    print(f"\n[cogvideox forward] {kind}: worst |ours - diffusers| / max|ref| = {WORST[kind]:.2e} "
          f"(max|ref| = {scale:.2f}) over TP 1, 2, 3{note}")


def test_final_layer_formula():
    """FinalLayerMixin: x_video -> LN(eps 1e-6) -> x(1+scale)+shift -> Linear -> unpatchify."""
    params = tiny_params("15_i2v")
    cfg = DiTConfig(**params)
    model = CogVideoXDiT(cfg, TPInfo())
    model.load_state_dict(random_weights(shape_table(params), seed=9), assign=True)
    g = torch.Generator().manual_seed(1)
    text, (T, H, W) = 3, (2, 2, 4)
    hidden = torch.randn(2, text + T * H * W, 96, generator=g) * 3 + 1
    emb = torch.randn(2, 32, generator=g)
    fl = model.mixins["final_layer"]
    x = hidden[:, text:]
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    normed = (x - mu) / torch.sqrt(var + 1e-6) * fl.norm_final.weight + fl.norm_final.bias
    mod = torch.nn.functional.silu(emb) @ fl.adaLN_modulation[1].weight.T + fl.adaLN_modulation[1].bias
    shift, scale = mod[:, :96], mod[:, 96:]
    y = (normed * (1 + scale[:, None]) + shift[:, None]) @ fl.linear.weight.T + fl.linear.bias  # [b, THW, c*o*p*q]
    want = torch.empty(2, T * 2, 4, H * 2, W * 2)
    for ti in range(T):
        for hi in range(H):
            for wi in range(W):
                patch = y[:, (ti * H + hi) * W + wi].reshape(2, 4, 2, 2, 2)  # (c, o, p, q)
                for o in range(2):
                    want[:, ti * 2 + o, :, hi * 2:hi * 2 + 2, wi * 2:wi * 2 + 2] = patch[:, :, o]
    with torch.no_grad():
        got = model._final(hidden, emb, text, (T, H, W))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_position_tables_equal_diffusers_at_full_size():
    """2B's sincos table (13x30x45, 1920, interpolation 1.875) and 5B's RoPE (13x30x45, head 64)."""
    ours = sincos_3d(1920, (13, 30, 45), (1.875, 1.875, 1.0))
    theirs = get_3d_sincos_pos_embed(1920, (45, 30), 13, spatial_interpolation_scale=1.875).flatten(0, 1).float()
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    angles = rope_freqs_3d(64, (13, 30, 45), 10000.0).reshape(13 * 30 * 45, 64)
    cos, sin = get_3d_rotary_pos_embed(64, ((0, 0), (30, 45)), (30, 45), 13)
    torch.testing.assert_close(angles.cos(), cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(angles.sin(), sin, atol=1e-5, rtol=0)


def test_timestep_embedding_formula():
    """[cos(t f_i) | sin(t f_i)], f_i = exp(-ln(10000) i / half), in float64 here; fp32 rounds the
    argument (up to ~1000 rad) to ~6e-5, hence the tolerance."""
    t = torch.tensor([0.0, 1.0, 999.0], dtype=torch.float64)
    half = 48
    freqs = torch.tensor([math.exp(-math.log(10000) * i / half) for i in range(half)], dtype=torch.float64)
    want = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    got = timestep_embedding(t.float(), 96, torch.float32)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)
    assert got[0, :half].eq(1).all() and got[0, half:].eq(0).all()  # cos first, as SAT (flip_sin_to_cos)


def test_sandwich_swiglu_tp_forward_and_bf16(tmp_path):
    """Options outside the released configs (no diffusers counterpart): keys exist and the TP
    forward equals TP=1; a bf16 load runs the CPU 16-bit paths at TP=2 close to TP=1."""
    params = tiny_params("5b")
    params["use_SwiGLU"] = True
    params["transformer_args"]["layernorm_order"] = "sandwich"
    shapes = shape_table(params)
    assert "mixins.swiglu.w2.1.weight" in shapes and "transformer.layers.0.third_layernorm.weight" in shapes
    root = write_shipped(str(tmp_path / "transformer"), random_weights(shapes, seed=5))
    config = write_cogvideo_yaml(str(tmp_path / "m.yaml"), params, {"load": root})
    inputs = _inputs("5b")
    (ref,) = values(run_ranks(1, _forward, config, 1, inputs))
    for out in values(run_ranks(2, _forward, config, 2, inputs)):
        assert (out - ref).abs().max().item() <= REL_TOL * ref.abs().max().item()
    (ref16,) = values(run_ranks(1, _forward, config, 1, inputs, "bf16"))
    for out in values(run_ranks(2, _forward, config, 2, inputs, "bf16")):
        assert out.dtype == torch.bfloat16
        assert (out.float() - ref16.float()).abs().max().item() <= 0.05 * ref16.float().abs().max().item()


def test_v1_refuses_other_latent_sizes(shipped):
    params, full, _ = shipped["5b"]
    model = CogVideoXDiT(DiTConfig(**params), TPInfo())
    model.load_state_dict({k: v.clone() for k, v in full.items()}, assign=True)
    with pytest.raises(ValueError, match="runs only at its configured latent size 8x12"):
        model(torch.randn(1, 2, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 5, 24))
