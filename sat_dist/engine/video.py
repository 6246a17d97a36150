"""The VAE's side of a sample — the I2V first frame in, the decoded frames out — and the mp4 writer.

As huggingface/diffusers src/diffusers/pipelines/cogvideo/pipeline_cogvideox_image2video.py
(`prepare_latents`) and pipeline_cogvideox.py (`decode_latents`, `VideoProcessor.postprocess_video`);
the mp4 is written as diffusers' `export_to_video` does with imageio-ffmpeg (`fps` frames per second,
uint8 frames). The VAE decodes with diffusers' tiling and slicing on (`enable_tiling`,
`enable_slicing`), so decode memory is bounded by a tile, not by the video size; given its work group,
every rank decodes a share of the tiles and the leader blends them (engine/decode.py).
"""
from __future__ import annotations

import contextlib
import os
import struct
import uuid
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from . import decode as tile_decode
from .decode import WorkGroup


def processor(vae: nn.Module):
    from diffusers.video_processor import VideoProcessor

    return VideoProcessor(vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1))


def tiles_exact(vae: nn.Module) -> bool:
    """Whether diffusers' tiled encode/decode keeps the video's size with the VAE's tile settings: a
    tile's step must equal the rows it keeps (`tiled_decode`: overlap * scale == tile - blend; and the
    same for `tiled_encode`). True for the releases' defaults (240x360 px tiles, overlaps 1/6, 1/5)."""
    s = 2 ** (len(vae.config.block_out_channels) - 1)
    for ts, tl, o in ((vae.tile_sample_min_height, vae.tile_latent_min_height, vae.tile_overlap_factor_height),
                      (vae.tile_sample_min_width, vae.tile_latent_min_width, vae.tile_overlap_factor_width)):
        if int(tl * (1 - o)) * s != ts - int(ts * o) or int(ts * (1 - o)) != (tl - int(tl * o)) * s:
            return False
    return True


def enable_bounded_decode(vae: nn.Module, tiling: Optional[dict] = None) -> bool:
    """Sliced decode, and tiled unless the tiles would not keep the size (tiny test VAEs with diffusers'
    default tiles): `tiling` passes enable_tiling's tile sizes/overlaps (default: diffusers'), refused
    when they would change the size. Returns whether tiling is on."""
    vae.enable_slicing()
    vae.enable_tiling(**(tiling or {}))
    if tiles_exact(vae):
        return True
    if tiling:
        raise ConfigError(f"vae tiling {tiling}: with these tiles diffusers' tiled decode changes the video size "
                          f"(a tile's step must equal the rows it keeps)")
    vae.disable_tiling()
    return False


def image_latents(vae: nn.Module, image: Any, height: int, width: int, latent_frames: int, patch_t: Optional[int],
                  generator: torch.Generator, device, dtype, scale: Optional[float] = None) -> torch.Tensor:
    """I2V: the first frame encoded (a sample of the VAE posterior, drawn from `generator`), scaled, then
    zero latent frames after it; for 1.5 (time patch) the first frames repeated to fill the patch.
    `scale` None: diffusers' (scaling_factor, or its inverse with `invert_scale_latents`); CogVideo's
    SAT sample_video.py passes the unscaled latents (scale 1).

    The pixels are encoded in the VAE's own dtype, then the latents cast to `dtype` (the sampler's):
    the VAE's dtype can differ from `dtype` (SAT layout: an fp32 sampler with a bf16 VAE; diffusers
    layout: `dtype` is the text encoder's), and conv3d refuses fp32 input to bf16 weights."""
    if isinstance(image, str):
        if not os.path.isfile(image):
            raise ConfigError(f"--image {image} does not exist")
        from PIL import Image

        image = Image.open(image).convert("RGB")
    # diffusers' ModelMixin.dtype (src/diffusers/models/modeling_utils.py): its parameters' dtype. Its
    # DiagonalGaussianDistribution.sample (src/diffusers/models/autoencoders/vae.py) draws the noise in that dtype.
    pixels = processor(vae).preprocess(image, height=height, width=width).to(device, dtype=vae.dtype)
    with torch.no_grad():
        enc = [vae.encode(img.unsqueeze(0)).latent_dist.sample(generator) for img in pixels.unsqueeze(2)]
    lat = torch.cat(enc).to(dtype).permute(0, 2, 1, 3, 4)  # [B, F, C, H, W]
    if scale is None:
        sf = vae.config.scaling_factor
        lat = lat / sf if vae.config.invert_scale_latents else lat * sf
    elif scale != 1.0:
        lat = lat * scale
    pad = torch.zeros((lat.shape[0], latent_frames - 1, *lat.shape[2:]), device=device, dtype=dtype)
    lat = torch.cat([lat, pad], dim=1)
    if patch_t is not None:
        lat = torch.cat([lat[:, : lat.shape[1] % patch_t], lat], dim=1)
    return lat


