"""Benchmark: the VAE decode on 1 rank (diffusers' tiled decode, as a group leader did it alone) against
the tile-parallel decode on 2 forked gloo ranks (sat_dist/engine/decode.py: TP 2, each rank decodes
its share of the tiles, the leader gathers and blends), in the same run, on the same VAE and latents.

    .venv/bin/python bench/decode_bench.py [--latent-frames 7] [--size 80x128] [--repeat 3]

The VAE is CogVideoX's architecture (AutoencoderKLCogVideoX: 4 blocks, 8x spatial and 4x temporal
compression, 16 latent channels) narrowed to (32, 64, 64, 128) channels and one layer per block so
the decode takes seconds on a CPU, with diffusers' default overlaps (1/6, 1/5) on 48x80 px tiles (they
keep the size): at 80x128 px a 2x2 grid of tiles of 6x10, 6x8, 5x10 and 5x8 latents (each rank
gets two: 100 and 98 latent pixels). Every rank runs one torch thread (OMP_NUM_THREADS=1,
torch.set_num_threads(1)) in both runs, so the 2 ranks use 2 cores where the 1 rank uses one — a fair
comparison on a 2-core machine. Seconds are the leader's, from a barrier to the frames (gather and
blend included), the best and the median of `--repeat`, with each rank's CPU seconds (on a loaded
machine the CPU seconds show the split even when the wall clock cannot); the frames of the two runs
are checked equal (bitwise). A measurement, not a test.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist

import sat_dist.collectives as C
from sat_dist.engine import video
from sat_dist.engine.decode import WorkGroup, assign, grid
from sat_dist.launch import detect_launch
from sat_dist.testing.dist import run_ranks, values

CHANNELS = (32, 64, 64, 128)
TILES = dict(tile_sample_min_height=48, tile_sample_min_width=80)  # diffusers' overlaps 1/6, 1/5


def make_vae():
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(block_out_channels=CHANNELS, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, latent_channels=16, layers_per_block=1,
                                 norm_num_groups=32).eval()
    tiled = video.enable_bounded_decode(vae, TILES)
    assert tiled and video.tiles_exact(vae)
    return vae


def _decode(rank: int, vae, latents: torch.Tensor, world: int, repeat: int):
    assert torch.get_num_threads() == 1
    rt = C.setup(detect_launch(timeout_s=120), world, None, 120)
    try:
        group = WorkGroup.of(rt, None, 0)
        seconds, cpu, frames = [], [], None
        for _ in range(repeat):
            if world > 1:
                dist.barrier(group=rt.tp_group)
            t, c = time.perf_counter(), time.process_time()
            frames = video.decode(vae, latents, group)
            seconds.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        return seconds, cpu, frames
    finally:
        C.teardown(rt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latent-frames", type=int, default=7, help="latent frames (7: 25 frames)")
    ap.add_argument("--size", default="80x128", help="video height x width in pixels (multiples of 8)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    h, w = (int(x) for x in args.size.split("x"))
    vae = make_vae()
    s = 2 ** (len(CHANNELS) - 1)
    latents = torch.randn((1, args.latent_frames, 16, h // s, w // s), generator=torch.Generator().manual_seed(1))
    tiles = [t for row in grid(vae, h // s, w // s) for t in row]
    share = [sum(t.h * t.w for t in ts) for ts in assign(tiles, 2)]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"VAE {CHANNELS}, {args.latent_frames} latent frames x {h}x{w} px: {len(tiles)} tiles "
          f"({', '.join(f'{t.h}x{t.w}' for t in tiles)} latents), 2 ranks get {share} latent pixels; "
          f"{os.cpu_count()} CPUs, 1 torch thread per rank, load average {load:.1f} at start")
    got = {}
    for world in (1, 2):
        results = values(run_ranks(world, _decode, vae, latents, world, args.repeat, timeout=1200))
        got[world] = results[0][0], results[0][2]
        assert all(r[2] is None for r in results[1:])
        sec = results[0][0]
        cpu = ", ".join(f"rank {r}: {statistics.median(c):.2f}" for r, (_, c, _) in enumerate(results))
        name = f"{world} rank{'s' if world > 1 else ' '}"
        print(f"{name}: best {min(sec):6.2f} s, median {statistics.median(sec):6.2f} s over {args.repeat} "
              f"({', '.join(f'{x:.2f}' for x in sec)}); CPU s per decode (median) {cpu}")
    (s1, f1), (s2, f2) = got[1], got[2]
    assert f1.shape == f2.shape == (1, (args.latent_frames - 1) * 4 + 1, h, w, 3), (f1.shape, f2.shape)
    equal = bool(np.array_equal(f1, f2))
    ratio = statistics.median(s1) / statistics.median(s2)
    print(f"2 ranks vs 1: {min(s1) / min(s2):.2f}x faster (best), {ratio:.2f}x (median); frames {f1.shape[1]} x "
          f"{h}x{w}, bitwise equal: {equal}")
    if not equal:
        raise SystemExit(f"frames differ: max |2 ranks - 1 rank| = {float(np.abs(f1 - f2).max()):.3g}")


if __name__ == "__main__":
    main()
