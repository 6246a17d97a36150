"""Loading CogVideoX SAT checkpoints laid out as released (`transformer/latest` ->
`1000/mp_rank_00_model_states.pt`, keys `model.diffusion_model.*`), through the public API with
CogVideo-layout YAMLs (engine sections ignored, `args.load` as the checkpoint), on forked gloo ranks.

- Tiny configs of all five variants at TP 1, 2, 3: every rank's tensors are bit-identical to the
  test's own SAT split of the saved full tensors; bytes read == the rank's shard + replicated bytes.
- Files as released that lack tensors SAT tolerates missing (2B sincos table, CogVideo#100; the
  rotary models' unused position_embeddings, #586; v1.0 RoPE tables) load, and the filled values
  equal diffusers' independent sincos / RoPE tables (or zeros for the unused embedding).
- A whole-engine save (T5 and VAE keys beside the DiT) loads the DiT only; an mp=2 save loads at TP=3.
- Mismatched checkpoint/config errors name the file, the tensor and what to do.
- A full-width 5B-shaped checkpoint with 2 layers at TP=4: each rank reads <= 1.05 x (its shard +
  replicated), computed here from the split rules.
"""
import os

import pytest
import torch
from diffusers.models.embeddings import get_3d_rotary_pos_embed, get_3d_sincos_pos_embed

import sat_dist
from cvx_fixtures import (CONFIGS, load_params, local_shape, nbytes, random_weights, sat_split, shape_table,
                          split_rule, tensor_sha, tiny_params, write_cogvideo_yaml, write_shipped, write_tiny_shipped)
from sat_dist.testing.dist import run_ranks, values

KINDS = ["2b", "5b", "5b_i2v", "15", "15_i2v"]


def _load(rank, config, tp, path=None, dtype=None):
    model, rep = sat_dist.load_model(path, config, tp=tp, dtype=dtype, return_report=True, exchange="off")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    on_meta = [n for n, t in list(sd.items()) + list(model.named_buffers()) if t.is_meta]
    return sd, rep.ranks[rank], on_meta, [n for n, m in model.named_modules() if m.training]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """Per kind: (full weights, CogVideo-layout YAML whose args.load is the transformer folder)."""
    out = {}
    for i, kind in enumerate(KINDS):
        _, full, config = write_tiny_shipped(tmp_path_factory.mktemp(f"cvx_{kind}"), kind, 100 + i, {"mode": "inference"})
        out[kind] = full, config
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tp", [1, 2, 3])
def test_tiny_load_bit_exact(shipped, kind, tp):
    full, config = shipped[kind]
    for rank, (sd, rep, on_meta, training) in enumerate(values(run_ranks(tp, _load, config, tp))):
        assert set(sd) == set(full)
        for name, t in sd.items():
            assert torch.equal(t, sat_split(name, full[name], tp, rank)), (kind, tp, rank, name)
        own = sum(nbytes(local_shape(k, tuple(v.shape), tp), 4) for k, v in full.items())
        assert rep.bytes_needed == own and rep.bytes_read == own, (rep.bytes_read, own)
        assert (on_meta, training, rep.tp_rank) == ([], [], rank)


def test_mp2_save_loads_at_tp3(tmp_path):
    params = tiny_params("5b")
    full = random_weights(shape_table(params), seed=7)
    root = write_shipped(str(tmp_path / "transformer"), full, mp=2, iteration="1")
    config = write_cogvideo_yaml(str(tmp_path / "m.yaml"), params)
    for rank, (sd, rep, _, _) in enumerate(values(run_ranks(3, _load, config, 3, root))):
        for name, t in sd.items():
            assert torch.equal(t, sat_split(name, full[name], 3, rank)), (rank, name)


def _released(kind, drop, dtype, tmp_path, extra=None):
    params = tiny_params(kind)
    full = random_weights(shape_table(params), seed=3, dtype=dtype)
    kept = {k: v for k, v in full.items() if k not in drop}
    root = write_shipped(str(tmp_path / "transformer"), kept, extra_module=extra)
    return params, full, root, write_cogvideo_yaml(str(tmp_path / "m.yaml"), params)


def test_2b_file_without_sincos_table(tmp_path):
    """The released 2B file has no mixins.pos_embed.pos_embedding (fp16 weights): it is filled
    with SAT's sincos table, which equals diffusers' own get_3d_sincos_pos_embed."""
    drop = {"mixins.pos_embed.pos_embedding"}
    params, full, root, config = _released("2b", drop, torch.float16, tmp_path)
    h = params["hidden_size"]
    table = get_3d_sincos_pos_embed(h, (6, 4), 3, spatial_interpolation_scale=1.875).flatten(0, 1)  # (W, H), T
    want = torch.cat([torch.zeros(5, h), table.float()]).unsqueeze(0)
    for rank, (sd, rep, on_meta, _) in enumerate(values(run_ranks(2, _load, config, 2, root))):
        got = sd["mixins.pos_embed.pos_embedding"]
        assert got.dtype == torch.float16 and on_meta == []
        torch.testing.assert_close(got, want.half(), atol=1e-3, rtol=0)
        for name in set(full) - drop:
            assert torch.equal(sd[name], sat_split(name, full[name], 2, rank)), name
        assert rep.bytes_read == sum(nbytes(local_shape(k, tuple(v.shape), 2), 2) for k, v in full.items()
                                     if k not in drop)
    # and in fp32 the filled table matches diffusers to float precision
    (sd, _, _, _), = values(run_ranks(1, _load, config, 1, root, "fp32"))
    torch.testing.assert_close(sd["mixins.pos_embed.pos_embedding"], want, atol=1e-6, rtol=0)


