"""`sat-dist plan`: per-rank parameter bytes and a device-memory estimate at each TP size, from the
config alone (meta device: nothing allocated, no checkpoint read), so GPUs can be sized first.

Bytes are exact (every state-dict tensor's local shape under SAT's split rules, in the chosen
dtype); the activation part is a labelled estimate from the model config when it offers one.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch

from .config import resolve
from .errors import ConfigError
from .models import TPInfo, build_meta_model, collect_specs, family_for
from .models.family import Latent

GIB = 1 << 30


@dataclass
class TPRow:
    """One TP size: whether it is valid, and per-rank bytes (the largest rank's, where they differ)."""

    tp: int
    valid: bool
    reason: Optional[str] = None
    param_bytes: int = 0  # weights + persistent buffers on one rank
    split_bytes: int = 0  # of which TP-sharded
    replicated_bytes: int = 0  # of which identical on every rank
    activation_bytes: Optional[int] = None
    device_bytes: Optional[int] = None  # param_bytes + activation_bytes


@dataclass
class CapacityPlan:
    model_class: str
    dtype: str
    total_params: int
    total_bytes: int
    activation_note: Optional[str]
    rows: list[TPRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        lines = [f"{self.model_class}: {self.total_params / 1e9:.3f} B parameters, {self.total_bytes / GIB:.2f} GiB "
                 f"in {self.dtype} (weights + persistent buffers, whole model)"]
        if self.activation_note:
            lines.append(f"activations: {self.activation_note}")
        lines.append(f"{'TP':>3}  {'params/rank':>12}  {'sharded':>10}  {'replicated':>10}  {'est. device/rank':>16}")
        for r in self.rows:
            if not r.valid:
                lines.append(f"{r.tp:>3}  invalid: {r.reason}")
                continue
            dev = "n/a" if r.device_bytes is None else f"{r.device_bytes / GIB:.2f} GiB"
            lines.append(f"{r.tp:>3}  {r.param_bytes / GIB:>8.2f} GiB  {r.split_bytes / GIB:>6.2f} GiB  "
                         f"{r.replicated_bytes / GIB:>6.2f} GiB  {dev:>16}")
        lines.append("est. device = weights + activation estimate; excludes the CUDA context, allocator slack, "
                     "and models outside this one (e.g. T5, VAE)")
        return "\n".join(lines)


def capacity_plan(config_files: Sequence[str], tps: Sequence[int], dtype: Optional[str] = None,
                  overrides: Sequence[str] = (), batch: int = 2, latent: Optional[Latent] = None,
                  checkpoint: Optional[str] = None) -> CapacityPlan:
    """Plan every TP size in `tps` for the model the configs — or the checkpoint (any format a reader
    recognises; its config and headers, no tensor data) — describe (see module docstring).

    The dtype is `dtype`, else the config's (CogVideo's args.bf16/fp16), else the checkpoint's stored
    dtype, else fp32."""
    if batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {batch}")
    if latent is not None and (len(latent) != 3 or min(latent) < 1):
        raise ConfigError(f"--latent takes three positive sizes T H W, got {list(latent)}")
    if checkpoint and os.path.isfile(os.path.join(checkpoint, "model_index.json")):
        raise ConfigError(f"{checkpoint} is a CogVideoX pipeline folder: pass --engine for the whole engine, or "
                          f"one component's folder ({os.path.join(checkpoint, 'transformer')})")
    cfg = resolve(checkpoint, list(config_files), list(overrides), dtype=dtype)
    return plan_model(cfg.model, tps, cfg.torch_dtype or stored_dtype(checkpoint) or torch.float32, batch, latent)


def stored_dtype(checkpoint: Optional[str]) -> Optional[torch.dtype]:
    """The one dtype a checkpoint's headers give its tensors (None: no checkpoint, or mixed)."""
    if not checkpoint:
        return None
    from . import formats

    names = {str(d).removeprefix("torch.").lower() for d in formats.describe(checkpoint).get("dtypes") or []}
    found = {_DTYPES.get(n) for n in names}
    return found.pop() if len(found) == 1 and None not in found else None


_DTYPES = {"f32": torch.float32, "float32": torch.float32, "f16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def plan_model(model_cfg, tps: Sequence[int], dt: torch.dtype, batch: int = 2,
               latent: Optional[Latent] = None) -> CapacityPlan:
    """`capacity_plan` for one model config (also each component of `plan --engine`)."""
    name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dt]
    itemsize = dt.itemsize
    model = build_meta_model(model_cfg, TPInfo(1, 0, None))  # meta: shapes only, nothing allocated
    specs = collect_specs(model)
    total_params = sum(math.prod(s.global_shape) for s in specs.values())
    plan = CapacityPlan(model_cfg.model_class, name, total_params, total_params * itemsize, None)
    activation = family_for(model_cfg.model_class).activation
    if latent is not None and activation is None:
        raise ConfigError(f"--latent applies to the CogVideoX DiT only, not {model_cfg.model_class}")
    if activation is not None and latent is None:
        unsized = activation(model_cfg, 1, itemsize, batch, None)
        if unsized.bytes is None:  # the config alone cannot say: the note says what to pass, valid TP or not
            plan.activation_note = unsized.note
    for tp in tps:
        try:
            model_cfg.check_tp(tp)
        except ConfigError as exc:
            plan.rows.append(TPRow(tp, False, str(exc)))
            continue
        best: Optional[TPRow] = None
        for rank in range(tp):  # SAT's splits are even, but do not assume it
            split = rep = 0
            for spec in specs.values():
                n = math.prod(spec.placement(tp, rank).local_shape(spec.global_shape)) * itemsize
                if spec.layout.replicated:
                    rep += n
                else:
                    split += n
            if best is None or split + rep > best.param_bytes:
                best = TPRow(tp, True, None, split + rep, split, rep)
        est = None if activation is None else activation(model_cfg, tp, itemsize, batch, latent)
        if est is not None and est.bytes is not None:
            best.activation_bytes, plan.activation_note = est.bytes, est.note
            best.device_bytes = best.param_bytes + best.activation_bytes
        plan.rows.append(best)
    del model
    return plan



# --- `plan --engine`: the whole CogVideoX engine (DiT + T5 at TP, VAE replicated) -------------------

PUBLISHED = "CogVideo's single-GPU SAT inference (published): 2B fp16 18 GB, 5B bf16 26 GB, 1.5-5B bf16 76 GB"


@dataclass
class EnginePlan:
    """Per TP size: each component's per-rank weights, the phases' activation estimates (encode, denoise,
    decode run one after another, so the peak is the largest), and their sum per rank."""

    dtype: str
    components: dict  # name -> CapacityPlan
    rows: list = field(default_factory=list)  # dicts: tp, valid, reason, weights, activations, device_bytes

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "components": {n: p.to_dict() for n, p in self.components.items()},
                "rows": self.rows, "published": PUBLISHED}

    def table(self) -> str:
        parts = ", ".join(f"{n} {p.total_params / 1e9:.2f} B" for n, p in self.components.items())
        lines = [f"CogVideoX engine in {self.dtype}: {parts} parameters",
                 f"{'TP':>3}  {'DiT/rank':>9}  {'T5/rank':>8}  {'VAE/rank':>8}  {'weights':>8}  "
                 f"{'act encode|denoise|decode':>25}  {'est. device/rank':>16}"]
        for r in self.rows:
            if not r["valid"]:
                lines.append(f"{r['tp']:>3}  invalid: {r['reason']}")
                continue
            w, a = r["weights"], r["activations"]
            acts = "|".join("n/a" if a[k] is None else f"{a[k] / GIB:.2f}" for k in ("encode", "denoise", "decode"))
            dev = "n/a" if r["device_bytes"] is None else f"{r['device_bytes'] / GIB:.2f} GiB"
            lines.append(f"{r['tp']:>3}  {w['transformer'] / GIB:>5.2f} GiB  {w['text_encoder'] / GIB:>4.2f} GiB  "
                         f"{w['vae'] / GIB:>4.2f} GiB  {sum(w.values()) / GIB:>4.2f} GiB  {acts + ' GiB':>25}  {dev:>16}")
        notes = {n: p.activation_note for n, p in self.components.items() if p.activation_note}
        lines += [f"{n}: {note}" for n, note in notes.items()]
        lines.append("est. device = all weights + the largest phase's activations; excludes the CUDA context and "
                     "allocator slack. " + PUBLISHED)
        return "\n".join(lines)


