"""The work group's VAE decode: diffusers' tiled decode with its spatial tiles dealt out to the ranks.

Followed: huggingface/diffusers src/diffusers/models/autoencoders/autoencoder_kl_cogvideox.py,
`AutoencoderKLCogVideoX.tiled_decode` (diffusers 0.42). There the latents [B, C, T, H, W] are cut into
overlapping spatial tiles (origins `range(0, H, overlap_height)` x `range(0, W, overlap_width)`, row by
row), each tile decoded on its own — its latent frames in batches of `num_latent_frames_batch_size`,
the decoder's conv cache carried from batch to batch and reset for every tile — then every tile is
blended into the one above it (`blend_v`) and the one to its left (`blend_h`), in place and in tile
order, and cropped to the rows it keeps. Here:

- every rank of the work group (a replica's TP x SP ranks, or a CFG pair of replicas) computes the
  same tile grid and the same assignment (`assign`): tiles in descending latent area (ties in tile
  order), each to the rank with the least area so far (ties: the lowest work index) — round-robin
  when the tiles are equal, and edge tiles (cut short by the latents' border) fill the gaps;
- each rank decodes its tiles in tile order with the VAE's own `_decode` on the tile's latents, which
  for a tile (no wider or taller than the tile size) is exactly tiled_decode's inner loop: the same
  frame batches, post_quant_conv, the conv cache reset per tile. Decode memory stays one tile's;
- the decoded tiles travel as one byte buffer per rank, the same length on every rank (the largest
  rank's tiles: every decoded tile's shape follows from the VAE config and the latents' shape),
  gathered to the leader with one gather per work-group dimension above 1 (`WorkGroup.gather`): over
  the TP group, then among the ranks that gathered, over the SP group and the CFG pair (no device
  group spans a work group). No object crosses the device plane;
- the leader blends and crops them in diffusers' order with the VAE's own `blend_v`/`blend_h`
  (`blend`, tiled_decode's second loop), giving tiled_decode's frames bit for bit.

A work group of one rank, tiling off, latents no larger than one tile, or a batch of several videos
(diffusers' sliced decode) decode as before: `vae.decode` on the leader alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .. import collectives as C


@dataclass(frozen=True)
class WorkGroup:
    """This rank's place in its work group (runtime.py's Mesh: rank = ((d * cfg + c) * sp + s) * tp + t):
    TP rank `tp_rank` of `tp` in `tp_group`, SP rank `sp_rank` of `sp` in `sp_group`, replica `pair_index`
    of the CFG pair `pair_group` (None: one replica). Work index (c * sp + s) * tp + t; the leader is 0."""

    tp: int = 1
    tp_rank: int = 0
    tp_group: Any = None
    pair_group: Any = None
    pair_index: int = 0
    sp: int = 1
    sp_rank: int = 0
    sp_group: Any = None

    @classmethod
    def of(cls, rt, pair_group, pair_index: int) -> "WorkGroup":
        return cls(rt.tp, rt.tp_rank, rt.tp_group, pair_group, pair_index if pair_group is not None else 0,
                   rt.mesh.sp, rt.sp_rank, rt.sp_group)

    @property
    def size(self) -> int:
        return self.tp * self.sp * (2 if self.pair_group is not None else 1)

    @property
    def index(self) -> int:
        return (self.pair_index * self.sp + self.sp_rank) * self.tp + self.tp_rank

    @property
    def leader(self) -> bool:
        return self.index == 0

    def gather(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Every work-group rank's `x` (one shape on all) stacked on a new dim 0 in work order at the
        leader, None elsewhere: the TP group gathers to its TP rank 0, those gather over their SP group
        to SP rank 0, those over the CFG pair (`collectives.gather_to_first`, one gather per stage of
        more than one rank: no device group spans a work group)."""
        out = x.unsqueeze(0)
        for group, n in ((self.tp_group, self.tp), (self.sp_group, self.sp), (self.pair_group, 2)):
            if group is None or n == 1:
                continue
            got = C.gather_to_first(out, group)
            if got is None:
                return None
            out = got.flatten(0, 1)
        return out


