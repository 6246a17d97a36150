"""`sat-dist convert --to diffusers-lora | sat-lora`: a LoRA from SAT's LoraMixin layout to diffusers'/PEFT's, and
back, for the CogVideoX DiT. Read through sat_dist's own planner (headers, then make_plan + materialize on the CPU
at TP=1: the rows of an mp>1 SAT LoRA are joined by the planner), so any mp size and any layer count convert.

* `to="diffusers-lora"`: `src` is a SAT checkpoint folder holding `<linear>.matrix_A.i` / `.matrix_B.i` (a
  LoraMixin fine-tune, its base under `….original.*`, or the factors alone). Its model comes from the
  checkpoint's model config (`model_config.json`) and/or `model_config` (YAML files). Each pair becomes the
  diffusers module that holds its rows of the base (`diffusers_map.sources`): query_key_value's pair i ->
  `attn1.to_q` / `to_k` / `to_v`, `attention.dense` -> `attn1.to_out.0`, written as one `.safetensors` file
  (`dst`) with keys `transformer.<module>.lora_A.weight` / `.lora_B.weight` and the header metadata diffusers'
  `save_lora_weights` writes (`lora_adapter_metadata`: `transformer.r`, `transformer.lora_alpha`, ...), so
  diffusers' scale lora_alpha / r is SAT's. alpha: `alpha`, else the YAML's `lora_config.params.lora_alpha`,
  else `lora_config.json` beside `latest`, else LoraMixin's default 1 (the summary says which).
* `to="sat-lora"`: `src` is a PEFT / diffusers LoRA `.safetensors`; `model_config` names the target model: a
  base checkpoint folder (its model config: SAT's `model_config.json`, a diffusers `config.json`) or YAML /
  `model_config.json` files. Writes the SAT LoRA checkpoint folder `dst`: `latest` ("1"),
  `1/mp_rank_00_model_states.pt` = `{"module": {prefix + linear + ".matrix_A.i": ..}}` (query_key_value:
  partitions 0..2 = to_q, to_k, to_v; attention.dense: partition 0 = to_out.0; a module the LoRA lacks in an
  adapted layer gets zero A and B, i.e. ΔW = 0 exactly) and `lora_config.json` {"r", "lora_alpha"} (SAT's
  scale lora_alpha / r = the file's). Modules LoraMixin cannot hold (ff, norms) and mixed ranks are refused.

Outputs are written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import torch

from ..config import resolve
from ..errors import ConfigError, LoraError
from ..formats import diffusers_map
from ..formats.safetensors_header import read_header
from ..materialize import materialize
from ..models import TPInfo, build_meta_model, collect_specs
from ..placement import TensorSpec
from ..plan import make_plan
from ..writers.base import fsync_path, publish
from . import files
from .load import external_indices, lora_config
from .plan import plan_loras

TO = ("diffusers-lora", "sat-lora")
CPU = torch.device("cpu")
SAT_LINEARS = {"attention.query_key_value": 3, "attention.dense": 1}  # LoraMixin's linears: partitions
PEFT_PREFIX = "transformer."


@dataclass
class ExportReport:
    source: str
    destination: str
    to: str
    r: int
    lora_alpha: float
    alpha_from: str
    pairs: int  # (A, B) pairs written
    keys: list = field(default_factory=list)
    zero_filled: list = field(default_factory=list)  # sat-lora: partitions the LoRA lacks, written as zeros

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.r

    def summary(self) -> str:
        lines = [f"{self.source} -> {self.destination} ({self.to}): {self.pairs} LoRA pairs, {len(self.keys)} "
                 f"tensors, rank {self.r}, lora_alpha {self.lora_alpha:g} ({self.alpha_from}): "
                 f"scale alpha / r = {self.scale:g}"]
        if self.zero_filled:
            lines.append(f"{len(self.zero_filled)} partitions the LoRA lacks written as zero A and B (ΔW = 0): "
                         f"{self.zero_filled[:6]}{' ...' if len(self.zero_filled) > 6 else ''}")
        return "\n".join(lines)


def export_lora(src: str, dst: str, to: str, *, alpha: Optional[float] = None,
                model_config: Union[str, Sequence[str], None] = None, tag: Optional[str] = None,
                force: bool = False) -> ExportReport:
    """Convert the LoRA at `src` into `dst` (`to`: diffusers-lora | sat-lora; see the module docstring).
    `model_config`: a base checkpoint folder or config files (YAML / model_config.json) naming the model;
    `alpha`: LoraMixin's lora_alpha of a SAT source; `force`: replace an existing `dst`."""
    if to not in TO:
        raise ConfigError(f"export_lora writes {' or '.join(TO)}, not {to!r}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
        raise ConfigError(f"--lora-alpha must be a positive number, got {alpha!r}")
    if os.path.lexists(dst) and not force:
        raise ConfigError(f"{dst} already exists: choose a new path, or pass --force to replace it")
    if os.path.realpath(src) == os.path.realpath(dst):
        raise ConfigError(f"the output {dst} is the source: write it elsewhere")
    if to == "diffusers-lora":
        return _to_diffusers(src, dst, alpha, model_config, tag, force)
    return _to_sat(src, dst, model_config, force)


# --- the model: names and shapes --------------------------------------------------------------------

def _model(checkpoint: Optional[str], model_config: Union[str, Sequence[str], None], tag: Optional[str]):
    """(cfg, specs at TP=1, key prefix) of the CogVideoX DiT the LoRA is for."""
    cfg_files = [model_config] if isinstance(model_config, str) else list(model_config or [])
    if len(cfg_files) == 1 and os.path.isdir(cfg_files[0]):  # a base checkpoint folder: its own config
        checkpoint, cfg_files = cfg_files[0], []
    cfg = resolve(checkpoint, cfg_files, tag=tag)
    if not all(hasattr(cfg.model, k) for k in ("num_layers", "hidden_size", "in_channels")):
        raise ConfigError(f"LoRA export maps SAT's CogVideoX DiT to diffusers' CogVideoXTransformer3DModel; the "
                          f"model config given ({checkpoint or cfg_files}) is a "
                          f"{getattr(cfg.model, 'model_class', type(cfg.model).__name__)}")
    model = build_meta_model(cfg.model, TPInfo(1, 0, None))
    return cfg, collect_specs(model), getattr(model, "checkpoint_prefix", "")


def _read(adapter: files.AdapterFile, specs: Mapping[str, TensorSpec], prefix: str) -> dict[str, torch.Tensor]:
    """Every factor of `adapter`, whole, as stored: key in the file -> tensor (one TP=1 plan, CPU)."""
    lp = plan_loras([adapter], [1.0], specs, 1, 0)
    ((mine, index),) = external_indices(lp, 1, 0, prefix)
    plan = make_plan(mine, 1, 0, index, None, (), 64 << 20)
    tensors, _ = materialize(plan, CPU, set(plan.targets), 1)
    return {lp.keys[0][name]: t for name, t in tensors.items()}


def _one_rank(adapter: files.AdapterFile) -> int:
    ranks = sorted({p.rank for p in adapter.pairs})
    if len(ranks) != 1:
        raise LoraError(f"{adapter.path}: the LoRA mixes ranks {ranks} "
                        f"({[p.target for p in adapter.pairs if p.rank != ranks[0]][:4]} ...); SAT's LoraMixin has "
                        f"one r and diffusers' one-rank metadata would misscale them: re-train or pad to one rank")
    return ranks[0]


# --- SAT LoraMixin -> diffusers / PEFT ------------------------------------------------------------

def sat_alpha(src: str, alpha: Optional[float], cfg) -> tuple[float, str]:
    """LoraMixin's lora_alpha by the load's rule: given, else the YAML's lora_config (LoraMixin's default 1 when
    it names none), else the folder's lora_config.json, else refused (files.sat_alpha): a guessed alpha would
    write a LoRA of the wrong scale."""
    if alpha is None:
        yaml_lora = lora_config(cfg.model)
        if yaml_lora is not None:
            return float(yaml_lora.get("lora_alpha", 1.0)), "the YAML's lora_config" + (
                "" if "lora_alpha" in yaml_lora else " (no lora_alpha: LoraMixin's default 1)")
    return files.sat_alpha(src, alpha)


def _diffusers_module(pair: files.Pair, specs: Mapping[str, TensorSpec], where: str) -> str:
    srcs = diffusers_map.sources(pair.base, specs[pair.base].global_shape) or []
    for s in srcs:
        if tuple(s.fragments) == tuple(pair.rows) and s.name.endswith(".weight"):
            return s.name[: -len(".weight")]
    raise LoraError(f"{where}: LoRA pair {pair.target} ({pair.a} / {pair.b}) writes rows "
                    f"{[(f.logical.offsets[0], f.logical.sizes[0]) for f in pair.rows]} of {pair.base}, which no one "
                    f"diffusers module holds: it cannot be a diffusers LoRA")


def _to_diffusers(src, dst, alpha, model_config, tag, force) -> ExportReport:
    from safetensors.torch import save_file

    cfg, specs, prefix = _model(src, model_config, tag)
    if not files.has_sat_lora(src, prefix, tag):
        raise LoraError(f"{src}: no SAT LoRA tensors (<linear>.matrix_A.N / matrix_B.N under {prefix!r}); "
                        f"--to diffusers-lora converts a SAT LoraMixin checkpoint")
    value, how = sat_alpha(src, alpha, cfg)
    yaml_lora = lora_config(cfg.model)
    adapter = files.sat_adapter(src, specs, prefix, tag, value, expect_r=(yaml_lora or {}).get("r"))
    r = _one_rank(adapter)
    factors = _read(adapter, specs, prefix)
    out, modules = {}, []
    for pair in adapter.pairs:
        module = _diffusers_module(pair, specs, src)
        modules.append(module)
        out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = factors[pair.a].contiguous()
        out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = factors[pair.b].contiguous()
    targets = sorted({m.split(".attn1.", 1)[-1] if ".attn1." in m else m.rsplit(".", 1)[-1] for m in modules})
    alpha_out = int(value) if float(value).is_integer() else value
    meta = {"r": r, "lora_alpha": alpha_out, "target_modules": targets, "rank_pattern": {}, "alpha_pattern": {},
            "lora_dropout": 0.0, "init_lora_weights": True, "use_dora": False, "lora_bias": False,
            "bias": "none"}
    header = {"format": "pt", files.PEFT_META: json.dumps({PEFT_PREFIX + k: v for k, v in meta.items()},
                                                           sort_keys=True)}
    tmp = f"{dst}.tmp-{os.getpid()}"
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    try:
        save_file(dict(sorted(out.items())), tmp, metadata=header)
        fsync_path(tmp)
        _publish_file(tmp, dst, force)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
    return ExportReport(src, dst, "diffusers-lora", r, float(value), how, len(adapter.pairs), sorted(out))


def _publish_file(tmp: str, dst: str, force: bool) -> None:
    if os.path.isdir(dst) and not os.path.islink(dst):
        raise ConfigError(f"{dst} is a folder; --to diffusers-lora writes one .safetensors file: name the file")
    if os.path.lexists(dst) and not force:
        raise ConfigError(f"{dst} appeared while converting: pass --force to replace it")
    os.replace(tmp, dst)
    fsync_path(os.path.dirname(os.path.abspath(dst)))


# --- diffusers / PEFT -> SAT LoraMixin ------------------------------------------------------------

def _linear(base: str) -> Optional[str]:
    for linear in SAT_LINEARS:
        if base.endswith(f".{linear}.weight") and base.startswith("transformer.layers."):
            return base[: -len(".weight")]
    return None


def _to_sat(src, dst, model_config, force) -> ExportReport:
    if model_config is None or model_config == []:
        raise ConfigError(f"--to sat-lora needs the target model: --base <base checkpoint folder> or --config "
                          f"<YAML / model_config.json>, to name and shape {src}'s tensors the SAT way")
    if not files.is_peft_lora(src):
        raise LoraError(f"{src}: not a PEFT / diffusers LoRA .safetensors (every tensor <module>.lora_A.weight / "
                        f".lora_B.weight); --to sat-lora converts one")
    _, specs, prefix = _model(None, model_config, None)
    adapter = files.peft_adapter(src, specs)
    r = _one_rank(adapter)
    scales = sorted({p.scale for p in adapter.pairs})
    if len(scales) != 1:
        raise LoraError(f"{src}: the LoRA's modules have different alpha / r ({scales}); SAT's LoraMixin has one "
                        f"lora_alpha: re-save it with one alpha")
    for pair in adapter.pairs:
        if _linear(pair.base) is None:
            raise LoraError(f"{src}: tensor {pair.a!r} adapts {pair.target} ({pair.base}), which SAT's LoraMixin "
                            f"cannot hold (it adapts attention.query_key_value and attention.dense only): drop those "
                            f"modules or merge this LoRA instead (convert --to sat --lora {src})")
    factors = _read(adapter, specs, prefix)
    by_linear: dict[str, dict[int, files.Pair]] = {}
    for pair in adapter.pairs:
        linear = _linear(pair.base)
        srcs = diffusers_map.sources(pair.base, specs[pair.base].global_shape) or []
        part = next((i for i, s in enumerate(srcs) if tuple(s.fragments) == tuple(pair.rows)), None)
        if part is None or len(srcs) != SAT_LINEARS[linear.split(".", 3)[-1]]:
            raise LoraError(f"{src}: {pair.target} writes rows of {pair.base} that are not one LoraMixin partition")
        by_linear.setdefault(linear, {})[part] = pair
    dtype = factors[adapter.pairs[0].a].dtype
    layers = sorted({".".join(k.split(".")[:3]) for k in by_linear})
    module, zeros = {}, []
    for layer in layers:
        for name, parts in SAT_LINEARS.items():
            linear = f"{layer}.{name}"
            rows, cols = specs[f"{linear}.weight"].global_shape
            for i in range(parts):
                pair = by_linear.get(linear, {}).get(i)
                key = f"{prefix}{linear}.matrix_%s.{i}"
                if pair is None:
                    zeros.append(f"{linear}.{i}")
                    module[key % "A"] = torch.zeros(r, cols, dtype=dtype)
                    module[key % "B"] = torch.zeros(rows // parts, r, dtype=dtype)
                else:
                    module[key % "A"], module[key % "B"] = factors[pair.a].clone(), factors[pair.b].clone()
    lora_alpha = _peft_alpha(src, r, scales[0])
    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.join(tmp, "1"))
        torch.save({"module": dict(sorted(module.items()))}, os.path.join(tmp, "1", "mp_rank_00_model_states.pt"))
        with open(os.path.join(tmp, "latest"), "w") as fh:
            fh.write("1")
        with open(os.path.join(tmp, files.SAT_LORA_CONFIG), "w") as fh:
            json.dump({"r": r, "lora_alpha": lora_alpha, "target": "sat.model.finetune.lora2.LoraMixin",
                       "layer_range": sorted(int(x.rsplit(".", 1)[-1]) for x in layers)}, fh, indent=2)
        publish(tmp, dst, force, files=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportReport(src, dst, "sat-lora", r, lora_alpha, f"alpha / r of {src}", len(adapter.pairs),
                        sorted(module), zeros)


def _peft_alpha(src: str, r: int, scale: float) -> float:
    """The file's own lora_alpha when its metadata gives one that makes `scale` (alpha / r then reloads to the
    same bits), else scale * r (no metadata: diffusers' alpha = r)."""
    raw = read_header(src).metadata.get(files.PEFT_META)
    try:
        alpha = float(json.loads(raw).get(f"{PEFT_PREFIX}lora_alpha", json.loads(raw).get("lora_alpha")))
    except (TypeError, ValueError, AttributeError):
        return scale * r
    return alpha if alpha / r == scale else scale * r