def engine_plan(config_files: Sequence[str], tps: Sequence[int], dtype: Optional[str] = None,
                overrides: Sequence[str] = (), batch: int = 2, latent: Optional[Latent] = None,
                checkpoint: Optional[str] = None) -> EnginePlan:
    """`sat-dist plan --engine`: per-rank weights and activations of DiT, T5 and VAE at each TP size,
    from CogVideo's SAT YAMLs (engine/capacity.py says where each component's config comes from) or
    from a diffusers pipeline folder `checkpoint` (its components' configs and headers)."""
    from .engine.capacity import engine_configs, sample_latent, t5_activation

    if checkpoint:
        from .engine.layout import components_for

        parts = components_for(checkpoint, {"dtype": dtype})
        dit, t5, vae = parts.models["transformer"], parts.models["text_encoder"].model, parts.models["vae"].model
        length = parts.max_text_length or 226
        dt = dit.torch_dtype or stored_dtype(dit.checkpoint) or torch.float32
    else:
        dit, t5, vae, length = engine_configs(config_files, overrides, dtype)
        dt = dit.torch_dtype or torch.float32
    vae_latent = sample_latent(dit.model, latent)
    plans = {"transformer": plan_model(dit.model, tps, dt, batch, latent), "text_encoder": plan_model(t5, tps, dt),
             "vae": plan_model(vae, tps, dt, 1, vae_latent)}
    out = EnginePlan(plans["transformer"].dtype, plans)
    for i, tp in enumerate(tps):
        rows = {n: p.rows[i] for n, p in plans.items()}
        bad = [f"{n}: {r.reason}" for n, r in rows.items() if not r.valid]
        if bad:
            out.rows.append({"tp": tp, "valid": False, "reason": "; ".join(bad)})
            continue
        acts = {"encode": t5_activation(t5, tp, dt.itemsize, length), "denoise": rows["transformer"].activation_bytes,
                "decode": rows["vae"].activation_bytes}
        weights = {n: r.param_bytes for n, r in rows.items()}
        known = None if None in acts.values() else sum(weights.values()) + max(acts.values())
        out.rows.append({"tp": tp, "valid": True, "reason": None, "weights": weights, "activations": acts,
                         "device_bytes": known})
    return out


