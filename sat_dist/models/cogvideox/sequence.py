"""Ulysses sequence parallelism inside the DiT: the video tokens split across an SP group, each rank
keeping its TP rank's heads (DeepSpeed-Ulysses, arXiv:2309.14509; as xDiT runs CogVideoX).

The split axis is the token rows (latent rows / patch height): rank i of the SP group holds token rows
`split_rows(H, sp)[i]` of every patched frame — the latents [B, T, C, rows * ph, W] of those rows, a box,
so the noise, the image latents and the final gather slice and concatenate on the latent height (dim 3).
Per frame a rank's tokens are contiguous in SAT's (t, h, w) token order; its sequence is the text
followed by its tokens in that order (frame by frame). Uneven splits are fine (480p: 30 token rows on
4 ranks -> 8, 8, 7, 7): the all-to-alls carry per-rank sizes, nothing is padded, so no padding can
reach a softmax. Every rank needs at least one row.

Everything but the attention acts on local tokens: the patch embedding, the sincos / learned position
tables and the RoPE tables (sliced to the rank's rows: `SeqShard.take`), the adaLN modulation (per
sample), the MLP, the final layer and its unpatchify. In each attention layer (`ulysses_attention`):

1. the rank computes Q/K/V for its sequence (text + its video tokens) with its TP heads, q/k norm and
   RoPE applied locally;
2. one all-to-all sends the video part of Q/K/V, head group j (local heads / sp of them) to SP rank j:
   rank j then holds every video token for its head group;
3. the text is replicated on every SP rank (the same text hidden state everywhere), so rank j takes its
   *own* text Q/K/V for head group j and puts it in front once — the text is never all-to-all'ed, so it
   appears exactly once in K/V (sending the replicated text through the all-to-all would put it there
   sp times: VideoSys #210, xDiT #295);
4. full attention over text + all video tokens for the head group;
5. one all-to-all back: to rank i its video tokens' outputs, plus the text's outputs to every rank, so
   each rank again holds all its TP heads for its own tokens and the whole text (identical on every
   rank: each head group's text output comes from one rank), for the row-parallel dense.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..tp_ops import all_to_all


@dataclass(frozen=True)
class SPInfo:
    """The SP size, this rank's index in its SP group and the group (None at size 1)."""

    size: int = 1
    rank: int = 0
    group: Any = None


def split_rows(rows: int, n: int) -> list[tuple[int, int]]:
    """[start, stop) token rows of each of `n` ranks: contiguous, in rank order, the first `rows % n`
    ranks one row more. Every rank needs a row: ValueError when `rows` < `n`."""
    if rows < n:
        raise ValueError(f"sequence parallel over {n} ranks splits the latent's token rows (latent height / "
                         f"patch), and this latent has only {rows}: use an SP size of at most {rows}")
    base, extra = divmod(rows, n)
    out, start = [], 0
    for i in range(n):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


@dataclass(frozen=True)
class SeqShard:
    """One forward's split of the video tokens of patch grid `thw` (T, H, W) over `sp`: rank i holds
    token rows `rows[i]` of every frame."""

    sp: SPInfo
    thw: tuple[int, int, int]
    rows: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, sp: SPInfo, thw: tuple[int, int, int]) -> "SeqShard":
        return cls(sp, thw, tuple(split_rows(thw[1], sp.size)))

    @property
    def local_thw(self) -> tuple[int, int, int]:
        start, stop = self.rows[self.sp.rank]
        return (self.thw[0], stop - start, self.thw[2])

    @property
    def counts(self) -> list[int]:
        """Video tokens on each rank."""
        t, _, w = self.thw
        return [t * (stop - start) * w for start, stop in self.rows]

    def take(self, z: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's tokens of `z`, whose dim `dim` holds the full video sequence (t, h, w order)."""
        dim = dim % z.dim()
        start, stop = self.rows[self.sp.rank]
        return z.unflatten(dim, self.thw).narrow(dim + 1, start, stop - start).flatten(dim, dim + 2)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_length: int,
                      shard: SeqShard) -> torch.Tensor:
    """Attention of this rank's sequence (text + its video tokens) over the whole sequence, q/k/v
    [b, heads, text_length + local tokens, head_dim] for this TP rank's heads; returns the context
    in the same layout. Two all-to-alls over the SP group (see the module docstring)."""
    sp, counts = shard.sp, shard.counts
    n, me = sp.size, sp.rank
    b, heads, s, d = q.shape
    if heads % n:
        raise ValueError(f"sequence parallel over {n} ranks needs the TP rank's {heads} heads to divide by {n}")
    hg, mine = heads // n, counts[me]
    if s != text_length + mine:
        raise ValueError(f"this rank's sequence has {s} tokens; the split says {text_length} text + {mine} video")
    # 1-2. video Q/K/V, head group j to rank j: [n (dest), 3, b, hg, mine, d] -> from each source i [3, b, hg, c_i, d]
    video = torch.stack((q[:, :, text_length:], k[:, :, text_length:], v[:, :, text_length:]))
    send = video.reshape(3, b, n, hg, mine, d).permute(2, 0, 1, 3, 4, 5).reshape(-1)
    unit = 3 * b * hg * d
    got = all_to_all(send, [unit * c for c in counts], [unit * mine] * n, sp.group)
    video = torch.cat([part.view(3, b, hg, c, d) for part, c in zip(got.split([unit * c for c in counts]), counts)],
                      dim=3)
    # 3-4. this rank's own text for its head group, once, in front
    heads_j = slice(me * hg, (me + 1) * hg)
    qf, kf, vf = (torch.cat((z[:, heads_j, :text_length], video[i]), dim=2) for i, z in enumerate((q, k, v)))
    out = F.scaled_dot_product_attention(qf, kf, vf)  # [b, hg, text + all video, d]
    # 5. back: to rank i [text | its tokens] of this head group; from each rank j its head group for ours
    text_out, video_out = out[:, :, :text_length], out[:, :, text_length:].split(counts, dim=2)
    send = torch.cat([torch.cat((text_out, part), dim=2).reshape(-1) for part in video_out])
    unit = b * hg * d
    got = all_to_all(send, [unit * s] * n, [unit * (text_length + c) for c in counts], sp.group)
    return got.view(n, b, hg, s, d).permute(1, 0, 2, 3, 4).reshape(b, heads, s, d)
