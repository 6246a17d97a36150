"""Bytes each rank sends per sampling run, predicted from the configs and the sample size — the numbers
`sat_dist.commcount` counts at each collective, with its convention (module docstring there):
all-reduce 2 (g - 1) n // g, all-gather (g - 1) n, all-to-all the input addressed to other ranks,
gather to the first rank n on every other rank.

Per DiT forward (batch b: 2 with sequential CFG, else 1; S = text + this rank's video tokens):

- tp: every layer's two row-parallel all-reduces (attention dense, MLP out) of [b, S, hidden]; with
  `adaln_split`, the time embedding's all-reduce [b, time_dim] and the all-gathers of the text
  projection [b, text, hidden / tp], the layers' modulations [b, 12 hidden / tp] and the final layer's
  [b, 2 hidden / tp];
- sp: every layer's two Ulysses all-to-alls (sequence.py): video Q/K/V [3, b, heads / tp, mine, d] out
  ((sp - 1) / sp of it to the peers), then the context back: to each peer j its text + tokens for this
  rank's head group;
- cfg (a CFG pair): the DiT output's all-gather, [1, T, C, this rank's rows, W].

One DiT forward per step (diffusers' pipelines and CogVideo's SAT sampler alike). Encode: the T5 forward
per text (2 with diffusers' CFG: the negative prompt too; SAT: one, its unconditional is zeros), two
all-reduces [1, L, d_model] per block. After the loop: the SP group's latents gather (the largest rank's
rows, padded). The decode's gathers (kind "decode"): from the VAE's tile grid (engine/decode.py `gather_sent`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .. import commcount as cc
from ..models.cogvideox.sequence import split_rows
from .decode import gather_sent


@dataclass(frozen=True)
class Layout:
    """One (tp, sp, cfg) layout: cfg 2 = CFG pairs."""

    tp: int
    sp: int = 1
    cfg: int = 1

    @property
    def ranks(self) -> int:
        return self.tp * self.sp * self.cfg

    def name(self) -> str:
        return f"TP{self.tp}xSP{self.sp}xCFG{self.cfg}"


def dit_forward_bytes(a, tp: int, sp: int, sp_rank: int, b: int, text: int, thw: tuple[int, int, int],
                      item: int) -> dict[str, int]:
    """tp and sp bytes one DiT forward sends from SP rank `sp_rank` (`thw`: the token grid)."""
    t, h, w = thw
    rows = split_rows(h, sp) if sp > 1 else [(0, h)]
    counts = [t * (stop - start) * w for start, stop in rows]
    mine = counts[sp_rank]
    s = text + mine
    out = {"tp": 0, "sp": 0}
    out["tp"] += a.layers * 2 * cc.all_reduce_bytes(b * s * a.hidden * item, tp)
    if a.adaln_split and tp > 1:
        out["tp"] += cc.all_reduce_bytes(b * a.time_dim * item, tp)
        out["tp"] += cc.all_gather_bytes(b * text * (a.hidden // tp) * item, tp)
        out["tp"] += a.layers * cc.all_gather_bytes(b * (12 * a.hidden // tp) * item, tp)
        out["tp"] += cc.all_gather_bytes(b * (2 * a.hidden // tp) * item, tp)
    if sp > 1:
        hg, d = a.heads // tp // sp, a.head_dim
        first = cc.all_to_all_bytes([3 * b * hg * d * mine] * sp, sp_rank, item)
        back = cc.all_to_all_bytes([b * hg * d * (text + c) for c in counts], sp_rank, item)
        out["sp"] += a.layers * (first + back)
    return out


def run_bytes(a, t5, layout: Layout, *, text: int, latent: tuple[int, int, int], channels: int,
              dit_item: int, t5_item: int, latent_item: int, cfg_on: bool = True, sat: bool = False,
              sp_rank: int = 0, vae=None, tp_rank: int = 0, pair_index: int = 0,
              decode_latent: tuple[int, int, int] | None = None, vae_item: int | None = None) -> dict:
    """{"encode", "per_step", "decode"}: bytes by kind one rank (SP rank `sp_rank`) sends in one run.
    `a`: the DiT's arch; `t5`: the T5 config (d_model, num_layers); `latent`: (frames, height, width)
    of the latents the DiT sees (frames padded to the time patch); `channels`: the latents' channels
    (the DiT's in_channels, halved for I2V); `latent_item`: the latents' element size in the loop. With
    `vae` (the VAE module, tiling as the engine set it; meta is fine) the decode's gathers too, for TP rank
    `tp_rank` of CFG replica `pair_index`, of `decode_latent` (default `latent`) in `vae_item` bytes."""
    tp, sp = layout.tp, layout.sp
    pair = layout.cfg == 2 and cfg_on
    zero = {k: 0 for k in cc.KINDS}
    enc = dict(zero)
    texts = (2 if cfg_on and not sat else 1)
    enc["tp"] = texts * t5.num_layers * 2 * cc.all_reduce_bytes(text * t5.d_model * t5_item, tp)
    pt, ph, pw = a.patch
    lt, lh, lw = latent
    thw = (-(-lt // pt), lh // ph, lw // pw)
    b = 2 if cfg_on and not pair else 1
    step = dict(zero)
    step.update(dit_forward_bytes(a, tp, sp, sp_rank, b, text, thw, dit_item))
    rows = split_rows(thw[1], sp) if sp > 1 else [(0, thw[1])]
    my_rows = (rows[sp_rank][1] - rows[sp_rank][0]) * ph
    if pair:
        step["cfg"] = cc.all_gather_bytes(thw[0] * pt * a.out_channels * my_rows * lw * dit_item, 2)
    dec = dict(zero)
    if sp > 1:
        most = max(stop - start for start, stop in rows) * ph
        dec["sp"] = cc.all_gather_bytes(lt * channels * most * lw * latent_item, sp)
    dec["decode"] = None if vae is None else gather_sent(
        vae, decode_latent or latent, vae_item or latent_item, tp, sp, pair, tp_rank, sp_rank, pair_index)
    return {"encode": enc, "per_step": step, "decode": dec}


def max_over_ranks(a, t5, layout: Layout, **kw) -> dict:
    """`run_bytes` of the SP rank that sends the most per step (uneven row splits differ)."""
    runs = [run_bytes(a, t5, layout, sp_rank=r, **kw) for r in range(layout.sp)]
    return max(runs, key=lambda r: sum(r["per_step"].values()))


def step_total(run: dict) -> int:
    return sum(v for v in run["per_step"].values() if v)


def valid_layouts(a, gpus: int, token_rows: Optional[int], t5=None) -> list[Layout]:
    """Every (tp, sp, cfg) for `gpus` GPUs: tp divides the DiT's heads and MLP (and the T5's, when
    given), sp divides heads / tp and is at most the token rows, cfg in {1, 2}, tp x sp x cfg divides
    `gpus` (the rest is dp: work groups)."""
    out = []
    for tp in range(1, gpus + 1):
        if gpus % tp or a.heads % tp or a.ffn % tp or a.hidden % tp:
            continue
        if t5 is not None and (t5.num_heads % tp or t5.d_ff % tp):
            continue
        for sp in range(1, gpus // tp + 1):
            if (gpus // tp) % sp or (a.heads // tp) % sp or (token_rows is not None and sp > token_rows):
                continue
            for cfg in (1, 2):
                if (gpus // (tp * sp)) % cfg == 0:
                    out.append(Layout(tp, sp, cfg))
    return out


def choose(rows: list[dict]) -> Optional[dict]:
    """`--layout auto`'s rule: among the layouts that fit, the fewest bytes sent per step per rank;
    ties: fewer ranks per work group (tp x sp x cfg: more work groups), then smaller tp, then smaller sp."""
    fit = [r for r in rows if r["fits"]]
    if not fit:
        return None
    return min(fit, key=lambda r: (r["bytes_per_step"], r["tp"] * r["sp"] * r["cfg"], r["tp"], r["sp"]))
