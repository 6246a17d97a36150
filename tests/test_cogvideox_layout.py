"""CogVideoX DiT on the meta device with the shipped configs' real hyperparameters.

- The full key/shape table equals FORMATS.md §6's, literally (numbers copied from the table), for
  2B, 5B, 5B-I2V, 1.5-5B and 1.5-5B-I2V; persistent buffers are exactly 5B v1.0's freqs tables;
  no module has non-persistent buffers (nothing can be left on meta after a load).
- Per-rank shapes at TP=2 and TP=3 follow SAT's split of the four linears only.
- TP=4 for 2B (30 heads) is refused before any byte is read, listing 1,2,3,5,6,10,15,30.
- CogVideo's own YAML layout (engine sections, args.load, args.bf16) resolves to the DiT only.
- `sat-dist plan` reports per-rank bytes equal to this file's own arithmetic, invalid TP sizes as
  such, and runs without allocating the model.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from cvx_fixtures import CONFIGS, REPO, load_params, local_shape, shape_table, split_rule, write_cogvideo_yaml
from sat_dist.testing.dist import run_ranks
from sat_dist.cli import main as cli_main
from sat_dist.config import resolve
from sat_dist.errors import ConfigError
from sat_dist.models import TPInfo, build_meta_model, check_tp, collect_specs

VARIANTS = ["cogvideox_2b", "cogvideox_5b", "cogvideox_5b_i2v", "cogvideox1.5_5b", "cogvideox1.5_5b_i2v"]


def formats_md_table(variant: str) -> dict[str, tuple[int, ...]]:
    """FORMATS.md §6 "Full key list with shapes", numbers as written there, expanded per layer."""
    v2b = variant == "cogvideox_2b"
    v15 = variant.startswith("cogvideox1.5")
    i2v = variant.endswith("i2v")
    h, L = (1920, 30) if v2b else (3072, 42)
    per_layer = {
        "input_layernorm.weight": (h,), "input_layernorm.bias": (h,),
        "post_attention_layernorm.weight": (h,), "post_attention_layernorm.bias": (h,),
        "attention.query_key_value.weight": (5760, 1920) if v2b else (9216, 3072),
        "attention.query_key_value.bias": (5760,) if v2b else (9216,),
        "attention.dense.weight": (h, h), "attention.dense.bias": (h,),
        "mlp.dense_h_to_4h.weight": (7680, 1920) if v2b else (12288, 3072),
        "mlp.dense_h_to_4h.bias": (7680,) if v2b else (12288,),
        "mlp.dense_4h_to_h.weight": (1920, 7680) if v2b else (3072, 12288),
        "mlp.dense_4h_to_h.bias": (h,),
    }
    t = {f"transformer.layers.{i}.{k}": v for i in range(L) for k, v in per_layer.items()}
    t["transformer.final_layernorm.weight"] = t["transformer.final_layernorm.bias"] = (h,)
    if not v2b:
        t["transformer.position_embeddings.weight"] = (64, 3072)
    if v2b:
        t["mixins.pos_embed.pos_embedding"] = (1, 17776, 1920)
    elif variant == "cogvideox_5b_i2v":
        t["mixins.pos_embed.pos_embedding"] = (1, 17776, 3072)
    if variant in ("cogvideox_5b", "cogvideox_5b_i2v"):
        t["mixins.pos_embed.freqs_sin"] = t["mixins.pos_embed.freqs_cos"] = (17550, 64)
    if v15:
        t["mixins.patch_embed.proj.weight"] = (3072, 256) if i2v else (3072, 128)
    else:
        t["mixins.patch_embed.proj.weight"] = (h, 32 if i2v else 16, 2, 2)
    t["mixins.patch_embed.proj.bias"] = (h,)
    t["mixins.patch_embed.text_proj.weight"], t["mixins.patch_embed.text_proj.bias"] = (h, 4096), (h,)
    for i in range(L):
        t[f"mixins.adaln_layer.adaLN_modulations.{i}.1.weight"] = (23040, 512) if v2b else (36864, 512)
        t[f"mixins.adaln_layer.adaLN_modulations.{i}.1.bias"] = (23040,) if v2b else (36864,)
        for n in ("query", "key"):
            t[f"mixins.adaln_layer.{n}_layernorm_list.{i}.weight"] = (64,)
            t[f"mixins.adaln_layer.{n}_layernorm_list.{i}.bias"] = (64,)
    t["mixins.final_layer.norm_final.weight"] = t["mixins.final_layer.norm_final.bias"] = (h,)
    t["mixins.final_layer.linear.weight"] = (128, 3072) if v15 else (64, h)
    t["mixins.final_layer.linear.bias"] = (128,) if v15 else (64,)
    t["mixins.final_layer.adaLN_modulation.1.weight"] = (3840, 512) if v2b else (6144, 512)
    t["mixins.final_layer.adaLN_modulation.1.bias"] = (3840,) if v2b else (6144,)
    t["time_embed.0.weight"], t["time_embed.0.bias"] = (512, h), (512,)
    t["time_embed.2.weight"], t["time_embed.2.bias"] = (512, 512), (512,)
    if variant == "cogvideox1.5_5b_i2v":
        for j in (0, 2):
            t[f"ofs_embed.{j}.weight"], t[f"ofs_embed.{j}.bias"] = (512, 512), (512,)
    return t


def meta_model(variant: str, tp: int = 1, rank: int = 0):
    cfg = resolve(None, [os.path.join(CONFIGS, variant + ".yaml")])
    return cfg, build_meta_model(cfg.model, TPInfo(tp, rank, None))


@pytest.mark.parametrize("variant", VARIANTS)
def test_meta_key_shape_table_is_formats_md(variant):
    cfg, model = meta_model(variant)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = formats_md_table(variant)
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    assert {k: v for k, v in got.items() if want[k] != v} == {}
    # the generic rule used for the tiny configs reproduces the literal table
    assert shape_table(load_params(variant)) == want
    assert all(t.is_meta for t in model.state_dict().values())
    assert getattr(model, "checkpoint_prefix") == "model.diffusion_model."
    buffers = sorted(n for n, _ in model.named_buffers())
    v1_rope = variant in ("cogvideox_5b", "cogvideox_5b_i2v")
    assert buffers == (["mixins.pos_embed.freqs_cos", "mixins.pos_embed.freqs_sin"] if v1_rope else [])
    assert [n for n, m in model.named_modules() if m._non_persistent_buffers_set] == []
    assert [n for n, p in model.named_parameters() if p.requires_grad] == []


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tp", [2, 3])
def test_per_rank_shapes_follow_sat_split(variant, tp):
    full = formats_md_table(variant)
    split = {k for k in full if split_rule(k)}
    assert len(split) == 6 * (30 if variant == "cogvideox_2b" else 42)  # qkv w+b, dense w, h4h w+b, 4hh w
    for rank in range(tp):
        _, model = meta_model(variant, tp, rank)
        got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert got == {k: local_shape(k, v, tp) for k, v in full.items()}, (variant, tp, rank)
        specs = collect_specs(model)
        assert {k for k, s in specs.items() if not s.layout.replicated} == split


def test_tp_must_divide_heads():
    cfg2b, _ = meta_model("cogvideox_2b")
    ok2b = [1, 2, 3, 5, 6, 10, 15, 30]
    for tp in ok2b:
        check_tp(cfg2b.model, tp)
    for tp in (4, 7, 8, 12):
        with pytest.raises(ConfigError) as exc:
            check_tp(cfg2b.model, tp)
        assert f"TP={tp} does not divide num_attention_heads=30" in str(exc.value)
        assert str(ok2b) in str(exc.value)
    cfg5b, _ = meta_model("cogvideox_5b")
    for tp in (1, 2, 3, 4, 6, 8, 12, 16, 24, 48):
        check_tp(cfg5b.model, tp)
    with pytest.raises(ConfigError, match=r"\[1, 2, 3, 4, 6, 8, 12, 16, 24, 48\]"):
        check_tp(cfg5b.model, 5)


def _load_expect_error(rank, path, config):
    import sat_dist

    try:
        sat_dist.load_model(path, config, tp=4)
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return None, None


def test_tp4_for_2b_refused_before_reading(tmp_path):
    # The folder has no 'latest' and no mp_rank file: any attempt to read it would fail differently.
    empty = tmp_path / "transformer"
    empty.mkdir()
    out = run_ranks(4, _load_expect_error, str(empty), os.path.join(CONFIGS, "cogvideox_2b.yaml"))
    for r in out:
        kind, msg = r.value
        assert kind == "GroupLoadError", msg
        assert "during 'plan'" in msg and "TP=4 does not divide num_attention_heads=30" in msg
        assert "[1, 2, 3, 5, 6, 10, 15, 30]" in msg and "no 'latest'" not in msg
        assert msg == out[0].value[1]  # the same agreed error on every rank


def test_cogvideo_layout_unchanged_files(tmp_path):
    """CogVideo's model YAML + inference.yaml, engine sections and all: only the DiT is taken,
    args.load becomes the checkpoint, args.bf16 the dtype; explicit arguments still win."""
    model_yaml = write_cogvideo_yaml(str(tmp_path / "cogvideox_5b.yaml"), load_params("cogvideox_5b"))
    inference = tmp_path / "inference.yaml"
    inference.write_text(
        "args:\n  latent_channels: 16\n  mode: inference\n  load: /ckpts/CogVideoX-5b-sat/transformer\n"
        "  batch_size: 1\n  input_type: txt\n  input_file: configs/test.txt\n  sampling_num_frames: 13\n"
        "  sampling_fps: 8\n  bf16: True\n  output_dir: outputs/\n  force_inference: True\n")
    cfg = resolve(None, [model_yaml, str(inference)])
    assert cfg.checkpoint == "/ckpts/CogVideoX-5b-sat/transformer" and cfg.dtype == "bf16"
    assert cfg.model.model_class == "DiffusionTransformer" and cfg.model.num_layers == 42
    cfg = resolve("/elsewhere", [model_yaml, str(inference)], ["model.num_layers=2"], dtype="fp32", tp=2)
    assert (cfg.checkpoint, cfg.dtype, cfg.tp, cfg.model.num_layers) == ("/elsewhere", "fp32", 2, 2)


@pytest.mark.parametrize("params,needle", [
    ({"modules": {"lora_config": {"target": "sat.model.finetune.lora.LoraMixin"}}}, "target must be one of"),
    ({"modules": {"lora_config": {"target": "sat.model.finetune.lora2.LoraMixin", "params": {"rank": 4}}}},
     "unknown option(s) ['rank']"),
    ({"modules": {"lora_config": {"target": "sat.model.finetune.lora2.LoraMixin", "params": {"qlora": True}}}},
     "4-bit"),
    ({"use_RMSNorm": True}, "use_RMSNorm=True is not supported"),
    ({"transformer_args": {"is_decoder": True}}, "is_decoder=True is not supported"),
    ({"transformer_args": {"layernorm_epsilno": 1e-6}}, "unknown option(s) ['layernorm_epsilno']"),
    ({"patch_size": [2, 2]}, "patch_size must be an int"),
    ({"pos_params": {"text_lenght": 226}}, "unknown option(s) ['text_lenght']"),
    ({"hidden_size": 384, "pos_params": {"hidden_size_head": 8}}, "they are [2, 3, 3], which do not make 8 in even"),
])
def test_bad_configs_are_named(tmp_path, params, needle):
    p = load_params("cogvideox_5b")
    for k, v in params.items():
        if k == "modules":
            p["modules"] = {**p["modules"], **v}
        elif k == "transformer_args":
            p["transformer_args"] = {**p["transformer_args"], **v}
        elif k == "pos_params":
            p["modules"]["pos_embed_config"]["params"].update(v)
        else:
            p[k] = v
    path = write_cogvideo_yaml(str(tmp_path / "bad.yaml"), p)
    with pytest.raises(ConfigError) as exc:
        resolve(None, [path])
    assert needle in str(exc.value)


def _expected_rank_bytes(variant: str, tp: int, itemsize: int) -> tuple[int, int]:
    full = formats_md_table(variant)
    split = sum(torch.Size(local_shape(k, v, tp)).numel() for k, v in full.items() if split_rule(k)) * itemsize
    rep = sum(torch.Size(v).numel() for k, v in full.items() if not split_rule(k)) * itemsize
    return split, rep


@pytest.mark.parametrize("variant,dtype,itemsize", [("cogvideox_2b", "fp16", 2), ("cogvideox_5b", "bf16", 2),
                                                    ("cogvideox1.5_5b", "bf16", 2)])
def test_plan_cli_bytes(variant, dtype, itemsize, capsys):
    latent = ["--latent", "22", "96", "170"] if variant.startswith("cogvideox1.5") else []
    rc = cli_main(["plan", "--config", os.path.join(CONFIGS, variant + ".yaml"), "--tp", "1", "2", "3", "4", "5",
                   "6", "7", "8", "--dtype", dtype, "--json", *latent])
    assert rc == 0
    plan = json.loads(capsys.readouterr().out)
    heads = 30 if variant == "cogvideox_2b" else 48
    rows = {r["tp"]: r for r in plan["rows"]}
    for tp in range(1, 9):
        r = rows[tp]
        if heads % tp:
            assert not r["valid"] and f"TP={tp} does not divide num_attention_heads={heads}" in r["reason"]
            continue
        split, rep = _expected_rank_bytes(variant, tp, itemsize)
        assert (r["valid"], r["split_bytes"], r["replicated_bytes"], r["param_bytes"]) == (True, split, rep, split + rep)
        assert r["device_bytes"] == r["param_bytes"] + r["activation_bytes"] > r["param_bytes"]
    assert plan["total_bytes"] == sum(torch.Size(v).numel() for v in formats_md_table(variant).values()) * itemsize


def _plan_json(capsys, *argv) -> dict:
    assert cli_main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _plan_error(capsys, *argv) -> str:
    assert cli_main(["plan", *argv]) == 1
    return capsys.readouterr().err


def test_plan_activation_sample_size(capsys):
    """1.0: the configured size (13x60x90 latent, 226 text tokens for 2B). 1.5: the config holds only
    the RoPE table's maximum, so no estimate without --latent; with it, SAT's token count."""
    two_b = _plan_json(capsys, "--config", os.path.join(CONFIGS, "cogvideox_2b.yaml"), "--tp", "1")
    assert "2 x 17776 tokens" in two_b["activation_note"]  # 226 + 13 * 30 * 45
    c15 = os.path.join(CONFIGS, "cogvideox1.5_5b.yaml")
    plan = _plan_json(capsys, "--config", c15, "--tp", "1", "2")
    assert plan["activation_note"].startswith("n/a") and "--latent" in plan["activation_note"]
    assert all(r["activation_bytes"] is None and r["device_bytes"] is None for r in plan["rows"])
    plan = _plan_json(capsys, "--config", c15, "--tp", "1", "2", "--latent", "22", "96", "170", "--batch", "1")
    assert "1 x 45104 tokens" in plan["activation_note"]  # 224 + (22/2) * (96/2) * (170/2)
    h, ffn = 3072, 4 * 3072
    for r in plan["rows"]:
        assert r["activation_bytes"] == 45104 * (4 * h + 2 * ffn // r["tp"] + 3 * h // r["tp"]) * 2
    err = _plan_error(capsys, "--config", os.path.join(CONFIGS, "cogvideox_5b.yaml"), "--latent", "13", "96", "170")
    assert "runs only at its configured latent size 60x90" in err


def test_plan_takes_the_config_dtype_and_overrides_anywhere(capsys):
    """Shipped configs carry CogVideo's args.fp16/bf16; key=value words may follow --config or --tp."""
    c5 = os.path.join(CONFIGS, "cogvideox_5b.yaml")
    plan = _plan_json(capsys, "--config", c5, "model.num_layers=2", "--tp", "1", "2")
    assert plan["dtype"] == "bf16"
    assert _plan_json(capsys, "--config", c5, "--tp", "1", "2", "model.num_layers=2") == plan
    full = _plan_json(capsys, "--config", c5, "--tp", "1", "2")
    assert plan["total_params"] < full["total_params"] / 10  # 2 layers instead of 42
    assert _plan_json(capsys, "--config", os.path.join(CONFIGS, "cogvideox_2b.yaml"), "--tp", "1")["dtype"] == "fp16"
    bad = _plan_json(capsys, "--config", c5, "--tp", "0", "4")
    assert not bad["rows"][0]["valid"] and "TP must be >= 1" in bad["rows"][0]["reason"]
    assert "--batch must be >= 1" in _plan_error(capsys, "--config", c5, "--batch", "0")