# --- `plan --engine --gpus N`: every (tp, sp, cfg) layout, its memory and its bytes per step -------------

def parse_bytes(text: str) -> int:
    """'24GiB', '80GB', '512MiB', or a plain byte count."""
    units = {"gib": 1 << 30, "gb": 10 ** 9, "mib": 1 << 20, "mb": 10 ** 6, "tib": 1 << 40, "": 1}
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if unit not in units or not num:
        raise ConfigError(f"--gpu-memory {text!r}: give a size such as 24GiB, 80GB or 512MiB")
    return int(float(num) * units[unit])


def engine_layouts(config_files: Sequence[str], gpus: int, dtype: Optional[str] = None,
                   overrides: Sequence[str] = (), gpu_memory: Optional[int] = None,
                   latent: Optional[Latent] = None, checkpoint: Optional[str] = None) -> list[dict]:
    """Every valid (tp, sp, cfg) layout for `gpus` GPUs (engine/comm.py `valid_layouts`) with its weights
    and peak activations per rank (`engine_plan`'s, at its tp), the bytes each rank sends per step by
    kind (engine/comm.py, the largest SP rank's; the counts' convention) and whether it fits `gpu_memory`."""
    from .engine.capacity import engine_configs, sample_latent
    from .engine.comm import max_over_ranks, step_total, valid_layouts
    from .engine.decode import gather_sent

    if checkpoint:
        from .engine.layout import components_for

        parts = components_for(checkpoint, {"dtype": dtype})
        dit, t5 = parts.models["transformer"], parts.models["text_encoder"].model
        vae_cfg = parts.models["vae"].model
        length = parts.max_text_length or dit.model.arch.text_length
        dt = dit.torch_dtype or stored_dtype(dit.checkpoint) or torch.float32
    else:
        dit, t5, vae_cfg, length = engine_configs(config_files, overrides, dtype)
        dt = dit.torch_dtype or torch.float32
    a = dit.model.arch
    lat = sample_latent(dit.model, latent)
    if lat is None:
        raise ConfigError("plan --engine --gpus: the sample size is unknown for this DiT; pass --latent T H W")
    token_rows = lat[1] // a.patch[1]
    layouts = valid_layouts(a, gpus, token_rows, t5)
    tps = sorted({l.tp for l in layouts})
    plan = engine_plan(config_files, tps, dtype, overrides, latent=latent, checkpoint=checkpoint)
    mem = {r["tp"]: r for r in plan.rows}
    frames = lat[0] + (-lat[0]) % a.patch[0]
    vae = _meta_vae(vae_cfg)
    out = []
    for l in layouts:
        r = mem[l.tp]
        if not r["valid"]:
            continue
        run = max_over_ranks(a, t5, l, text=length, latent=(frames, lat[1], lat[2]), channels=a.in_channels,
                             dit_item=dt.itemsize, t5_item=dt.itemsize, latent_item=dt.itemsize)
        decode = max(gather_sent(vae, lat, dt.itemsize, l.tp, l.sp, l.cfg == 2, t, s, c)
                     for t in range(l.tp) for s in range(l.sp) for c in range(l.cfg))
        acts = layout_activations(r["activations"], l.sp, l.cfg)
        dev = None if None in acts.values() else sum(r["weights"].values()) + max(acts.values())
        out.append({"layout": l.name(), "tp": l.tp, "sp": l.sp, "cfg": l.cfg, "dp": gpus // l.ranks,
                    "weights": sum(r["weights"].values()), "activations": acts, "device_bytes": dev,
                    "per_step": run["per_step"], "bytes_per_step": step_total(run), "encode": run["encode"],
                    "decode": decode,
                    "fits": None if gpu_memory is None or dev is None else dev <= gpu_memory})
    return out


