"""CogVideoX's SAT DiT (THUDM/CogVideo sat/dit_video_concat.py `DiffusionTransformer`),
tensor-parallel, built on the meta device.

State-dict keys, shapes and persistent buffers are SAT's for every released variant: v1.0 (2B / 5B
/ 5B-I2V: Conv2d patch embedding, Rotary3D `freqs_sin`/`freqs_cos` persistent buffers) and 1.5
(Linear patch embedding, rotary tables that are plain attributes, so not in the state dict;
computed lazily here).

Some tensors are in SAT's state dict but not in the files that were released (SAT's
`force_inference` tolerates it: CogVideo#100, #586): the 2B sincos `pos_embedding`, the unused
`transformer.position_embeddings` of the rotary models, and the v1.0 rotary tables. Their specs are
TensorSpecs with `if_absent`: the reader drops them from the plan when the file lacks them and this
module fills them on `load_state_dict` with what SAT's constructor would have put there.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..layers import TPInfo
from .config import DiTConfig
from .modules import (AdaLN, Basic3DPositionEmbedding, DiTTransformer, FinalLayer, ImagePatchEmbedding,
                      Rotary3DPositionEmbedding, SwiGLU, time_mlp)
from .sequence import SeqShard, SPInfo, split_rows
from .tables import timestep_embedding

CHECKPOINT_PREFIX = "model.diffusion_model."  # the DiT's keys inside a CogVideo SAT checkpoint


class CogVideoXDiT(nn.Module):
    """SAT `DiffusionTransformer`: `forward(x, timesteps, context, ofs=..., concat_images=...)`
    returns the predicted latents [B, T, out_channels, H, W], TP collectives inside.

    Sequence parallel (`set_sequence_parallel`, Ulysses; models/cogvideox/sequence.py): `x`,
    `concat_images` and the output hold this rank's latent rows `latent_rows(height)[sp.rank]` of
    a latent `height` rows high; the text (`context`) is whole on every rank."""

    checkpoint_prefix = CHECKPOINT_PREFIX

    def __init__(self, cfg: DiTConfig, tp: TPInfo, dtype: torch.dtype = torch.float32):
        super().__init__()
        a = cfg.arch
        self.arch, self.tp = a, tp
        # Registration order = SAT's: BaseModel's mixins and transformer, then time/ofs embeddings.
        self.mixins = nn.ModuleDict()
        self.transformer = DiTTransformer(a, tp, dtype)
        self.time_embed = time_mlp(tp, a.hidden, a.time_dim, dtype, split=a.adaln_split)
        if a.ofs_dim is not None:
            self.ofs_embed = time_mlp(tp, a.ofs_dim, a.ofs_dim, dtype, split=False)
        pos_cls = Basic3DPositionEmbedding if a.pos == "basic3d" else Rotary3DPositionEmbedding
        self.mixins["pos_embed"] = pos_cls(a, dtype)
        self.mixins["patch_embed"] = ImagePatchEmbedding(a, dtype, tp)
        self.mixins["adaln_layer"] = AdaLN(a, dtype, tp)
        self.mixins["final_layer"] = FinalLayer(a, dtype, tp)
        if a.swiglu:
            self.mixins["swiglu"] = SwiGLU(a, tp, dtype)
        self.sp = SPInfo()
        self.requires_grad_(False)
        self.register_load_state_dict_pre_hook(_fill_absent)

    def set_sequence_parallel(self, size: int, rank: int = 0, group=None) -> None:
        """Split the video tokens of every forward over an SP group of `size` ranks (this one is `rank`),
        all holding the same TP shard; `size` must divide this TP rank's heads."""
        heads = self.arch.heads // self.tp.size
        if size < 1 or heads % size:
            raise ValueError(f"sequence parallel size {size} does not divide the {heads} attention heads of a "
                             f"TP rank ({self.arch.heads} heads / TP {self.tp.size})")
        self.sp = SPInfo(size, rank, group)

    def latent_rows(self, height: int) -> list[tuple[int, int]]:
        """[start, stop) latent rows of each SP rank for a latent `height` rows high (whole token rows:
        multiples of the patch height, split as sequence.split_rows does)."""
        ph = self.arch.patch[1]
        return [(a * ph, b * ph) for a, b in split_rows(height // ph, self.sp.size)]

    @property
    def dtype(self) -> torch.dtype:
        return self.mixins["patch_embed"].text_proj.weight.dtype

    def absent_ok_defaults(self) -> dict[str, Callable[[], torch.Tensor]]:
        """name -> what SAT's constructor puts there, for tensors released files may lack."""
        out: dict[str, Callable[[], torch.Tensor]] = {
            f"mixins.pos_embed.{k}": fn for k, fn in self.mixins["pos_embed"].defaults().items()}
        if hasattr(self.transformer, "position_embeddings"):
            a = self.arch
            out["transformer.position_embeddings.weight"] = lambda: torch.zeros(a.max_seq, a.hidden)
        return out

    # -- forward -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y=None,
                concat_images: Optional[torch.Tensor] = None, ofs: Optional[torch.Tensor] = None,
                height: Optional[int] = None, **_unused) -> torch.Tensor:
        """`height`: with sequence parallel, the whole latent's height (`x` holds this rank's rows of it;
        default: the 1.0 DiT's configured height; the 1.5 DiT needs it)."""
        a, dtype = self.arch, self.dtype
        if y is not None:
            raise ValueError("y (class conditioning) is not used by CogVideoX (num_classes is None)")
        x = x.to(dtype)
        if concat_images is not None:  # I2V: the encoded first frame, concatenated on channels
            if concat_images.shape[0] != x.shape[0]:
                concat_images = concat_images.repeat(2, 1, 1, 1, 1)
            x = torch.cat([x, concat_images.to(dtype)], dim=2)
        b, t, c, h, w = x.shape
        if c != a.in_channels:
            raise ValueError(f"latents have {c} channels (after concat_images) but the DiT takes in_channels="
                             f"{a.in_channels}; I2V models need concat_images")
        pt, ph, pw = a.patch
        local_h = h
        if self.sp.size > 1:  # x holds this rank's rows of a latent `height` rows high
            if height is None:
                if not a.v1:
                    raise ValueError("sequence parallel: pass height= (the whole latent's height; x holds this "
                                     "rank's rows of it)")
                height = a.grid[1] * ph
            h = height
        if t % pt or h % ph or w % pw:
            raise ValueError(f"latent (T, H, W)=({t}, {h}, {w}) is not divisible by patch_size {a.patch}")
        thw = (t // pt, h // ph, w // pw)
        seq = None
        if self.sp.size > 1:
            seq = SeqShard.of(self.sp, thw)
            start, stop = seq.rows[self.sp.rank]
            if local_h != (stop - start) * ph:
                raise ValueError(f"sequence parallel rank {self.sp.rank} of {self.sp.size}: x has {local_h} latent "
                                 f"rows; its share of a latent {h} rows high is rows {start * ph}:{stop * ph}")
        if a.v1 and (thw[1:] != a.grid[1:] or thw[0] > a.grid[0]):
            raise ValueError(f"the CogVideoX 1.0 DiT runs only at its configured latent size "
                             f"{a.grid[1] * ph}x{a.grid[2] * pw} with at most {a.grid[0]} latent frames (got "
                             f"{t} frames of {h}x{w}): its unpatchify, RoPE and position tables are fixed to it")
        seq_length = thw[0] * thw[1] * thw[2]
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(b)
        emb = self.time_embed(timestep_embedding(timesteps, a.hidden, dtype))
        if a.ofs_dim is not None:
            if ofs is None:
                raise ValueError("this DiT has ofs_embed (CogVideoX1.5 I2V): pass ofs (e.g. torch.full((B,), 2.0))")
            ofs = torch.as_tensor(ofs, device=x.device)
            emb = emb + self.ofs_embed(timestep_embedding(ofs.expand(b) if ofs.dim() == 0 else ofs, a.ofs_dim, dtype))
        context = context.to(dtype)
        text_length = context.shape[1]

        local_thw = thw if seq is None else seq.local_thw
        hidden = self.mixins["patch_embed"](x, context, local_thw)
        pos = self.mixins["pos_embed"].position(t, seq_length, text_length)
        if pos is not None:
            if seq is not None:  # the text's rows, then this rank's tokens' rows
                pos = torch.cat((pos[:, :text_length], seq.take(pos[:, text_length:], 1)), dim=1)
            hidden = hidden + pos
        rope = None
        if a.pos == "rotary3d":
            # v1.0 splits text/video at the configured text_length, 1.5 at the context's length.
            split = a.text_length if a.v1 else text_length
            if a.v1 and text_length != a.text_length:
                raise ValueError(f"context has {text_length} tokens but the CogVideoX 1.0 rotary mixin splits at "
                                 f"text_length={a.text_length}; pad the T5 embeddings to {a.text_length}")
            cos, sin = self.mixins["pos_embed"].tables(thw, x.device, dtype)
            if seq is not None:
                cos, sin = seq.take(cos, 2), seq.take(sin, 2)
            rope = (split, cos, sin)
        hidden = self.transformer(hidden, text_length, emb, self.mixins["adaln_layer"],
                                  self.mixins["swiglu"] if a.swiglu else None, rope, seq)
        return self._final(hidden, emb, text_length, local_thw)

    def _final(self, hidden: torch.Tensor, emb: torch.Tensor, text_length: int,
               thw: tuple[int, int, int]) -> torch.Tensor:
        """FinalLayerMixin.final_forward: the video tokens (after the text) through the final layer."""
        return self.mixins["final_layer"](hidden[:, text_length:], emb, thw)


def _fill_absent(module: CogVideoXDiT, state_dict: dict, prefix: str, *_args) -> None:
    """load_state_dict pre-hook: put SAT's constructor values where the file had no tensor
    (the reader dropped it from the plan), in the dtype and on the device of the loaded weights."""
    ref = state_dict.get(prefix + "mixins.patch_embed.text_proj.weight")
    for name, make in module.absent_ok_defaults().items():
        if prefix + name not in state_dict:
            value = make()
            if ref is not None and not ref.is_meta:
                value = value.to(device=ref.device, dtype=ref.dtype)
            state_dict[prefix + name] = value


def build_cogvideox(cfg: DiTConfig, tp: TPInfo) -> CogVideoXDiT:
    """The family's builder (called under the meta device by models.build_meta_model)."""
    return CogVideoXDiT(cfg, tp)