def test_rotary_files_without_tolerated_tensors(tmp_path):
    """v1.0 RoPE tables and the unused position_embeddings absent: tables equal diffusers'
    get_3d_rotary_pos_embed, position_embeddings are zeros; the 1.5-I2V file of CogVideo#586."""
    drop = {"mixins.pos_embed.freqs_sin", "mixins.pos_embed.freqs_cos", "transformer.position_embeddings.weight"}
    params, full, root, config = _released("5b", drop, torch.float32, tmp_path / "a")
    cos, sin = get_3d_rotary_pos_embed(16, ((0, 0), (4, 6)), (4, 6), 3)
    for rank, (sd, _, on_meta, _) in enumerate(values(run_ranks(2, _load, config, 2, root))):
        torch.testing.assert_close(sd["mixins.pos_embed.freqs_cos"], cos, atol=1e-6, rtol=0)
        torch.testing.assert_close(sd["mixins.pos_embed.freqs_sin"], sin, atol=1e-6, rtol=0)
        assert torch.equal(sd["transformer.position_embeddings.weight"], torch.zeros(64, 96)) and on_meta == []
    drop = {"transformer.position_embeddings.weight"}
    params, full, root, config = _released("15_i2v", drop, torch.bfloat16, tmp_path / "b")
    for rank, (sd, _, _, _) in enumerate(values(run_ranks(2, _load, config, 2, root))):
        assert sd["transformer.position_embeddings.weight"].dtype == torch.bfloat16
        assert not sd["transformer.position_embeddings.weight"].any()
        for name in set(full) - drop:
            assert torch.equal(sd[name], sat_split(name, full[name], 2, rank)), name


def test_whole_engine_save_loads_the_dit_only(tmp_path):
    extra = {"conditioner.embedders.0.transformer.shared.weight": torch.randn(100, 24),
             "first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3, 3)}
    params, full, root, config = _released("15", set(), torch.float32, tmp_path, extra)
    for rank, (sd, rep, _, _) in enumerate(values(run_ranks(2, _load, config, 2, root))):
        assert set(sd) == set(full)
        assert rep.bytes_read == rep.bytes_needed == sum(nbytes(local_shape(k, tuple(v.shape), 2), 4)
                                                         for k, v in full.items())


def test_mismatch_errors_name_file_tensor_and_fix(shipped, tmp_path):
    full, config_5b = shipped["5b"]
    root = os.path.join(os.path.dirname(config_5b), "transformer")
    i2v = write_cogvideo_yaml(str(tmp_path / "i2v.yaml"), tiny_params("5b_i2v"))
    out = run_ranks(2, _load, i2v, 2, root)
    assert all(r.error_type == "GroupLoadError" for r in out)
    msg = out[0].error
    assert "rank(s) [0, 1]" in msg and "mp_rank_00_model_states.pt" in msg
    assert "mixins.pos_embed.pos_embedding" in msg and "check --config" in msg
    # a shape mismatch names the tensor and both shapes
    p = tiny_params("5b")
    p["in_channels"] = 6
    bad = write_cogvideo_yaml(str(tmp_path / "c6.yaml"), p)
    msg = run_ranks(1, _load, bad, 1, root)[0].error
    assert "model.diffusion_model.mixins.patch_embed.proj.weight" in msg and "[96, 4, 2, 2]" in msg
    assert "[96, 6, 2, 2]" in msg


def _load_hashes(rank, root, tp):
    model, rep = sat_dist.load_model(root, os.path.join(CONFIGS, "cogvideox_5b.yaml"), tp=tp,
                                     overrides=["model.num_layers=2"], return_report=True)
    return {k: tensor_sha(v) for k, v in model.state_dict().items()}, rep.ranks[rank]


def test_5b_shaped_tp4_reads_only_its_shard(tmp_path):
    """Full-width 5B shapes, 2 layers, bf16 as released: per rank bytes read <= 1.05 x (shard +
    replicated), every rank's tensors equal the independent split (by SHA-256)."""
    params = load_params("cogvideox_5b")
    params["num_layers"] = 2
    shapes = shape_table(params)
    g = torch.Generator().manual_seed(0)
    full = {k: torch.randn(s, generator=g, dtype=torch.bfloat16) for k, s in sorted(shapes.items())}
    root = write_shipped(str(tmp_path / "transformer"), full)
    file_bytes = os.path.getsize(os.path.join(root, "1000", "mp_rank_00_model_states.pt"))
    shard = sum(nbytes(local_shape(k, s, 4), 2) for k, s in shapes.items() if split_rule(k))
    replicated = sum(nbytes(s, 2) for k, s in shapes.items() if not split_rule(k))
    for rank, (hashes, rep) in enumerate(values(run_ranks(4, _load_hashes, root, 4, timeout=300))):
        assert rep.bytes_needed == shard + replicated
        assert rep.bytes_read <= 1.05 * (shard + replicated), (rank, rep.bytes_read, shard, replicated)
        assert rep.bytes_read < 0.5 * file_bytes
        for name in shapes:
            assert hashes[name] == tensor_sha(sat_split(name, full[name], 4, rank)), (rank, name)
