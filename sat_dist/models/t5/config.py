"""The HF T5 encoder's architecture arguments: the family's config schema.

Field names, defaults and the activation rule are transformers' `T5Config`
(huggingface/transformers src/transformers/models/t5/configuration_t5.py), so the values of a T5
`config.json` are read as written (`formats.hf_t5.model_config` passes on the fields that matter to
the encoder and drops the decoder/generation/bookkeeping ones).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...errors import ConfigError
from ..family import check_tp_divides

MODEL_CLASS = "T5EncoderModel"
# transformers' ACT2FN names this encoder implements (src/transformers/activations.py)
ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish")


@dataclass
class T5Config:
    """transformers' T5Config, encoder part. `dense_act_fn` / `is_gated_act`, when a config.json
    holds them, win over `feed_forward_proj`, as in transformers (its config applies saved keys
    after deriving them)."""

    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    vocab_size: int
    model_class: str = MODEL_CLASS
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu" (T5) | "gated-gelu" (T5 v1.1, t5-v1_1-xxl) | "[gated-]ACT"
    dense_act_fn: Optional[str] = None  # None: derived from feed_forward_proj
    is_gated_act: Optional[bool] = None  # None: derived from feed_forward_proj

    # config.json fields that would change the encoder's weights or its forward in ways this
    # encoder does not implement: refused by name unless they hold the only value supported.
    # is_decoder=True makes T5Stack causal with cross-attention (layer.1 EncDecAttention);
    # pruned_heads shrinks q/k/v/o; quantization_config means the files hold quantized weights.
    UNSUPPORTED = {"is_decoder": False, "pruned_heads": {}, "quantization_config": None}

    @property
    def act(self) -> str:
        """The activation's ACT2FN name, as T5Config derives it ("gated-gelu" -> gelu_new)."""
        if self.dense_act_fn is not None:
            return self.dense_act_fn
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    @property
    def gated(self) -> bool:
        if self.is_gated_act is not None:
            return bool(self.is_gated_act)
        return self.feed_forward_proj.split("-")[0] == "gated"

    def validate(self) -> None:
        for name in ("d_model", "d_kv", "d_ff", "num_layers", "num_heads", "vocab_size",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ConfigError(f"model.feed_forward_proj {self.feed_forward_proj!r} is not 'ACT' or 'gated-ACT' "
                              f"(T5: 'relu', T5 v1.1: 'gated-gelu')")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"T5 activation {self.act!r} (feed_forward_proj={self.feed_forward_proj!r}, "
                              f"dense_act_fn={self.dense_act_fn!r}) is not supported; supported: {list(ACTIVATIONS)}")

    def check_tp(self, tp: int) -> None:
        """q/k/v/o split by heads, wi/wo by d_ff; the embedding is replicated (vocab not split)."""
        check_tp_divides(tp, {"num_heads": self.num_heads, "d_ff": self.d_ff})
