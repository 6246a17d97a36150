"""The work group's tile-parallel VAE decode (sat_dist/engine/decode.py) against diffusers' own
`AutoencoderKLCogVideoX.tiled_decode` on one rank: a tiny CogVideoX VAE (tests/engine_fixtures.py)
whose tiles keep the size (16x24 px tiles, overlaps 1/4 and 1/6: a 3x3 grid of 4x6, 4x2, 2x6 and 2x2
latent tiles over 8x12 latents), 5 latent frames (two frame batches: 3 + 2, the conv cache carried
between them), decoded on 2 and 3 ranks (one TP group), on a CFG pair world (TP 2 x 2 replicas:
the gather over the TP groups then the pair), a TP 1 pair and an SP 2 pair (the SP groups, then
the pair). Tolerance: none — CPU fp32, the
frames (and the raw decoded tensor) are bitwise equal to tiled_decode's. A group of one rank, and
tiling off, decode as before (`vae.decode` on the leader alone). Then `sat-dist sample` at TP 2 with
a VAE whose default tiles keep the size: both ranks decode tiles, the mp4 decodes back to 9 frames.
"""
import json
import os

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from engine_fixtures import SIZES, VAE_KWARGS, write_pipeline
from sat_dist import collectives as C
from sat_dist.engine import decode as D
from sat_dist.engine import video
from sat_dist.launch import detect_launch
from sat_dist.testing.dist import run_ranks, values

TILES = dict(tile_sample_min_height=16, tile_sample_min_width=24, tile_overlap_factor_height=1 / 4,
             tile_overlap_factor_width=1 / 6)
LATENTS = (1, 5, 4, 8, 12)  # [B, T, C, H, W] as the engine holds them


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    v = AutoencoderKLCogVideoX(**VAE_KWARGS).eval()
    v.enable_slicing()
    v.enable_tiling(**TILES)
    assert video.tiles_exact(v)
    return v


@pytest.fixture(scope="module")
def latents():
    return torch.randn(LATENTS, generator=torch.Generator().manual_seed(1))


def test_the_grid_and_the_assignment(vae):
    rows = D.grid(vae, *LATENTS[-2:])
    assert [[(t.i, t.j, t.h, t.w) for t in row] for row in rows] == [
        [(0, 0, 4, 6), (0, 5, 4, 6), (0, 10, 4, 2)], [(3, 0, 4, 6), (3, 5, 4, 6), (3, 10, 4, 2)],
        [(6, 0, 2, 6), (6, 5, 2, 6), (6, 10, 2, 2)]]
    tiles = [t for row in rows for t in row]
    for n in (1, 2, 3, 4, 9, 11):
        mine = D.assign(tiles, n)
        assert sorted((t.row, t.col) for ts in mine for t in ts) == sorted((t.row, t.col) for t in tiles)
        area = [sum(t.h * t.w for t in ts) for ts in mine]
        assert max(area) - min(area) <= max(t.h * t.w for t in tiles)
        assert all(ts == sorted(ts, key=lambda t: (t.row, t.col)) for ts in mine)  # each decodes in tile order
    assert [[(t.row, t.col) for t in ts] for ts in D.assign(tiles, 2)] == [
        [(0, 0), (0, 2), (1, 0), (2, 0), (2, 2)], [(0, 1), (1, 1), (1, 2), (2, 1)]]  # areas 72 and 68


def test_decoded_frames_follow_the_config(vae):
    with torch.no_grad():
        for t in (1, 2, 3, 5, 13):
            assert vae._decode(torch.randn(1, 4, t, 4, 6)).sample.shape[2] == D.decoded_frames(vae, t)


def test_a_group_of_one_or_no_tiling_does_not_split(vae, latents):
    z = latents.permute(0, 2, 1, 3, 4)
    assert not D.splits(vae, z, None) and not D.splits(vae, z, D.WorkGroup())
    assert D.splits(vae, z, D.WorkGroup(tp=2, tp_rank=1))
    assert not D.splits(vae, z[..., :4, :6], D.WorkGroup(tp=2))  # one tile: diffusers does not tile it
    assert not D.splits(vae, torch.cat([z, z]), D.WorkGroup(tp=2))  # a batch: diffusers' sliced decode


