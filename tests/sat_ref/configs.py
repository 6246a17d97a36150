"""Model configurations checked against the real SwissArmyTransformer package.

Plain Python (no torch): imported both by the SAT-side generator (run with `.venv-sat/bin/python`
under torchrun) and by `tests/test_sat_reference.py` (run in `.venv`), so both sides agree on
the names and on which TP sizes each config allows.

Each entry is the set of SAT `BaseModel` arguments that differ from the base below (the names are
SAT's own `args` attributes). `dtype` is ours: the model is built in fp32, filled with
deterministic random weights, then cast (as SAT's `get_model` does for `--bf16`).
`forward`: whether SAT's mp=1 logits are dumped and compared (fp32 only).
"""
from __future__ import annotations

BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=1024,
            max_sequence_length=32, layernorm_order="pre")

# vocab_size < 1000 -> SAT builds a plain, replicated nn.Embedding; >= 1000 -> VocabParallelEmbedding.
CONFIGS: dict[str, dict] = {
    "plain_small_vocab": dict(vocab_size=100),
    "plain_vocab_parallel": dict(),
    "gqa_kv4": dict(num_attention_heads=8, num_multi_query_heads=4),
    "gqa_kv2_small_vocab": dict(num_attention_heads=8, num_multi_query_heads=2, vocab_size=100),
    "gated_mlp": dict(is_gated_mlp=True, inner_hidden_size=96),
    "qkv_bias_only": dict(use_bias=False, use_qkv_bias=True),
    "sandwich": dict(layernorm_order="sandwich", vocab_size=100),
    "post": dict(layernorm_order="post"),
    "no_final_ln_headdim": dict(use_final_layernorm=False, layernorm_epsilon=1e-6,
                                hidden_size_per_attention_head=32),
    "rotary": dict(is_rotary_emb=True),
    "bf16": dict(dtype="bfloat16"),
}

TP_SIZES = (1, 2, 4)
SAVED_MP = (1, 2)
SEED = 1234
BATCH, SEQ = 2, 8


def full_config(name: str) -> dict:
    cfg = dict(BASE)
    cfg.update(CONFIGS[name])
    cfg.setdefault("dtype", "float32")
    return cfg


def has_forward(name: str) -> bool:
    return full_config(name)["dtype"] == "float32"


def allowed_tp(name: str, tp: int) -> bool:
    """SAT's own divisibility rules (mpu.utils.divide): heads, kv heads, MLP width, and the vocab
    when it is a VocabParallelEmbedding."""
    c = full_config(name)
    ffn = c.get("inner_hidden_size") or 4 * c["hidden_size"]
    ok = c["num_attention_heads"] % tp == 0 and ffn % tp == 0
    ok = ok and c.get("num_multi_query_heads", 0) % tp == 0
    if c["vocab_size"] >= 1000:
        ok = ok and c["vocab_size"] % tp == 0
    return ok


def tps(name: str) -> list[int]:
    return [tp for tp in TP_SIZES if allowed_tp(name, tp)]