@dataclass(frozen=True)
class Tile:
    """A tile's latent rows i:i+h, columns j:j+w; (row, col) in tiled_decode's grid."""

    row: int
    col: int
    i: int
    j: int
    h: int
    w: int


def grid(vae: nn.Module, height: int, width: int) -> list[list[Tile]]:
    """tiled_decode's tiles of [.., height, width] latents, row by row (its `overlap_*` steps)."""
    step_h = int(vae.tile_latent_min_height * (1 - vae.tile_overlap_factor_height))
    step_w = int(vae.tile_latent_min_width * (1 - vae.tile_overlap_factor_width))
    th, tw = vae.tile_latent_min_height, vae.tile_latent_min_width
    return [[Tile(r, c, i, j, min(th, height - i), min(tw, width - j)) for c, j in enumerate(range(0, width, step_w))]
            for r, i in enumerate(range(0, height, step_h))]


def assign(tiles: list[Tile], ranks: int) -> list[list[Tile]]:
    """Each rank's tiles, in tile order: largest latent area first (ties in tile order), each to the
    rank with the least area so far (ties: the lowest rank). The same on every rank."""
    load, out = [0] * ranks, [[] for _ in range(ranks)]
    for k, t in sorted(enumerate(tiles), key=lambda kt: (-kt[1].h * kt[1].w, kt[0])):
        r = min(range(ranks), key=lambda x: (load[x], x))
        load[r] += t.h * t.w
        out[r].append((k, t))
    return [[t for _, t in sorted(mine, key=lambda kt: kt[0])] for mine in out]