def _decode(rank, vae, latents, tp, cfg, tiling=True, sp=1):
    """(tiles this rank decoded, plain vae.decode calls, frames or None, raw decode equal to tiled_decode)."""
    rt = C.setup(detect_launch(timeout_s=60), tp, None, 60, cfg_parallel=cfg, sp=sp)
    try:
        group = D.WorkGroup.of(rt, rt.cfg_group, rt.mesh.replica(rt.rank) % 2)  # as Engine: the pair index
        if not tiling:
            vae.disable_tiling()
        calls = {"tiles": 0, "plain": 0}
        real_tile, real_decode = D.decode_tile, vae.decode

        def tile(*a):
            calls["tiles"] += 1
            return real_tile(*a)

        def plain(*a, **k):
            calls["plain"] += 1
            return real_decode(*a, **k)
        D.decode_tile, vae.decode = tile, plain
        frames = video.decode(vae, latents, group)
        D.decode_tile, vae.decode = real_tile, real_decode
        z = (latents.permute(0, 2, 1, 3, 4) / vae.config.scaling_factor)
        raw_equal = None
        with torch.no_grad():
            raw = D.tiled_decode(vae, z, group) if tiling and group.size > 1 else None
            if group.leader:
                ref = (vae.tiled_decode(z) if tiling else vae.decode(z)).sample
                ref_frames = video.processor(vae).postprocess_video(video=ref, output_type="np")
                assert frames.dtype == ref_frames.dtype and frames.shape == ref_frames.shape
                frames = (frames, bool(np.array_equal(frames, ref_frames)))
                raw_equal = raw is None or bool(torch.equal(raw, ref))
            else:
                assert raw is None
        return calls["tiles"], calls["plain"], frames, raw_equal
    finally:
        C.teardown(rt)


@pytest.mark.parametrize("world,tp,cfg,sp", [(1, 1, False, 1), (2, 2, False, 1), (3, 3, False, 1), (4, 2, True, 1),
                                             (2, 1, True, 1), (4, 1, True, 2)],
                         ids=["1 rank", "TP 2", "TP 3", "TP 2 x CFG pair", "TP 1 x CFG pair", "SP 2 x CFG pair"])
def test_parallel_decode_is_tiled_decode_bit_for_bit(vae, latents, world, tp, cfg, sp):
    results = values(run_ranks(world, _decode, vae, latents, tp, cfg, True, sp, timeout=120))
    (frames, equal), raw_equal = results[0][2], results[0][3]
    assert frames.shape == (1, 17, 32, 48, 3)
    assert equal and raw_equal, "the group's frames differ from tiled_decode's"
    assert all(r[2] is None for r in results[1:])  # the leader gets the frames
    tiles = [r[0] for r in results]
    if world == 1:
        assert tiles == [0] and results[0][1] == 1  # a group of one: the plain decode
    else:
        assert sum(tiles) == 9 and all(tiles) and all(r[1] == 0 for r in results)
        assert tiles == [len(ts) for ts in D.assign([t for row in D.grid(vae, 8, 12) for t in row], world)]


def test_tiling_off_decodes_on_the_leader_alone(vae, latents):
    results = values(run_ranks(2, _decode, vae, latents, 2, False, False))
    assert [r[:2] for r in results] == [(0, 1), (0, 0)]
    assert results[0][2][1] and results[1][2] is None


def _cli(rank, argv):
    from sat_dist.cli import main

    seen = []
    real = D.decode_tile
    D.decode_tile = lambda vae, z, tile: (seen.append((tile.row, tile.col)), real(vae, z, tile))[1]
    return main(argv), seen


def test_sample_decodes_on_both_ranks_into_an_mp4(tmp_path):
    """`sat-dist sample --tp 2`: a VAE whose diffusers default tiles (half its sample size: 24x40 px,
    overlaps 1/6, 1/5) keep the size gives a 2x2 grid at 32x48; each rank decodes two tiles."""
    root = write_pipeline(str(tmp_path / "pipe"), "5b", seed=3)
    cfg_path = os.path.join(root, "vae", "config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(sample_height=48, sample_width=80)
    json.dump(cfg, open(cfg_path, "w"))
    out = str(tmp_path / "panda.mp4")
    argv = ["sample", "--model", root, "--prompt", "a red panda", "--steps", "2", "--tp", "2", "--out", out]
    results = values(run_ranks(2, _cli, argv, timeout=120))
    assert [code for code, _ in results] == [0, 0]
    seen = [s for _, s in results]
    assert sorted(seen[0] + seen[1]) == [(0, 0), (0, 1), (1, 0), (1, 1)] and seen[0] and seen[1]
    f, h, w = SIZES["5b"]
    assert iio.imread(out).shape == (f, h, w, 3)
