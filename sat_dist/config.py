"""One validated LoadConfig from model_config.json, YAML files and key=value overrides.

Sources merge with OmegaConf, later wins: the checkpoint's `model_config.json` (SAT writes it),
then each `--config` YAML, then `key=value` overrides, then explicit arguments (--tp, --dtype).
Unknown keys are errors that name the key: a typo must not silently load a different model. The
model's own schema belongs to its family (`models.FAMILIES`); this module only merges and checks.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from . import formats
from .errors import CheckpointError, ConfigError
from .models import FAMILIES

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of fp32, fp16, bf16")
    return DTYPES[key]


def parse_lora_arg(arg) -> tuple[str, float]:
    """`path[:strength]` (or a (path, strength) pair) -> (path, strength); strength defaults to 1."""
    if isinstance(arg, (tuple, list)):
        if len(arg) != 2:
            raise ConfigError(f"a LoRA is (path, strength), got {arg!r}")
        path, strength = arg
    else:
        path, strength = str(arg), 1.0
        head, sep, tail = path.rpartition(":")
        if sep and head and not os.path.exists(path):
            path, strength = head, tail
    try:
        strength = float(strength)
    except (TypeError, ValueError):
        raise ConfigError(f"LoRA {path}: strength {strength!r} is not a number (write PATH:STRENGTH)") from None
    if not os.path.exists(path):
        raise ConfigError(f"LoRA {path} does not exist (write PATH[:STRENGTH], e.g. style.safetensors:0.8)")
    return path, strength


@dataclass
class LoadConfig:
    """Everything one load needs; the same on every rank."""

    model: Any
    checkpoint: Optional[str] = None
    tp: int = 1
    dtype: Optional[str] = None  # None: keep the stored dtype
    device: Optional[str] = None  # None: cuda:LOCAL_RANK if CUDA is present, else cpu
    timeout_s: float = 300.0
    runtime_timeout_s: Optional[float] = None  # the groups' timeout after the load (None: 2 h, collectives)
    staging_mib: int = 64  # host staging buffer: bounds host memory during reads
    tag: Optional[str] = None  # iteration folder to load instead of `latest`
    weights: str = "auto"  # DeepSpeed ZeRO-1/2: auto|module = module weights, fp32 = fp32 master partitions
    report: Optional[str] = None
    exchange: str = "auto"  # on: ranks needing the same bytes split the reads and broadcast; off: each reads all;
    # auto: on when the ranks span several kernels (hosts) or use CUDA (exchange.wanted)
    digest: Optional[bool] = None  # SHA-256 state-dict digest in the report; None: only when a report file is written
    readers: Optional[int] = None  # reader threads per rank; None: this rank's share of the cores, 1..4
    progress: Optional[bool] = None  # rank 0's progress bar; None: on a TTY (shown for loads past ~2 s)
    verify: Any = False  # --verify: True = check reads against the checkpoint's manifest; a str = that manifest
    lora: Any = ()  # --lora: adapters merged into the base, each PATH[:STRENGTH] or (path, strength)
    lora_merge: bool = True  # false: the low-rank path in the forward (switch adapters without touching the base)
    lora_alpha: Optional[float] = None  # SAT LoRAs: LoraMixin's lora_alpha (scale alpha / r); None: the YAML's, else 1

    @property
    def torch_dtype(self) -> Optional[torch.dtype]:
        return parse_dtype(self.dtype)


LOAD_KEYS = {f.name for f in dataclasses.fields(LoadConfig)} - {"model"}


def _to_container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def build_model_config(model: dict, hint: str = "no model_config.json in the checkpoint and no --config?") -> Any:
    """The model_class's family schema from a merged dict: unknown, unsupported and missing keys
    are errors that name them."""
    model = dict(model)
    cls_name = model.get("model_class", "BaseModel")
    classes = {c: f.config_cls for f in FAMILIES for c in f.model_classes}
    if cls_name not in classes:
        raise ConfigError(f"model_class {cls_name!r} is not supported; supported: {sorted(classes)}")
    cls = classes[cls_name]
    names = {f.name for f in dataclasses.fields(cls)}
    unsupported = getattr(cls, "UNSUPPORTED", {})
    for key in list(model):
        if key in unsupported:
            value = model.pop(key)
            if value != unsupported[key]:
                raise ConfigError(f"model option {key}={value!r} is not supported by sat_dist ({cls_name})")
        elif key not in names:
            raise ConfigError(f"unknown model option {key!r} for {cls_name}; known: {sorted(names)}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in model]
    if missing:
        raise ConfigError(f"model config is missing {missing} ({hint})")
    cfg = cls(**model)
    cfg.validate()
    return cfg


def _sat_model_config_as_model(layer: Any) -> Any:
    """A flat SAT `model_config.json` passed with --config (top-level `model_class`) is the model section."""
    if isinstance(layer, DictConfig) and "model_class" in layer and not {"model", "load"} & set(layer):
        return OmegaConf.create({"model": layer})
    return layer


def resolve(
    checkpoint: Optional[str] = None,
    config_files: Sequence[str] = (),
    overrides: Sequence[str] = (),
    **explicit: Any,
) -> LoadConfig:
    """Merge every source into one LoadConfig (see module docstring for the order)."""
    layers = []
    for path in config_files:
        if not os.path.exists(path):
            raise ConfigError(f"config file {path} does not exist")
        layers.append(_sat_model_config_as_model(OmegaConf.load(path)))
    merged = _to_container(OmegaConf.merge(*layers)) if layers else {}
    for adapter in (f.adapt_yaml for f in FAMILIES if f.adapt_yaml is not None):
        adapted = adapter(merged)
        if adapted is not None:
            merged = adapted
            break
    top_unknown = set(merged) - {"model", "load"}
    if top_unknown:
        raise ConfigError(f"unknown top-level config section(s) {sorted(top_unknown)}; expected 'model' and 'load'")
    try:
        dot = _to_container(OmegaConf.from_dotlist(list(overrides))) if overrides else {}
    except Exception as exc:
        raise ConfigError(f"bad override {list(overrides)}: {exc}; write key=value, e.g. model.num_layers=4") from exc
    bad = set(dot) - {"model", "load"}
    if bad:
        raise ConfigError(f"override key(s) {sorted(bad)} must start with 'model.' or 'load.'")

    load = dict(merged.get("load") or {})
    load.update(dot.get("load") or {})
    load.update({k: v for k, v in explicit.items() if v is not None})
    if checkpoint is not None:
        load["checkpoint"] = checkpoint
    unknown = set(load) - LOAD_KEYS
    if unknown:
        raise ConfigError(f"unknown load option(s) {sorted(unknown)}; known: {sorted(LOAD_KEYS)}")

    sources: list = []
    ckpt = load.get("checkpoint")
    carried = formats.model_config(ckpt) if ckpt and os.path.exists(ckpt) else None
    sources.append(carried or {})
    sources += [merged.get("model") or {}, dot.get("model") or {}]
    try:  # deep merge: an override of one nested key (transformer_args.x) keeps its siblings
        model = _to_container(OmegaConf.merge(*(OmegaConf.create(src) for src in sources)))
    except Exception as exc:
        raise ConfigError(f"cannot merge the model config sources (model_config.json, --config, overrides): "
                          f"{exc}") from exc
    hint = (f"{ckpt} carries no model config (SAT writes model_config.json beside 'latest'), and no --config or "
            f"model.KEY=VALUE gives them" if ckpt and not carried else "no --config or model.KEY=VALUE gives them")
    try:
        model_cfg = build_model_config(model, hint)
    except ConfigError:
        if ckpt and not os.path.exists(ckpt):  # the real problem: say so, not that its model config is missing
            raise CheckpointError(f"checkpoint path {ckpt} does not exist (check the path, and that it is "
                                  f"visible from this node)") from None
        raise
    cfg = LoadConfig(model=model_cfg, **load)
    if cfg.tp < 1:
        raise ConfigError(f"--tp must be >= 1, got {cfg.tp}")
    parse_dtype(cfg.dtype)
    if not isinstance(cfg.verify, (bool, str)):
        raise ConfigError(f"load.verify must be true/false or a manifest path, got {cfg.verify!r}")
    if cfg.weights not in ("auto", "module", "fp32"):
        raise ConfigError(f"--weights must be auto, module or fp32, got {cfg.weights!r}")
    if isinstance(cfg.exchange, bool):  # YAML reads a bare `off` / `on` as a boolean
        cfg.exchange = "on" if cfg.exchange else "off"
    if cfg.exchange not in ("auto", "on", "off"):
        raise ConfigError(f"--exchange must be auto, on or off, got {cfg.exchange!r}")
    for key in ("timeout_s", "runtime_timeout_s"):
        value = getattr(cfg, key)
        if value is not None and (not isinstance(value, (int, float)) or value <= 0):
            raise ConfigError(f"--{key[:-2].replace('_', '-')} must be a positive number of seconds, got {value!r}")
    loras = [cfg.lora] if isinstance(cfg.lora, str) else list(cfg.lora or ())
    cfg.lora = [parse_lora_arg(x) for x in loras]
    if not isinstance(cfg.lora_merge, bool):
        raise ConfigError(f"load.lora_merge must be true or false, got {cfg.lora_merge!r}")
    if cfg.lora_alpha is not None and (isinstance(cfg.lora_alpha, bool) or not isinstance(cfg.lora_alpha, (int, float))
                                       or cfg.lora_alpha <= 0):
        raise ConfigError(f"--lora-alpha must be a positive number, got {cfg.lora_alpha!r}")
    if cfg.readers is not None and cfg.readers < 1:
        raise ConfigError(f"load.readers must be >= 1, got {cfg.readers}")
    return cfg
