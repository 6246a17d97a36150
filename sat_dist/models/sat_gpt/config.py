"""SAT BaseModel / GPT2Model architecture arguments: the family's config schema.

Names are exactly SAT's (`sat/arguments.py`, THUDM/SwissArmyTransformer), so a checkpoint's own
`model_config.json` is read as written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...errors import ConfigError
from ..family import check_tp_divides


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
