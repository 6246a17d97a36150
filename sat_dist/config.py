"""One validated LoadConfig from model_config.json, YAML files and key=value overrides.

Sources merge with OmegaConf, later wins: the checkpoint's `model_config.json` (SAT writes it),
then each `--config` YAML, then `key=value` overrides, then explicit arguments (--tp, --dtype).
Unknown keys are errors that name the key: a typo must not silently load a different model.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from .errors import ConfigError

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


def check_tp_divides(tp: int, limits: dict[str, int]) -> None:
    """Refuse a TP size that does not divide every split dimension, saying which sizes work
    (shared by every model config's `check_tp`)."""
    ok = [n for n in range(1, min(limits.values()) + 1) if all(v % n == 0 for v in limits.values())]
    if tp < 1:
        raise ConfigError(f"TP must be >= 1, got {tp}; TP sizes that work for this model: {ok}")
    bad = {k: v for k, v in limits.items() if v % tp}
    if bad:
        what = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise ConfigError(f"TP={tp} does not divide {what}; TP sizes that work for this model: {ok}")


@dataclass
class TransformerConfig:
    """SAT BaseModel / BaseTransformer architecture arguments (names exactly as SAT's)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    max_sequence_length: int
    model_class: str = "BaseModel"
    model_parallel_size: int = 1  # the TP size the checkpoint was saved with (informative)
    inner_hidden_size: Optional[int] = None
    hidden_size_per_attention_head: Optional[int] = None
    num_multi_query_heads: int = 0
    is_gated_mlp: bool = False
    use_bias: bool = True
    use_qkv_bias: bool = False
    use_final_layernorm: bool = True
    layernorm_order: str = "pre"
    layernorm_epsilon: float = 1e-5
    is_rotary_emb: bool = False
    parallel_output: bool = False
    tokenizer_type: Optional[str] = None  # recorded by SAT, irrelevant to loading

    # SAT options that change the weights in ways this loader does not implement: refused by
    # name when set to anything but SAT's default, rather than loaded wrongly.
    UNSUPPORTED = {
        "is_decoder": False, "cross_attn_hidden_size": None, "cross_hidden_size_per_attention_head": None,
        "cross_num_multi_query_heads": 0, "num_experts": 1, "row_parallel_linear_final_bias": True,
    }

    @property
    def head_dim(self) -> int:
        return self.hidden_size_per_attention_head or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        return self.inner_hidden_size or 4 * self.hidden_size

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_sequence_length"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size_per_attention_head is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; set hidden_size_per_attention_head"
            )
        if self.num_multi_query_heads and self.num_attention_heads % self.num_multi_query_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_multi_query_heads {self.num_multi_query_heads}"
            )
        if self.layernorm_order not in ("pre", "post", "sandwich"):
            raise ConfigError(f"layernorm_order must be pre, post or sandwich, got {self.layernorm_order!r}")

    def check_tp(self, tp: int) -> None:
        """Say which TP sizes work before any rank reads a byte."""
        limits = {"num_attention_heads": self.num_attention_heads, "inner_hidden_size (MLP width)": self.ffn_size}
        if self.num_multi_query_heads:
            limits["num_multi_query_heads"] = self.num_multi_query_heads
        if self.vocab_size >= 1000:  # SAT uses a replicated nn.Embedding below 1000
            limits["vocab_size"] = self.vocab_size
        check_tp_divides(tp, limits)


# model_class -> config dataclass. Other model families register here (see models/__init__.py).
MODEL_CONFIGS: dict[str, type] = {
    "BaseModel": TransformerConfig,
    "GPT2Model": TransformerConfig,
}


@dataclass
class LoadConfig:
    """Everything one load needs; the same on every rank."""

    model: Any
    checkpoint: Optional[str] = None
    tp: int = 1
    dtype: Optional[str] = None  # None: keep the stored dtype
    device: Optional[str] = None  # None: cuda:LOCAL_RANK if CUDA is present, else cpu
    timeout_s: float = 300.0
    staging_mib: int = 64  # host staging buffer: bounds host memory during reads
    tag: Optional[str] = None  # iteration folder to load instead of `latest`
    weights: str = "auto"  # DeepSpeed ZeRO-1/2: auto|module = module weights, fp32 = fp32 master partitions
    report: Optional[str] = None

    @property
    def torch_dtype(self) -> Optional[torch.dtype]:
        return parse_dtype(self.dtype)


LOAD_KEYS = {f.name for f in dataclasses.fields(LoadConfig)} - {"model"}


def _to_container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


# Hooks that turn a foreign YAML layout (e.g. CogVideo's) into {"model": ..., "load": ...}.
# Each takes the merged dict and returns a normalised dict or None if it does not recognise it.
LAYOUT_ADAPTERS: list[Callable[[dict], Optional[dict]]] = []


def build_model_config(model: dict) -> Any:
    model = dict(model)
    cls_name = model.get("model_class", "BaseModel")
    if cls_name not in MODEL_CONFIGS:
        raise ConfigError(
            f"model_class {cls_name!r} is not supported; supported: {sorted(MODEL_CONFIGS)}"
        )
    cls = MODEL_CONFIGS[cls_name]
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
        raise ConfigError(f"model config is missing {missing} (no model_config.json in the checkpoint and no --config?)")
    cfg = cls(**model)
    cfg.validate()
    return cfg


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
        layers.append(OmegaConf.load(path))
    merged = _to_container(OmegaConf.merge(*layers)) if layers else {}
    for adapter in LAYOUT_ADAPTERS:
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
    if ckpt:
        json_path = os.path.join(ckpt, "model_config.json")
        if os.path.isfile(json_path):
            with open(json_path) as f:
                sources.append(json.load(f))
    sources += [merged.get("model") or {}, dot.get("model") or {}]
    try:  # deep merge: an override of one nested key (transformer_args.x) keeps its siblings
        model = _to_container(OmegaConf.merge(*(OmegaConf.create(src) for src in sources)))
    except Exception as exc:
        raise ConfigError(f"cannot merge the model config sources (model_config.json, --config, overrides): "
                          f"{exc}") from exc
    cfg = LoadConfig(model=build_model_config(model), **load)
    if cfg.tp < 1:
        raise ConfigError(f"--tp must be >= 1, got {cfg.tp}")
    parse_dtype(cfg.dtype)
    if cfg.weights not in ("auto", "module", "fp32"):
        raise ConfigError(f"--weights must be auto, module or fp32, got {cfg.weights!r}")
    return cfg