def decode(vae: nn.Module, latents: torch.Tensor, group: Optional[WorkGroup] = None) -> Optional[np.ndarray]:
    """[B, T, C, H, W] latents -> [B, F, H, W, 3] float frames in [0, 1] (the pipelines' output_type="np").

    `group` (every rank of a work group calls it, with the same latents): the group decodes diffusers'
    tiles together and its leader gets the frames, None elsewhere (engine/decode.py); when the decode
    would not be tiled (tiling off, one tile, several videos) or the group is one rank, the leader
    decodes alone as without a group."""
    z = (latents.permute(0, 2, 1, 3, 4) / vae.config.scaling_factor).to(vae.dtype)
    with torch.no_grad():
        if tile_decode.splits(vae, z, group):
            video = tile_decode.tiled_decode(vae, z, group)
        elif group is None or group.leader:
            video = vae.decode(z).sample
        else:
            video = None
    return None if video is None else processor(vae).postprocess_video(video=video, output_type="np")


def write_mp4(frames: np.ndarray, path: str, fps: int) -> str:
    """[F, H, W, 3] frames in [0, 1] -> an H.264 mp4 at `fps` (imageio-ffmpeg ships its ffmpeg binary).

    Written to a temporary name in the same folder, then renamed onto `path`, so `path` is a whole mp4
    or untouched. imageio does not report an ffmpeg that failed to open or finish its output (it
    prints ffmpeg's error and returns), so the file is checked to be complete before the rename; any
    failure is a ConfigError naming `path`, and the temporary file is removed."""
    try:
        import imageio
    except ImportError as exc:
        raise ConfigError("writing mp4 needs imageio and imageio-ffmpeg (pip install imageio imageio-ffmpeg)") from exc
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}.mp4")
    data = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    try:
        os.makedirs(folder, exist_ok=True)
        with imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", quality=8,
                                macro_block_size=1) as writer:
            for frame in data:
                writer.append_data(frame)
        _check_mp4(tmp)
        os.replace(tmp, path)
    except (OSError, ConfigError) as exc:  # imageio's IOError from a broken ffmpeg pipe is an OSError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise ConfigError(f"could not write {path}: {exc}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path


def _check_mp4(path: str) -> None:
    """The file is an mp4 ffmpeg finished: its top-level boxes tile the file exactly and hold `ftyp`,
    `mdat` and `moov` (the index ffmpeg writes last, when it closes the file)."""
    if not os.path.isfile(path):
        raise ConfigError("ffmpeg wrote no file (its error is above)")
    size, pos, seen = os.path.getsize(path), 0, set()
    with open(path, "rb") as f:
        while pos < size:
            f.seek(pos)
            head = f.read(16)
            if len(head) < 8:
                break
            n, kind = struct.unpack(">I4s", head[:8])
            if n == 1 and len(head) == 16:
                n = struct.unpack(">Q", head[8:16])[0]
            elif n == 0:
                n = size - pos
            if n < 8:
                break
            seen.add(kind)
            pos += n
    if pos != size or not {b"ftyp", b"mdat", b"moov"} <= seen:
        raise ConfigError(f"ffmpeg left an incomplete mp4 ({size} bytes; its error is above)")
