"""`sat-dist sample`'s arguments checked against the model before anything is loaded.

At real size the load takes minutes (a 5B DiT and T5-XXL read on every TP rank), so a size the DiT
cannot run, a frame count the VAE cannot make, a missing image or an unwritable output folder must
fail in seconds, naming the option, the value and what to pass instead. `sample_run` decides from
the `Components` that `layout.components_for` resolves (model configs only: no process group, no
weight); `Engine.run` calls it too, so the Python API refuses the same way.

The rules, each something the engine would otherwise hit late or get silently wrong:
- frames: F - 1 a multiple of 8 (twice the VAE's temporal compression, 4): F frames are (F - 1) / 4 + 1
  latent frames, and the VAE decodes them back to exactly F only when that count is odd (other F came
  out rounded down, e.g. 10 as 9, or grown, e.g. 13 as 16); 49 and 81, the releases' counts, are valid;
- a CogVideoX 1.0 DiT runs only at its configured height x width (480x720 in the releases) and at
  most its configured frames: its position tables and unpatchify are fixed to them (models/cogvideox/
  model.py refuses anything else, but only at the first denoising step);
- a 1.5 DiT takes heights/widths that are multiples of the VAE's spatial compression x its patch
  (8 x 2 = 16), up to its RoPE table (`Rotary3D.tables`), and frames up to that table too;
- steps >= 1 (and for diffusers' schedulers <= num_train_timesteps, which `set_timesteps` refuses);
- the image: given exactly for I2V models, and a file PIL can open.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ..errors import ConfigError
from .adapters import short
from .layout import Components

FRAME_PAIR = 2  # diffusers' AutoencoderKLCogVideoX.num_latent_frames_batch_size: latents decode in pairs
V15_DEFAULT = (81, 768, 1360)  # CogVideoX1.5's frames, height, width (CogVideo inference/cli_demo.py)
# option key -> (the CLI's flag, the Python API's keyword), so each refusal names what the caller typed
_OPTS = {"frames": ("--frames", "num_frames"), "height": ("--height", "height"), "width": ("--width", "width"),
         "steps": ("--steps", "num_steps")}


def _opt(key: str, value: Any, cli: bool, default: bool = False) -> str:
    flag, kw = _OPTS[key]
    return (f"{flag} {value}" if cli else f"{kw}={value!r}") + (" (the model's default)" if default else "")


@dataclass
class SampleRun:
    """One `sample` as it will run: every size resolved from the arguments and the model, and checked."""

    components: Components
    layout: str  # "diffusers" | "sat"
    i2v: bool
    frames: int
    height: int
    width: int
    steps: int
    guidance: float
    dynamic_cfg: bool
    latent: tuple[int, int, int]  # latent frames (1.5: padded to the time patch), height, width
    tp: int
    sp: int = 1  # Ulysses sequence-parallel size (shown by --dry-run)
    image: Optional[str] = None  # the path, when given as one
    prompts: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)  # the mp4 per prompt
    loras: list = field(default_factory=list)  # each prompt's adapters ((path, strength), ...)

    def summary(self, weights: Optional[dict[str, tuple[int, Optional[int]]]] = None, dtype: Optional[str] = None,
                device: Optional[str] = None) -> str:
        """What `sample --dry-run` prints: the run resolved, nothing loaded. `weights`: component ->
        (elements, bytes) on the largest rank (engine/capacity.py `rank_weights`)."""
        p = self.components
        kind = "image-to-video" if self.i2v else "text-to-video"
        dit = p.models["transformer"].model.arch
        lines = ["dry run: every check passed, nothing loaded",
                 f"model        {p.root} ({p.layout} layout, CogVideoX {'1.0' if dit.v1 else '1.5'} {kind}, "
                 f"{p.fps} fps)"]
        for name, cfg in p.models.items():
            line = f"{name:<12} {cfg.checkpoint}"
            if weights and name in weights:
                n, b = weights[name]
                line += f"  [{n / 1e6:.2f} M params/rank" + (f", {_size(b)}/rank]" if b is not None else
                                                               ", stored dtype not known: pass --dtype]")
            lines.append(line)
        lines.append(f"{'tokenizer':<12} {p.tokenizer}")
        if weights and all(b is not None for _, b in weights.values()):
            lines.append(f"{'weights':<12} {_size(sum(b for _, b in weights.values()))} per rank (DiT and T5 at "
                         f"TP {self.tp}, the VAE whole; activations not counted: see sat-dist plan --engine)")
        lines += [f"{'parallel':<12} tp {self.tp}, sp {self.sp}, dtype {dtype or 'as stored'}, "
                  f"device {device or 'auto'}",
                  f"{'video':<12} {self.frames} frames x {self.height} x {self.width} (DiT latents "
                  f"{self.latent[0]} x {self.latent[1]} x {self.latent[2]})" +
                  (f", first frame {self.image}" if self.image else ""),
                  f"{'sampler':<12} {p.scheduler.get('_class_name')}, {self.steps} steps, guidance "
                  f"{self.guidance:g}, dynamic CFG {'on' if self.dynamic_cfg else 'off'}"]
        shown = list(zip(self.prompts, self.outputs, self.loras or [()] * len(self.prompts)))
        for prompt, out, loras in shown[:10]:
            with_ = f"  [LoRA {short(loras)}]" if loras else ""
            lines.append(f"{'output':<12} {out} <- {prompt!r}{with_}")
        if len(shown) > 10:
            lines.append(f"{'':<12} ... and {len(shown) - 10} more")
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.2f} MiB"


def default_size(parts: Components) -> tuple[int, int, int]:
    """(frames, height, width): the SAT YAML's args.sampling_num_frames / sampling_image_size when set;
    else the 1.0 DiT's configured size, or CogVideoX1.5's recommended one (CogVideo inference/cli_demo.py)."""
    dcfg, s = parts.models["transformer"].model, parts.models["vae"].model.spatial_scale
    a = dcfg.arch
    f, h, w = (dcfg.num_frames, a.grid[1] * a.patch[1] * s, a.grid[2] * a.patch[2] * s) if a.v1 else V15_DEFAULT
    return parts.extra.get("num_frames", f), *parts.extra.get("size", (h, w))


def _around(value: int, step: int, lo: int, hi: int) -> list[int]:
    """The valid values lo, lo + step, ... <= hi next to `value`: the one below it and the one above."""
    if value < lo:
        near = [lo, lo + step]
    else:
        below = value - (value - lo) % step
        near = [below] if below == value else [below, below + step]
    return [n for n in near if n <= hi] or [hi]


def _either(values: Sequence[int]) -> str:
    return " or ".join(str(v) for v in values)


def sample_run(parts: Components, *, image: Any = None, num_frames: Optional[int] = None,
               height: Optional[int] = None, width: Optional[int] = None, num_steps: int = 50,
               guidance_scale: Optional[float] = None, use_dynamic_cfg: Optional[bool] = None,
               cli: bool = False) -> SampleRun:
    """Resolve and check one sample's arguments against the model (see module docstring); raises
    ConfigError naming the option (`cli`: as `sat-dist sample` spells it, else `Engine.run`'s keyword)."""
    if parts.i2v and image is None:
        how = "--image FILE (the first frame, png/jpg)" if cli else "image= (a path, PIL image or tensor)"
        raise ConfigError(f"this is an image-to-video model: pass {how}")
    if image is not None and not parts.i2v:
        raise ConfigError(f"{'--image' if cli else 'image='} given, but this is a text-to-video model (its DiT takes "
                          f"no first-frame latents); leave it out or pass an image-to-video pipeline")
    if isinstance(image, str):
        check_image(image, cli)
    if num_steps < 1:
        raise ConfigError(f"{_opt('steps', num_steps, cli)}: must be >= 1")
    if parts.layout == "diffusers":
        most = int(parts.scheduler.get("num_train_timesteps", 1000))
        if num_steps > most:
            raise ConfigError(f"{_opt('steps', num_steps, cli)}: {parts.scheduler.get('_class_name')} runs at most "
                              f"num_train_timesteps={most} steps; use {most} or fewer")
    f0, h0, w0 = default_size(parts)
    frames = f0 if num_frames is None else int(num_frames)
    size = (h0 if height is None else int(height), w0 if width is None else int(width))
    arch, vae = parts.models["transformer"].model.arch, parts.models["vae"].model
    t, s = int(vae.temporal_compression_ratio), vae.spatial_scale
    pt = 1 if arch.v1 else arch.patch[0]
    _check_frames(_opt("frames", frames, cli, num_frames is None), frames, t, arch.grid[0] * pt,
                  "position tables" if arch.v1 else "RoPE table")
    opts = (_opt("height", size[0], cli, height is None), _opt("width", size[1], cli, width is None))
    _check_size(arch, s, size, opts, cli)
    height, width = size
    lat = (frames - 1) // t + 1
    lat += -lat % pt  # 1.5: padded up to the time patch (dropped before decoding)
    sat = parts.layout == "sat"
    if guidance_scale is None:
        guidance_scale = float(parts.scheduler["scale"]) if sat else 6.0
    if use_dynamic_cfg is None:
        use_dynamic_cfg = (parts.scheduler["guider"] == "DynamicCFG" if sat
                           else parts.scheduler.get("_class_name") == "CogVideoXDPMScheduler")
    return SampleRun(parts, parts.layout, parts.i2v, frames, height, width, int(num_steps), float(guidance_scale),
                     bool(use_dynamic_cfg), (lat, height // s, width // s), parts.models["transformer"].tp,
                     image=image if isinstance(image, str) else None)


def _check_frames(opt: str, frames: int, t: int, most_latent: int, table: str) -> None:
    """F frames are (F - 1) / t + 1 latent frames; the VAE decodes them back to exactly F only when that
    count is odd (diffusers' AutoencoderKLCogVideoX decodes the latents in pairs after a first odd
    group: an even count T comes back as t x T frames, e.g. --frames 13 as 16), so F - 1 must be a
    multiple of 2 x t (49 and 81, the releases' counts, are); and at most the DiT's table allows
    (`most_latent` latent frames: 1.0's position tables; 1.5's RoPE table times its time patch)."""
    step = FRAME_PAIR * t
    most = (most_latent - 1 - (most_latent - 1) % FRAME_PAIR) * t + 1
    if frames > most:
        raise ConfigError(f"{opt}: this model runs at most {most} frames (the DiT config's num_frames sizes its "
                          f"{table} to {most_latent} latent frames; a valid count decodes from an odd number of "
                          f"them, here {(most - 1) // t + 1}); use {most} or fewer")
    if frames < 1 or (frames - 1) % step:
        raise ConfigError(f"{opt}: F - 1 must be a multiple of {step} (1, {1 + step}, {1 + 2 * step}, ...): the VAE "
                          f"compresses time {t}x and decodes (F - 1) / {t} + 1 latent frames back to exactly F only "
                          f"when that count is odd; use {_either(_around(frames, step, 1, most))}")


def _check_size(arch: Any, s: int, size: tuple[int, int], opts: tuple[str, str], cli: bool) -> None:
    """1.0: exactly the configured height x width; 1.5: multiples of the VAE's spatial compression `s` x
    the patch, up to the RoPE table."""
    if arch.v1:
        want = (arch.grid[1] * arch.patch[1] * s, arch.grid[2] * arch.patch[2] * s)
        if size != want:
            fix = (f"leave --height/--width out or pass --height {want[0]} --width {want[1]}" if cli else
                   f"leave height/width out or pass height={want[0]}, width={want[1]}")
            raise ConfigError(f"{opts[0]} {opts[1]}: a CogVideoX 1.0 model runs only at its configured size "
                              f"{want[0]}x{want[1]} (its position tables and unpatchify are fixed to it); {fix}")
        return
    for opt, value, patch, cells in zip(opts, size, arch.patch[1:], arch.grid[1:]):
        step, most = s * patch, s * patch * cells
        if value > most:
            raise ConfigError(f"{opt}: this model runs at most {most} ({cells} patches: its RoPE table, from the DiT "
                              f"config's sample size); use {most} or less")
        if value < step or value % step:
            raise ConfigError(f"{opt}: must be a multiple of {step} (the VAE's {s}x spatial compression x the DiT's "
                              f"patch {patch}); use {_either(_around(value, step, step, most))}")


def check_tp(parts: Components) -> None:
    """The DiT's and T5's TP split, named by the option (the loader checks it too, but only once the
    process group is up)."""
    for name in ("transformer", "text_encoder"):
        cfg = parts.models[name]
        try:
            cfg.model.check_tp(cfg.tp)
        except ConfigError as exc:
            raise ConfigError(f"--tp {cfg.tp}: {name}: {exc}") from exc


def check_image(path: str, cli: bool = True) -> None:
    """The first frame must be a file PIL can open (its header only: cheap)."""
    what = "--image" if cli else "image="
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path}: no such file (pass the first frame, png/jpg)")
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.size  # noqa: B018  the header is read: the format is known
    except OSError as exc:  # PIL's UnidentifiedImageError is one
        raise ConfigError(f"{what} {path}: not an image PIL can read ({exc})") from exc


def read_prompts(prompt: Optional[str], prompts_file: Optional[str]) -> list[str]:
    """`--prompt` alone, or `--prompts FILE`'s non-blank lines."""
    if prompt is not None:
        return [prompt]
    try:
        with open(prompts_file) as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--prompts {prompts_file}: cannot read it ({exc})") from exc
    prompts = [line for line in lines if line]
    if not prompts:
        raise ConfigError(f"--prompts {prompts_file} holds no prompt")
    return prompts


def video_name(i: int, prompt: str) -> str:
    """`--prompts`' mp4 names: NNN_<first six words>.mp4."""
    words = "_".join(re.findall(r"[A-Za-z0-9]+", prompt)[:6]).lower() or "video"
    return f"{i:03d}_{words}.mp4"


def check_writable(folder: str, what: str, create: bool = True) -> None:
    """Write (and remove) a temporary file in `folder`, made first when missing (`create`); without
    `create` (a dry run) the nearest existing folder above it is tried instead, and nothing is left."""
    folder = os.path.abspath(folder or ".")
    probe = folder
    if create:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{what}: cannot create the folder {folder} ({exc}); pick a writable place") from exc
    else:
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"{what}: {probe} is not a folder; pick a writable place")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".sat-dist-write-check-")
        os.close(fd)
        os.remove(tmp)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot write in {probe} ({exc}); pick a writable place") from exc