def decoded_frames(vae: nn.Module, latent_frames: int) -> int:
    """The frames `_decode`/`tiled_decode` make of `latent_frames`: its frame batches (the first takes the
    remainder), each through the decoder's time upsamplers (CogVideoXUpsample3D with compress_time:
    an odd count n > 1 becomes 1 + 2 (n - 1), an even one 2n, a single frame stays one)."""
    b = vae.num_latent_frames_batch_size
    batches = max(latent_frames // b, 1)
    sizes = [b + latent_frames % b] + [b] * (batches - 1) if latent_frames >= b else [latent_frames]
    ups = [u for blk in vae.decoder.up_blocks for u in (blk.upsamplers or []) if u.compress_time]
    total = 0
    for n in sizes:
        for _ in ups:
            n = n if n == 1 else (1 + 2 * (n - 1) if n % 2 else 2 * n)
        total += n
    return total


def _spatial(vae: nn.Module) -> int:
    return 2 ** sum(1 for blk in vae.decoder.up_blocks if blk.upsamplers)


def splits(vae: nn.Module, z: torch.Tensor, group: Optional[WorkGroup]) -> bool:
    """Whether the group decodes `z` ([B, C, T, H, W], VAE scale) together: more than one rank, one
    video, and diffusers would tile it (`_decode`: tiling on and wider or taller than a tile)."""
    if group is None or group.size < 2 or z.shape[0] != 1 or not getattr(vae, "use_tiling", False):
        return False
    return z.shape[-1] > vae.tile_latent_min_width or z.shape[-2] > vae.tile_latent_min_height


def gather_sent(vae: nn.Module, latent: tuple[int, int, int], item: int, tp: int, sp: int, pair: bool,
                tp_rank: int = 0, sp_rank: int = 0, pair_index: int = 0) -> int:
    """Bytes one rank sends in `tiled_decode`'s gathers (commcount's gather convention: each rank its own
    contribution, the root nothing), predicted from the VAE's tiles and the latents' (frames, height, width):
    every rank's buffer is the largest rank's tiles; the TP stage sends it, the SP stage the TP group's
    stack, the CFG stage the TP x SP stack. 0 when the group does not split the decode (`splits`)."""
    t, h, w = latent
    size = tp * sp * (2 if pair else 1)
    if size < 2 or not getattr(vae, "use_tiling", False) or not (w > vae.tile_latent_min_width or
                                                                  h > vae.tile_latent_min_height):
        return 0
    mine = assign([tl for row in grid(vae, h, w) for tl in row], size)
    s, frames = _spatial(vae), decoded_frames(vae, t)
    buf = max(sum(vae.config.out_channels * frames * tl.h * s * tl.w * s for tl in ts) for ts in mine) * item
    if tp > 1 and tp_rank:
        return buf
    if sp > 1 and sp_rank:
        return tp * buf
    return tp * sp * buf if pair and pair_index else 0


def decode_tile(vae: nn.Module, z: torch.Tensor, tile: Tile) -> torch.Tensor:
    """One tile decoded as tiled_decode's inner loop does (`_decode` on a tile: frame batches, conv cache
    reset for the tile)."""
    return vae._decode(z[:, :, :, tile.i:tile.i + tile.h, tile.j:tile.j + tile.w]).sample


def tiled_decode(vae: nn.Module, z: torch.Tensor, group: WorkGroup) -> Optional[torch.Tensor]:
    """Collective over the work group: `vae.tiled_decode(z).sample` on its leader, None elsewhere.
    Every rank passes the same `z` ([1, C, T, H, W], in the VAE's dtype)."""
    rows = grid(vae, z.shape[-2], z.shape[-1])
    mine = assign([t for row in rows for t in row], group.size)
    s, frames = _spatial(vae), decoded_frames(vae, z.shape[2])
    shape = lambda t: (z.shape[0], vae.config.out_channels, frames, t.h * s, t.w * s)  # noqa: E731
    item = z.element_size()
    nbytes = [sum(torch.Size(shape(t)).numel() for t in ts) * item for ts in mine]
    buf = torch.zeros(max(nbytes), dtype=torch.uint8, device=z.device)
    off = 0
    for t in mine[group.index]:  # decoded straight into the buffer: one tile's decode alive at a time
        out = decode_tile(vae, z, t)
        if tuple(out.shape) != shape(t):
            raise RuntimeError(f"tile {t}: decoded to {tuple(out.shape)}, expected {shape(t)} from the VAE config")
        n = out.numel() * item
        buf[off:off + n].view(z.dtype).view(out.shape).copy_(out)
        off, out = off + n, None
    got = group.gather(buf)
    if got is None:
        return None
    decoded: dict[tuple[int, int], torch.Tensor] = {}
    for rank, ts in enumerate(mine):
        off = 0
        for t in ts:
            n = torch.Size(shape(t)).numel() * item
            decoded[t.row, t.col] = got[rank, off:off + n].view(z.dtype).view(shape(t))
            off += n
    return blend(vae, [[decoded[t.row, t.col] for t in row] for row in rows])


def blend(vae: nn.Module, rows: list[list[torch.Tensor]]) -> torch.Tensor:
    """tiled_decode's second loop, verbatim: each decoded tile blended (in place) with the tile above
    and the tile to its left, cropped to the rows it keeps; rows concatenated."""
    blend_extent_height = int(vae.tile_sample_min_height * vae.tile_overlap_factor_height)
    blend_extent_width = int(vae.tile_sample_min_width * vae.tile_overlap_factor_width)
    row_limit_height = vae.tile_sample_min_height - blend_extent_height
    row_limit_width = vae.tile_sample_min_width - blend_extent_width
    result_rows = []
    for i, row in enumerate(rows):
        result_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = vae.blend_v(rows[i - 1][j], tile, blend_extent_height)
            if j > 0:
                tile = vae.blend_h(row[j - 1], tile, blend_extent_width)
            result_row.append(tile[:, :, :, :row_limit_height, :row_limit_width])
        result_rows.append(torch.cat(result_row, dim=4))
    return torch.cat(result_rows, dim=3)
