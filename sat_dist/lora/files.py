"""LoRA files, described from headers alone: which base tensor each (A, B) pair adapts, its rank and scale.

Two formats, told apart by what `path` is:

* **PEFT / diffusers** (`pytorch_lora_weights.safetensors`, written by `CogVideoXPipeline.save_lora_weights`,
  CogVideo's `finetune/`, finetrainers): `[transformer.]<module>.lora_A.weight` [r, in] and `.lora_B.weight`
  [out, r] under diffusers' module names (huggingface/diffusers `loaders/lora_pipeline.py`
  CogVideoXLoraLoaderMixin), or SAT's own module names. Scale = lora_alpha / r from the header's
  `lora_adapter_metadata` (diffusers PR #11324: `{"transformer.r": .., "transformer.lora_alpha": ..}`,
  PEFT's `rank_pattern` / `alpha_pattern` honoured); without it diffusers takes alpha = r, scale 1
  (`utils/peft_utils.get_peft_kwargs`).
* **SAT** (THUDM/SwissArmyTransformer `sat/model/finetune/lora2.py`, `LoraMixin`): a SAT checkpoint folder
  whose `module` holds `<linear>.matrix_A.{i}` [r, in] and `.matrix_B.{i}` [out/partition, r] — one pair
  per partition (3 for the fused QKV, 1 for `attention.dense`), the base under `<linear>.original.*`.
  Scale = lora_alpha / r, lora_alpha from the YAML's `lora_config` or the caller (LoraMixin's default 1).
  At mp > 1 SAT stores `matrix_B` of a column-parallel linear split by rows and `matrix_A` of a
  row-parallel one split by columns (`LoraLinear` sizes them from the local `original_obj.weight`).

A pair writes `rows`: boxes of the base tensor (SAT layout), each at a row offset of B. The fused QKV gets
three pairs (to_q, to_k, to_v or matrix_*.0..2), each one row block. Nothing here reads tensor data.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from ..errors import CheckpointError, ConfigError, LoraError
from ..formats import diffusers_map
from ..formats import sat as sat_format
from ..formats.safetensors_header import parse_json_object, read_header
from ..formats.torchfile import load_structure, locate
from ..index import StoredTensor
from ..placement import Box, Fragment, TensorSpec

Shape = tuple[int, ...]
PEFT_META = "lora_adapter_metadata"  # diffusers' header key (JSON text)
_PEFT_KEY = re.compile(r"^(.+)\.lora_([AB])\.weight$")
_SAT_KEY = re.compile(r"^(.+)\.matrix_([AB])\.(\d+)$")


@dataclass(frozen=True)
class Pair:
    """One low-rank update ΔW[rows] = scale · B·A of base tensor `base`."""

    target: str  # the module as the file names it (for messages and convert)
    base: str  # the model's tensor, SAT name (…query_key_value.weight)
    a: str  # key of A [r, in] in the file (without the model prefix for SAT)
    b: str  # key of B [out_rows, r]
    a_shape: Shape  # full shapes
    b_shape: Shape
    scale: float  # the format's scale (alpha / r), before the user's strength
    rows: tuple[Fragment, ...]  # boxes of `base` at B-row offsets (local_offsets[0]); all columns

    @property
    def rank(self) -> int:
        return self.a_shape[0]


@dataclass(frozen=True)
class AdapterFile:
    path: str
    format: str  # "peft" | "sat"
    pairs: tuple[Pair, ...]
    alpha: str  # where the scale came from, for inspect and errors
    tag: Optional[str] = None  # SAT: the iteration folder
    in_checkpoint: bool = False  # SAT: the LoRA lives in the base checkpoint itself (a LoraMixin fine-tune)
    stored: Optional[Mapping[str, StoredTensor]] = None  # PEFT: the header's tensors (read once, indexed from)

    @property
    def targets(self) -> list[str]:
        return sorted({p.target.rsplit(".", 1)[-1] if self.format == "peft" else p.target.split(".")[-1]
                       for p in self.pairs})


# --- PEFT / diffusers ----------------------------------------------------------------------------

def _base_names(specs: Mapping[str, TensorSpec]) -> dict[str, tuple[str, tuple[Fragment, ...], Shape]]:
    """module name (diffusers' and SAT's) -> (SAT weight, the boxes of it the module's weight holds, its shape)."""
    out = {}
    for name, spec in specs.items():
        if not name.endswith(".weight") or len(spec.global_shape) != 2:
            continue
        out[name[: -len(".weight")]] = (name, (Fragment(Box.full(spec.global_shape), (0, 0)),), spec.global_shape)
        for src in diffusers_map.sources(name, spec.global_shape) or ():
            if src.name.endswith(".weight"):
                out[src.name[: -len(".weight")]] = (name, src.fragments, src.shape)
    return out


def _layer_hint(module: str, specs: Mapping[str, TensorSpec]) -> str:
    m = re.search(r"(?:transformer_blocks|layers)\.(\d+)\.", module)
    layers = {int(x[1]) for n in specs for x in [re.search(r"(?:^|\.)layers\.(\d+)\.", n)] if x}
    if m and layers and int(m[1]) > max(layers):
        return f": it is for layer {m[1]}, the model has {max(layers) + 1} layers (a LoRA for another model)"
    return " (a LoRA for another model?)"


def _peft_meta(path: str, meta: Mapping[str, str]) -> Optional[dict]:
    raw = meta.get(PEFT_META)
    if raw is None:
        return None
    obj = parse_json_object(path, raw.encode(), f"header's {PEFT_META}")
    return {k.removeprefix("transformer."): v for k, v in obj.items()}


def _pattern(table: Optional[dict], module: str, default):
    """PEFT's rank_pattern / alpha_pattern: the first key that matches the module's name's end."""
    for key, value in (table or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def peft_adapter(path: str, specs: Mapping[str, TensorSpec]) -> AdapterFile:
    header = read_header(path)
    meta = _peft_meta(path, header.metadata)
    modules: dict[str, dict[str, str]] = {}
    for key in header.tensors:
        name = key.removeprefix("transformer.").removeprefix("base_model.model.")
        if key.startswith(("text_encoder.", "lora_te", "lora_unet_")):
            raise LoraError(f"{path}: tensor {key!r} is a text-encoder or kohya-style LoRA; sat_dist merges "
                            f"diffusers/PEFT transformer LoRAs (…lora_A.weight / …lora_B.weight) and SAT LoRAs")
        m = _PEFT_KEY.match(name)
        if not m:
            raise LoraError(f"{path}: tensor {key!r} is not a LoRA matrix (expected <module>.lora_A.weight / "
                            f".lora_B.weight: DoRA magnitudes and lora biases are not supported)")
        modules.setdefault(m[1], {})[m[2]] = key
    bases = _base_names(specs)
    pairs, r0, a0 = [], None, None
    for module in sorted(modules):
        got = modules[module]
        if set(got) != {"A", "B"}:
            raise LoraError(f"{path}: module {module!r} has lora_{list(got)[0]} but no lora_"
                            f"{'B' if 'A' in got else 'A'}; the file is incomplete")
        if module not in bases:
            raise LoraError(f"{path}: tensor {got['A']!r} adapts {module!r}, which this model does not have"
                            f"{_layer_hint(module, specs)}")
        base, frags, wshape = bases[module]
        a, b = header.tensors[got["A"]], header.tensors[got["B"]]
        r = a.shape[0]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != wshape[1] or b.shape != (wshape[0], r):
            raise LoraError(f"{path}: {got['A']!r} {list(a.shape)} / {got['B']!r} {list(b.shape)} do not fit the "
                            f"model's {module} weight {list(wshape)} (expected A [r, {wshape[1]}], B [{wshape[0]}, r]); "
                            f"a LoRA for another model?")
        if meta is None:
            scale, r0, a0 = 1.0, r, r
        else:
            rank = _pattern(meta.get("rank_pattern"), module, meta.get("r", r))
            alpha = _pattern(meta.get("alpha_pattern"), module, meta.get("lora_alpha", rank))
            if rank != r:
                raise LoraError(f"{path}: {PEFT_META} says rank {rank} for {module} but {got['A']!r} has rank {r}")
            scale, r0, a0 = float(alpha) / r, r, alpha
        pairs.append(Pair(module, base, got["A"], got["B"], tuple(a.shape), tuple(b.shape), scale, tuple(frags)))
    if not pairs:
        raise LoraError(f"{path} holds no LoRA tensors")
    how = (f"alpha {a0} / r {r0} from {PEFT_META}" if meta is not None
           else f"no {PEFT_META}: alpha = r (diffusers' rule), scale 1")
    return AdapterFile(path, "peft", tuple(pairs), how, stored=header.tensors)


# --- SAT LoraMixin -------------------------------------------------------------------------------

def sat_lora_keys(module: Mapping[str, object], prefix: str) -> dict[str, dict[str, dict[int, str]]]:
    """linear (without prefix) -> {"A": {i: key}, "B": {i: key}} of a SAT module state dict."""
    out: dict[str, dict[str, dict[int, str]]] = {}
    for key in module:
        if not key.startswith(prefix):
            continue
        m = _SAT_KEY.match(key[len(prefix):])
        if m:
            out.setdefault(m[1], {"A": {}, "B": {}})[m[2]][int(m[3])] = key[len(prefix):]
    return out


def sat_adapter(path: str, specs: Mapping[str, TensorSpec], prefix: str = "", tag: Optional[str] = None,
                alpha: Optional[float] = None, in_checkpoint: bool = False,
                expect_r: Optional[int] = None) -> AdapterFile:
    """The LoraMixin pairs of SAT checkpoint `path` (mp file 0's structure only)."""
    ckpt = sat_format.discover(path, tag)
    first, module = _first_module(ckpt)
    if module is None:
        raise LoraError(f"{first} has no 'module' state dict: not a SAT checkpoint")
    return _sat_pairs(path, ckpt, module, specs, prefix, alpha, in_checkpoint, expect_r)


def _first_module(ckpt) -> tuple[str, Optional[dict]]:
    """mp file 0 of `ckpt` and its `module` state dict (structure only; None when it has none)."""
    obj = load_structure(ckpt.files[0])
    module = obj.get("module") if isinstance(obj, dict) else None
    return ckpt.files[0], module if isinstance(module, dict) else None


def _sat_pairs(path: str, ckpt, module: dict, specs: Mapping[str, TensorSpec], prefix: str,
               alpha: Optional[float], in_checkpoint: bool, expect_r: Optional[int]) -> AdapterFile:
    first = ckpt.files[0]
    found = sat_lora_keys(module, prefix)
    if not found:
        raise LoraError(f"{path}: no SAT LoRA tensors (<linear>.matrix_A.N / matrix_B.N"
                        f"{' under ' + repr(prefix) if prefix else ''}) in {first}")
    size = os.path.getsize(first)
    alpha, how = sat_alpha(path, alpha)
    scale_alpha = float(alpha)
    pairs = []
    for linear in sorted(found):
        a_keys, b_keys = found[linear]["A"], found[linear]["B"]
        base = f"{linear}.weight"
        n = len(a_keys)
        if sorted(a_keys) != list(range(n)) or sorted(b_keys) != list(range(n)):
            raise LoraError(f"{first}: {prefix}{linear} has matrix_A {sorted(a_keys)} and matrix_B {sorted(b_keys)}; "
                            f"SAT writes one of each per partition, numbered from 0")
        if base not in specs or len(specs[base].global_shape) != 2:
            raise LoraError(f"{first}: tensor {prefix}{a_keys[0]!r} adapts {prefix}{linear}, which this model does "
                            f"not have (a LoRA for another model or layer count?)")
        spec = specs[base]
        out_rows, in_cols = spec.global_shape
        a_st = [locate(first, module[prefix + a_keys[i]], prefix + a_keys[i], size) for i in range(n)]
        b_st = [locate(first, module[prefix + b_keys[i]], prefix + b_keys[i], size) for i in range(n)]
        r = a_st[0].shape[0]
        if expect_r is not None and r != expect_r:
            raise LoraError(f"{first}: {prefix}{a_keys[0]!r} has rank {r} but lora_config says r={expect_r}")
        split = spec.layout.split_dim
        # SAT's partition sizes: out // sum(partition) * partition_i (lora2.py), i.e. the linear's blocks when
        # they are as many as the partitions (GQA: (heads, kv, kv)), else equal parts.
        blocks = spec.layout.blocks if len(spec.layout.blocks) == n else (1,) * n
        unit, rem = divmod(out_rows, sum(blocks))
        if rem:
            raise LoraError(f"{first}: {prefix}{linear} has {out_rows} output rows, not {n} LoRA partitions")
        rows, start = [], 0
        for i in range(n):
            size_i = unit * blocks[i]
            a_shape, b_shape = (r, in_cols), (size_i, r)
            want_a = (r, in_cols // ckpt.mp_size) if split == 1 and ckpt.mp_size > 1 else a_shape
            want_b = (size_i // ckpt.mp_size, r) if split == 0 and ckpt.mp_size > 1 else b_shape
            if a_st[i].shape != want_a or b_st[i].shape != want_b:
                raise LoraError(f"{first}: {prefix}{a_keys[i]!r} {list(a_st[i].shape)} / {prefix}{b_keys[i]!r} "
                                f"{list(b_st[i].shape)} do not fit the model's {base} {list(spec.global_shape)} at "
                                f"mp {ckpt.mp_size} (expected {list(want_a)} / {list(want_b)})")
            rows.append(Pair(f"{linear}.{i}", base, a_keys[i], b_keys[i], a_shape, b_shape, scale_alpha / r,
                             (Fragment(Box((start, 0), (size_i, in_cols)), (0, 0)),)))
            start += size_i
        pairs += rows
    return AdapterFile(path, "sat", tuple(pairs), f"lora_alpha {scale_alpha:g} / r ({how})", ckpt.tag, in_checkpoint)


SAT_LORA_CONFIG = "lora_config.json"  # {"r", "lora_alpha"} beside `latest` (what `convert --to sat-lora` writes)


def sat_alpha(path: str, alpha: Optional[float]) -> tuple[float, str]:
    """LoraMixin's lora_alpha: given (--lora-alpha, or the YAML's lora_config, which means LoraMixin's default 1
    when it names none), else the folder's lora_config.json. SAT saves it nowhere else, and a guess would merge
    with the wrong scale: without one of these the LoRA is refused."""
    if alpha is not None:
        return float(alpha), "given"
    where = os.path.join(path, SAT_LORA_CONFIG)
    if os.path.isfile(where):
        try:
            with open(where) as f:
                value = json.load(f).get("lora_alpha")
        except (OSError, ValueError, AttributeError) as exc:
            raise LoraError(f"cannot read {where}: {exc}") from exc
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value), SAT_LORA_CONFIG
        raise LoraError(f"{where}: lora_alpha must be a positive number, got {value!r}")
    raise LoraError(f"{path} is a SAT LoRA (LoraMixin matrix_A/matrix_B), whose scale is lora_alpha / r, but SAT "
                    f"saves lora_alpha nowhere: pass --lora-alpha (load.lora_alpha; LoraMixin's default is 1), or the "
                    f"CogVideo YAML with model.modules.lora_config")


def finetune_adapter(path: str, specs: Mapping[str, TensorSpec], prefix: str = "", tag: Optional[str] = None,
                     alpha: Optional[float] = None, expect_r: Optional[int] = None) -> Optional[AdapterFile]:
    """The LoRA of checkpoint `path` when it is a LoraMixin fine-tune (its first mp file holds matrix_A/B),
    else None; mp file 0's structure is read once for both questions."""
    found = _lora_module(path, prefix, tag)
    return None if found is None else _sat_pairs(path, *found, specs, prefix, alpha, True, expect_r)


def has_sat_lora(path: str, prefix: str = "", tag: Optional[str] = None) -> bool:
    """Whether checkpoint `path` is a LoraMixin fine-tune (its first mp file holds matrix_A/B)."""
    return _lora_module(path, prefix, tag) is not None


def _lora_module(path: str, prefix: str, tag: Optional[str]):
    """(checkpoint, mp file 0's module) of a SAT checkpoint holding LoraMixin factors, else None."""
    if not (os.path.isdir(path) and sat_format.recognise(path, tag)):
        return None
    try:
        ckpt = sat_format.discover(path, tag)
    except CheckpointError:  # not SAT's layout (a DeepSpeed ZeRO-3 folder has `latest` but no mp files):
        return None          # its own reader says what it holds
    _, module = _first_module(ckpt)
    return None if module is None or not sat_lora_keys(module, prefix) else (ckpt, module)


def open_adapter(path: str, specs: Mapping[str, TensorSpec], prefix: str = "", alpha: Optional[float] = None,
                 tag: Optional[str] = None) -> AdapterFile:
    """The adapter at `path`: a PEFT/diffusers `.safetensors` file or a SAT LoRA checkpoint folder."""
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return peft_adapter(path, specs)
    if os.path.isdir(path) and sat_format.recognise(path, tag):
        return sat_adapter(path, specs, prefix, tag, alpha)
    if os.path.isdir(path):
        inside = [n for n in sorted(os.listdir(path)) if n.endswith(".safetensors")]
        if len(inside) == 1:
            return peft_adapter(os.path.join(path, inside[0]), specs)
    raise LoraError(f"LoRA {path}: not a .safetensors LoRA file (PEFT / diffusers) nor a SAT LoRA checkpoint "
                    f"folder (with 'latest' or mp_rank_XX_model_states.pt)")


def describe(path: str, specs: Optional[Mapping[str, TensorSpec]] = None) -> dict:
    """`sat-dist inspect` of a LoRA: format, rank, alpha/scale, targets, layers (headers only)."""
    header = read_header(path)
    meta = _peft_meta(path, header.metadata)
    modules: dict[str, dict] = {}
    for key, st in header.tensors.items():
        m = _PEFT_KEY.match(key.removeprefix("transformer."))
        if m:
            modules.setdefault(m[1], {})[m[2]] = st.shape
    ranks = sorted({s["A"][0] for s in modules.values() if "A" in s})
    layers = sorted({int(m[1]) for k in modules for m in [re.search(r"(?:transformer_blocks|layers)\.(\d+)\.", k)] if m})
    targets = sorted({re.sub(r"^.*?(?:transformer_blocks|layers)\.\d+\.", "", k) for k in modules})
    if meta is None:
        scale = "no lora_adapter_metadata: alpha = r (diffusers' rule), scale 1.0 x strength"
    else:
        r, alpha = meta.get("r"), meta.get("lora_alpha")
        scale = f"lora_alpha {alpha} / r {r} = {float(alpha) / float(r):g} x strength (from {PEFT_META})"
    summary = [f"format: LoRA (PEFT / diffusers), {len(modules)} adapted modules, rank {ranks}",
               f"scale: {scale}", f"targets: {', '.join(targets)}",
               f"layers: {len(layers)} ({layers[0]}..{layers[-1]})" if layers else "layers: none numbered"]
    return {"format": "lora (peft/diffusers)", "root": path, "summary": summary,
            "files": [{"file": os.path.basename(path), "bytes": header.size,
                       "holds": f"{len(header.tensors)} LoRA tensors"}],
            "lora": {"rank": ranks, "metadata": meta, "targets": targets, "layers": layers,
                     "modules": len(modules)}}


def describe_sat(path: str, tag: Optional[str] = None) -> list[str]:
    """Summary lines for a SAT checkpoint that holds LoraMixin factors (none when it holds none)."""
    ckpt = sat_format.discover(path, tag)
    obj = load_structure(ckpt.files[0])
    module = obj.get("module") if isinstance(obj, dict) else None
    if not isinstance(module, dict):
        return []
    prefixes = {k[: k.index("transformer.")] for k in module if ".matrix_A." in k and "transformer." in k} or {""}
    found = {}
    for prefix in sorted(prefixes):
        found.update(sat_lora_keys(module, prefix))
    if not found:
        return []
    first = next(iter(found.values()))["A"][0]
    key = next(k for k in module if k.endswith(first))
    rank = tuple(module[key].shape)[0]
    layers = sorted({int(m[1]) for k in found for m in [re.search(r"layers\.(\d+)\.", k)] if m})
    targets = sorted({re.sub(r"^.*layers\.\d+\.", "", k) for k in found})
    try:
        alpha = f"lora_alpha {sat_alpha(path, None)[0]:g} ({SAT_LORA_CONFIG})"
    except LoraError:
        alpha = "lora_alpha not saved (LoraMixin's default 1; pass --lora-alpha or the YAML's lora_config)"
    return [f"LoRA (SAT LoraMixin): rank {rank}, scale lora_alpha / r; {alpha}",
            f"LoRA targets: {', '.join(targets)} (partitions: {', '.join(str(len(v['A'])) for v in found.values())[:40]})",
            f"LoRA layers: {len(layers)}" + (f" ({layers[0]}..{layers[-1]})" if layers else "")]


def is_peft_lora(path: str) -> bool:
    """A `.safetensors` file whose every tensor is a lora_A / lora_B matrix (cheap: the header)."""
    if not (os.path.isfile(path) and path.endswith(".safetensors")):
        return False
    try:
        names = read_header(path).tensors
    except Exception:
        return False
    return bool(names) and all(_PEFT_KEY.match(k.removeprefix("transformer.")) for k in names)


def check_sequence(adapters: Sequence[AdapterFile]) -> None:
    """Two adapters may adapt the same base tensor (their updates sum); one file named twice is refused."""
    seen = set()
    for a in adapters:
        key = os.path.realpath(a.path)
        if key in seen and not a.in_checkpoint:
            raise ConfigError(f"LoRA {a.path} is given twice; give it once with the summed strength")
        seen.add(key)