def check_outputs(outputs: Sequence[str], out_dir: Optional[str], create: bool = True) -> None:
    """Every output folder writable before the load: `--out`'s parent folder, or `--out-dir`."""
    if out_dir is not None:
        check_writable(out_dir, f"--out-dir {out_dir}", create)
        return
    for out in outputs:
        if os.path.isdir(out):
            raise ConfigError(f"--out {out}: is a folder; give the mp4's file name "
                              f"(e.g. {os.path.join(out, 'output.mp4')})")
        check_writable(os.path.dirname(os.path.abspath(out)), f"--out {out}", create)


def check_sp(parts: Components, sp: int, world: Optional[int] = None, cfg_parallel: bool = False) -> None:
    """`--sp` (sequence parallel, Ulysses): it splits each TP rank's DiT heads, so it must divide
    num_attention_heads / tp; and the world must hold whole replicas of tp x sp ranks (`world`: the
    launcher's, when known). Before anything is loaded, naming the sizes that work."""
    from ..runtime import Mesh

    cfg = parts.models["transformer"]
    try:
        cfg.model.check_sp(cfg.tp, sp)
    except ConfigError as exc:
        raise ConfigError(f"--sp {sp}: transformer: {exc}") from exc
    if world is not None:
        Mesh.for_job(world, cfg.tp, sp, cfg_parallel)  # a ConfigError naming --tp/--sp sizes that fit
