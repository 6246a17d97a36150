"""SAT's DiT formulas that hold no parameters: the 3D position tables, RoPE, the timestep
embedding and adaLN's modulate (THUDM/CogVideo sat/dit_video_concat.py, sgm's
sat/sgm/modules/diffusionmodules/util.py). Kept apart from the modules so tests can check each
against its reference (diffusers' get_3d_sincos_pos_embed / get_3d_rotary_pos_embed).
"""
from __future__ import annotations

import math

import numpy as np
import torch


def sincos_3d(dim: int, grid: tuple[int, int, int], interp: tuple[float, float, float]) -> torch.Tensor:
    """Basic3DPositionEmbeddingMixin's table [T*H*W, dim] (fp32): per token [temporal (dim/4) |
    spatial (3dim/4)], spatial = [1D(w coords) | 1D(h coords)] as SAT's meshgrid order gives."""
    t_size, gh, gw = grid
    h_i, w_i, t_i = interp

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(d // 2, dtype=np.float64)
        omega /= d / 2.0
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    d_sp, d_t = dim // 4 * 3, dim // 4
    grid_h = np.arange(gh, dtype=np.float32) / np.float32(h_i)
    grid_w = np.arange(gw, dtype=np.float32) / np.float32(w_i)
    mesh = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, gh, gw)
    spatial = np.concatenate([one_d(d_sp // 2, mesh[0]), one_d(d_sp // 2, mesh[1])], axis=1)  # [H*W, 3d/4]
    temporal = one_d(d_t, np.arange(t_size, dtype=np.float32) / np.float32(t_i))  # [T, d/4]
    table = np.concatenate([np.repeat(temporal[:, None, :], gh * gw, axis=1),
                            np.repeat(spatial[None, :, :], t_size, axis=0)], axis=-1)
    return torch.from_numpy(table).float().reshape(t_size * gh * gw, dim)


def rope_freqs_3d(head_dim: int, grid: tuple[int, int, int], theta: float, device=None) -> torch.Tensor:
    """Rotary3DPositionEmbeddingMixin's angles [T, H, W, head_dim] (fp32): [t | h | w] parts of
    head_dim//4, head_dim//8*3, head_dim//8*3, each frequency repeated for an interleaved pair."""
    parts = (head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3)
    angles = []
    for dim, n in zip(parts, grid):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device)[: dim // 2].float() / dim))
        pos = torch.arange(n, dtype=torch.float32, device=device)
        angles.append(torch.einsum("..., f -> ... f", pos, freqs).repeat_interleave(2, dim=-1))
    t, h, w = grid
    return torch.cat([angles[0][:, None, None, :].expand(t, h, w, -1),
                      angles[1][None, :, None, :].expand(t, h, w, -1),
                      angles[2][None, None, :, :].expand(t, h, w, -1)], dim=-1).contiguous()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """SAT's interleaved rotate_half: pairs (x0, x1) -> (-x1, x0)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def rope_video(z: torch.Tensor, split: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary3D's position_embedding_forward: rotate the tokens from `split` on (the video), leave
    the text tokens before it as they are. z: [b, heads, S, head_dim]."""
    video = z[:, :, split:]
    return torch.cat((z[:, :, :split], video * cos + rotate_half(video) * sin), dim=2)


def timestep_embedding(t: torch.Tensor, dim: int, dtype: torch.dtype, max_period: float = 10000.0) -> torch.Tensor:
    """sgm's timestep_embedding (repeat_only=False): [cos | sin] of t * exp(-ln(P) i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.to(dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