def test_nested_override_keeps_its_siblings():
    """model.transformer_args.x=... changes one key; the rest of transformer_args stays as configured."""
    c5 = os.path.join(CONFIGS, "cogvideox_5b.yaml")
    base = resolve(None, [c5]).model
    cfg = resolve(None, [c5], ["model.transformer_args.layernorm_epsilon=1e-6",
                               "model.modules.pos_embed_config.params.theta=5000"]).model
    assert cfg.arch.ln_eps == 1e-6 and cfg.arch.theta == 5000
    assert cfg.transformer_args == {**base.transformer_args, "layernorm_epsilon": 1e-6}
    assert (cfg.arch.max_seq, cfg.arch.ln_order, cfg.arch.heads) == (base.arch.max_seq, base.arch.ln_order, 48)


def test_plan_does_not_allocate():
    """The 5B plan in a fresh process: peak RSS stays far below the 10.4 GiB the weights would take."""
    code = ("import resource, sys; from sat_dist.cli import main; "
            "rc = main(['plan', '--config', sys.argv[1], '--tp', '1', '2', '4', '8', '--dtype', 'bf16']); "
            "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, os.path.join(CONFIGS, "cogvideox_5b.yaml")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rss = int(out.stdout.split("RSS")[-1])
    assert rss < 1.5 * (1 << 30), rss
    assert "invalid" not in out.stdout and "10.38 GiB in bf16" in out.stdout


def test_v1_top_level_interpolation_is_refused_not_ignored():
    """SAT's 1.0 DiT never passes its top-level *_interpolation to Basic3D: a value there would be
    silently unused, so it is an error pointing at modules.pos_embed_config.params."""
    c2 = os.path.join(CONFIGS, "cogvideox_2b.yaml")
    assert resolve(None, [c2]).model.arch.interp == (1.875, 1.875, 1.0)  # from pos_embed_config.params
    with pytest.raises(ConfigError, match="ignores it .* modules.pos_embed_config.params"):
        resolve(None, [c2], ["model.height_interpolation=2.0"])