def _meta_vae(cfg):
    """The VAE on the meta device with the engine's tiling (diffusers' default tiles): its tile grid only."""
    from .engine.video import enable_bounded_decode
    from .models import TPInfo, build_meta_model

    vae = build_meta_model(cfg, TPInfo())
    enable_bounded_decode(vae, None)
    return vae


def layout_activations(acts: dict, sp: int, cfg: int) -> dict:
    """A layout's peak activations per rank from the TP plan's (batch 2: both CFG passes; the whole
    sequence): the denoising step's scale with the tokens a rank holds — 1/sp of the video tokens (after
    Ulysses' all-to-all a rank holds the whole sequence for heads/sp, the same product), and half the
    batch on a CFG pair. Encode (T5) and the decode (one tile per rank) do not change."""
    denoise = acts.get("denoise")
    return {**acts, "denoise": None if denoise is None else -(-denoise // (sp * cfg))}


def layouts_table(rows: list[dict], gpus: int, gpu_memory: Optional[int]) -> str:
    mib = 1 << 20
    lines = [f"{gpus} GPUs: every valid (tp, sp, cfg) layout; bytes sent per step per rank (sat_dist/commcount.py "
             f"convention, the largest SP rank); decode: the VAE tiles' gathers per video, the largest rank",
             f"{'layout':<14} {'dp':>3} {'weights':>9} {'est.dev':>9} {'tp MiB':>9} {'sp MiB':>9} {'cfg MiB':>8} "
             f"{'total MiB':>10} {'decode MiB':>11} {'fits':>5}"]
    for r in rows:
        s = r["per_step"]
        dev = "n/a" if r["device_bytes"] is None else f"{r['device_bytes'] / GIB:.2f}G"
        fits = "-" if r["fits"] is None else ("yes" if r["fits"] else "no")
        lines.append(f"{r['layout']:<14} {r['dp']:>3} {r['weights'] / GIB:>8.2f}G {dev:>9} {s['tp'] / mib:>9.1f} "
                     f"{s['sp'] / mib:>9.1f} {s['cfg'] / mib:>8.1f} {r['bytes_per_step'] / mib:>10.1f} "
                     f"{r['decode'] / mib:>11.1f} {fits:>5}")
    if gpu_memory is None:
        lines.append("fits: pass --gpu-memory (e.g. 80GiB)")
    return "\n".join(lines)


def auto_layout(model: Optional[str], config_files: Sequence[str], world: int, prompts: int,
                dtype: Optional[str] = None, gpu_memory: Optional[str] = None,
                latent: Optional[Latent] = None) -> dict:
    """`sample --layout auto`'s choice for `world` GPUs (engine/comm.py `choose`): among the layouts
    that fit `gpu_memory` and whose work groups the prompts can keep busy (one prompt: the whole world
    works on it), the fewest bytes sent per step per rank; ties: fewer ranks per work group, smaller
    tp, then smaller sp. ConfigError naming every layout's memory when none fits."""
    from .engine.comm import choose

    memory = parse_bytes(gpu_memory) if gpu_memory else None
    rows = engine_layouts(config_files, world, dtype, gpu_memory=memory, latent=latent, checkpoint=model)
    usable = [r for r in rows if r["dp"] <= max(1, prompts)]
    best = choose([{**r, "fits": r["fits"] is not False} for r in usable])
    if best is None:
        need = ", ".join(f"{r['layout']} ({r['device_bytes'] / GIB:.1f} GiB)" for r in rows
                         if r["device_bytes"] is not None)
        raise ConfigError(f"--layout auto: no layout of {world} GPUs fits --gpu-memory {gpu_memory}: {need}")
    return best
