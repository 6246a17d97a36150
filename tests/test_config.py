"""Config resolution: model_config.json, YAML layers (later wins), key=value overrides, errors."""
import json

import pytest

from sat_dist.config import resolve
from sat_dist.errors import ConfigError
from sat_dist.models.sat_gpt import TransformerConfig


def write(path, text):
    path.write_text(text)
    return str(path)


def test_model_config_json_then_yaml_then_overrides_then_explicit(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model_config.json").write_text(json.dumps({
        "model_class": "BaseModel", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
        "vocab_size": 1000, "max_sequence_length": 32, "layernorm_order": "pre", "model_parallel_size": 2}))
    a = write(tmp_path / "a.yaml", "model:\n  num_layers: 3\nload:\n  tp: 2\n  dtype: fp16\n")
    b = write(tmp_path / "b.yaml", "model:\n  num_layers: 4\n  is_gated_mlp: true\n")
    cfg = resolve(str(ckpt), [a, b], ["model.hidden_size=128", "load.staging_mib=8"], dtype="bf16")
    assert isinstance(cfg.model, TransformerConfig)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.is_gated_mlp) == (4, 128, True)
    assert (cfg.tp, cfg.dtype, cfg.staging_mib, cfg.checkpoint) == (2, "bf16", 8, str(ckpt))
    assert cfg.model.model_parallel_size == 2


def test_yaml_only_model(tmp_path):
    y = write(tmp_path / "m.yaml", "model:\n  num_layers: 1\n  hidden_size: 32\n  num_attention_heads: 2\n"
                                   "  vocab_size: 10\n  max_sequence_length: 8\nload:\n  checkpoint: /x\n")
    cfg = resolve(None, [y])
    assert cfg.checkpoint == "/x" and cfg.model.ffn_size == 128 and cfg.tp == 1


@pytest.mark.parametrize("text,needle", [
    ("model:\n  num_layers: 1\n  hidden: 3\n", "unknown model option 'hidden'"),
    ("modle:\n  num_layers: 1\n", "unknown top-level config section(s) ['modle']"),
    ("load:\n  tpp: 2\n", "unknown load option(s) ['tpp']"),
    ("model:\n  num_layers: 1\n  is_decoder: true\n", "is_decoder=True is not supported"),
    ("model:\n  model_class: ChatGLMModel\n", "model_class 'ChatGLMModel' is not supported"),
    ("model:\n  num_layers: 1\n", "model config is missing"),
    ("model:\n  num_layers: 1\n  hidden_size: 30\n  num_attention_heads: 4\n  vocab_size: 10\n"
     "  max_sequence_length: 8\n", "not divisible by num_attention_heads"),
    ("model:\n  num_layers: 1\n  hidden_size: 32\n  num_attention_heads: 4\n  vocab_size: 10\n"
     "  max_sequence_length: 8\n  layernorm_order: middle\n", "layernorm_order"),
    ("model:\n  num_layers: 1\n  hidden_size: 32\n  num_attention_heads: 4\n  vocab_size: 10\n"
     "  max_sequence_length: 8\nload:\n  dtype: fp8\n", "unknown dtype 'fp8'"),
])
def test_bad_configs_name_the_problem(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        resolve(None, [write(tmp_path / "c.yaml", text)])
    assert needle in str(e.value)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="must start with 'model.' or 'load.'"):
        resolve(None, [], ["num_layers=3"])
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(None, [str(tmp_path / "nope.yaml")])


def test_tp_divisibility_lists_valid_sizes():
    cfg = TransformerConfig(num_layers=1, hidden_size=1920, num_attention_heads=30, vocab_size=10,
                            max_sequence_length=8)
    with pytest.raises(ConfigError, match=r"TP=4 does not divide num_attention_heads=30.*\[1, 2, 3, 5, 6, 10, 15, 30\]"):
        cfg.check_tp(4)
    cfg.check_tp(6)


def test_flat_sat_model_config_json_is_accepted_with_config(tmp_path):
    """`--config model_config.json` (SAT's flat file, as written beside `latest`) is the model section."""
    import json

    path = tmp_path / "model_config.json"
    path.write_text(json.dumps({"model_class": "BaseModel", "num_layers": 2, "hidden_size": 64,
                                "num_attention_heads": 4, "vocab_size": 100, "max_sequence_length": 32}))
    cfg = resolve(None, [str(path)], ["model.num_layers=3"])
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (3, 64)
    path.write_text(json.dumps({"num_layers": 2}))  # no model_class: not taken for a model config
    with pytest.raises(ConfigError):
        resolve(None, [str(path)])
