"""LoRA conversion (sat_dist/lora/export.py, sat_dist/lora/fetch.py, `sat-dist convert`): tiny CogVideoX DiTs
written by the test side (cvx_fixtures), SAT LoraMixin checkpoints built here the way SAT saves them (the base
under `….original.*`, `matrix_A.i` [r, in] / `matrix_B.i` [rows_i, r], at mp 2 QKV's matrix_B split by rows and
dense's matrix_A by columns), PEFT files written with safetensors.

* SAT LoRA (mp 1 and 2) -> `--to diffusers-lora` -> `load_model(base, lora=[file])` has, at TP 1 and 2, the
  per-rank state-dict digests of `load_model(sat_lora_ckpt, lora_alpha=A)` (forked gloo ranks).
* The exported file loads in diffusers (CogVideoXTransformer3DModel of the same config, diffusers' own LoRA
  loader): every module the file names is adapted, and fused - base = (alpha / r) B @ A.
* A 42-layer LoRA exports 42 * 8 keys and comes back through `--to sat-lora` with the same factors.
* diffusers LoRA (to_k missing in a layer) -> `--to sat-lora` -> load == the direct load of the diffusers LoRA.
* `convert --to safetensors --lora X:0.8` == `load_model(base, lora=[(X, 0.8)])` (torch.equal); a LoraMixin
  fine-tune `--to sat` is a plain merged checkpoint equal to loading the fine-tune.
* A LoRA for another model fails the convert before anything is written; ff targets and mixed ranks are
  refused by `--to sat-lora`.
"""
from __future__ import annotations

import glob
import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import sat_dist
from cvx_fixtures import PREFIX, random_weights, sat_split, shape_table, tiny_params, write_cogvideo_yaml
from sat_dist.cli import main as cli_main
from sat_dist.convert import convert
from sat_dist.errors import LoraError
from sat_dist.formats.diffusers_map import NOT_STORED
from sat_dist.lora.export import export_lora
from sat_dist.report import state_dict_digest
from sat_dist.testing.dist import run_ranks, values

R = 2
ALPHA = 3.0
QKV, DENSE = "attention.query_key_value", "attention.dense"


def _factors(params: dict, seed: int, r: int = R) -> dict[str, torch.Tensor]:
    """LoraMixin factors of every layer (SAT names, no prefix, full tensors)."""
    h, g = params["hidden_size"], torch.Generator().manual_seed(seed)
    out = {}
    for i in range(params["num_layers"]):
        for lin, parts in ((QKV, 3), (DENSE, 1)):
            for j in range(parts):
                out[f"transformer.layers.{i}.{lin}.matrix_A.{j}"] = torch.randn(r, h, generator=g) * 0.2
                out[f"transformer.layers.{i}.{lin}.matrix_B.{j}"] = torch.randn(h, r, generator=g) * 0.2
    return out


def _sat_lora_shard(name: str, t: torch.Tensor, mp: int, k: int) -> torch.Tensor:
    """SAT's mp split of a LoraMixin factor: QKV's B by rows, dense's A by columns (LoraLinear's sizes)."""
    if mp == 1:
        return t.clone()
    if f"{QKV}.matrix_B." in name:
        return t.chunk(mp, 0)[k].clone()
    if f"{DENSE}.matrix_A." in name:
        return t.chunk(mp, 1)[k].clone()
    return t.clone()


def write_ckpt(root: str, full: dict, mp: int, factors: dict | None = None) -> str:
    """`root/latest` + `root/1/mp_rank_XX_model_states.pt`: the plain base, or (factors) a LoraMixin fine-tune."""
    os.makedirs(os.path.join(root, "1"), exist_ok=True)
    for k in range(mp):
        module = {}
        for name, t in full.items():
            lin = name.rsplit(".", 1)[0]
            stored = name
            if factors is not None and lin.endswith((QKV, DENSE)) and ".layers." in lin:
                stored = f"{lin}.original.{name.rsplit('.', 1)[1]}"
            module[PREFIX + stored] = sat_split(name, t, mp, k)
        for name, t in (factors or {}).items():
            module[PREFIX + name] = _sat_lora_shard(name, t, mp, k)
        torch.save({"module": module}, os.path.join(root, "1", f"mp_rank_{k:02d}_model_states.pt"))
    with open(os.path.join(root, "latest"), "w") as fh:
        fh.write("1")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny 2-layer DiT (2 heads: TP 2), its base checkpoint, SAT LoRA fine-tunes at mp 1 and 2, its YAML."""
    base = tmp_path_factory.mktemp("lora_convert")
    params = tiny_params("5b", heads=2, head_dim=16, layers=2)  # head_dim 8: see the report (diffusers RoPE)
    full = random_weights(shape_table(params), seed=3)
    factors = _factors(params, seed=4)
    out = {"dir": base, "params": params, "full": full, "factors": factors,
           "yaml": write_cogvideo_yaml(str(base / "model.yaml"), params),
           "base": write_ckpt(str(base / "base"), full, 1)}
    for mp in (1, 2):
        out[f"sat{mp}"] = write_ckpt(str(base / f"sat_lora_mp{mp}"), full, mp, factors)
    return out


def _digests(rank, path, config, tp, kw):
    model = sat_dist.load_model(str(path), config, tp=tp, **kw)
    return state_dict_digest(model.state_dict())


def digests(path, config, tp, **kw):
    return values(run_ranks(tp, _digests, str(path), config, tp, kw))


def _state(rank, path, config, kw):
    return {k: v.detach().clone() for k, v in sat_dist.load_model(str(path), config, **kw).state_dict().items()}


def state(path, config=None, **kw):
    return values(run_ranks(1, _state, str(path), config, kw))[0]


def _convert(rank, src, dst, to, kw):
    return convert(src, dst, to, **kw).to_dict()


def conv(src, dst, to, **kw):
    return values(run_ranks(1, _convert, str(src), str(dst), to, kw))[0]


def peft_file(path: str, params: dict, seed: int, r: int = R, alpha: float = 6.0, skip=(), layers=None,
              modules=("to_q", "to_k", "to_v", "to_out.0")) -> str:
    """A diffusers/PEFT LoRA as save_lora_weights writes it (keys `transformer.…`, header metadata)."""
    h, g = params["hidden_size"], torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(params["num_layers"] if layers is None else layers):
        for m in modules:
            if (i, m) in skip:
                continue
            rows = 4 * h if m == "ff.net.0.proj" else h
            sd[f"transformer.transformer_blocks.{i}.attn1.{m}.lora_A.weight" if "ff" not in m else
               f"transformer.transformer_blocks.{i}.{m}.lora_A.weight"] = torch.randn(r, h, generator=g) * 0.2
            sd[f"transformer.transformer_blocks.{i}.attn1.{m}.lora_B.weight" if "ff" not in m else
               f"transformer.transformer_blocks.{i}.{m}.lora_B.weight"] = torch.randn(rows, r, generator=g) * 0.2
    meta = {"transformer.r": r, "transformer.lora_alpha": alpha, "transformer.target_modules": list(modules)}
    save_file(sd, path, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    return path


# --------------------------------------------------------------------------- SAT -> diffusers -> load

@pytest.mark.parametrize("mp", [1, 2])
def test_sat_lora_to_diffusers_round_trip(tiny, mp):
    out = str(tiny["dir"] / f"exported_mp{mp}.safetensors")
    rep = export_lora(tiny[f"sat{mp}"], out, "diffusers-lora", alpha=ALPHA, model_config=tiny["yaml"])
    assert (rep.r, rep.lora_alpha, rep.scale) == (R, ALPHA, ALPHA / R) and rep.pairs == 2 * 4
    sd = load_file(out)
    assert len(sd) == 2 * 8
    f = tiny["factors"]
    for i in range(2):
        for j, m in enumerate("qkv"):
            assert torch.equal(sd[f"transformer.transformer_blocks.{i}.attn1.to_{m}.lora_A.weight"],
                               f[f"transformer.layers.{i}.{QKV}.matrix_A.{j}"])
            assert torch.equal(sd[f"transformer.transformer_blocks.{i}.attn1.to_{m}.lora_B.weight"],
                               f[f"transformer.layers.{i}.{QKV}.matrix_B.{j}"])
        assert torch.equal(sd[f"transformer.transformer_blocks.{i}.attn1.to_out.0.lora_A.weight"],
                           f[f"transformer.layers.{i}.{DENSE}.matrix_A.0"])
    from lora_fixtures import lora_metadata

    meta = lora_metadata(out)
    assert meta["transformer.r"] == R and meta["transformer.lora_alpha"] == ALPHA
    assert sorted(meta["transformer.target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]
    for tp in (1, 2):
        want = digests(tiny[f"sat{mp}"], tiny["yaml"], tp, lora_alpha=ALPHA)
        got = digests(tiny["base"], tiny["yaml"], tp, lora=[out])
        assert got == want, f"mp{mp} tp{tp}"
    assert digests(tiny["base"], tiny["yaml"], 1) != want  # the LoRA changes the model


def test_exported_lora_loads_in_diffusers(tiny):
    """diffusers' own loader on a CogVideoXTransformer3DModel of the same config: every module adapted, fused
    weight - base = alpha / r * B @ A."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel
    from lora_fixtures import peft_scale

    from sat_dist.formats.diffusers_map import diffusers_config

    out = str(tiny["dir"] / "for_diffusers.safetensors")
    export_lora(tiny["sat2"], out, "diffusers-lora", alpha=ALPHA, model_config=tiny["yaml"])
    cfg = diffusers_config({"model_class": "DiffusionTransformer", **tiny["params"]})
    model = CogVideoXTransformer3DModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")}).eval()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state_dict, metadata = CogVideoXPipeline.lora_state_dict(os.path.dirname(out), weight_name=os.path.basename(out),
                                                             return_lora_metadata=True)
    CogVideoXPipeline.load_lora_into_transformer(state_dict, transformer=model, adapter_name="x", metadata=metadata)
    model.fuse_lora(lora_scale=1.0)
    sd = load_file(out)
    modules = sorted({k[len("transformer."):].rsplit(".lora_", 1)[0] for k in sd})
    assert len(modules) == 8
    for m in modules:
        fused = model.get_submodule(m).base_layer.weight.detach().double()
        ba = sd[f"transformer.{m}.lora_B.weight"].double() @ sd[f"transformer.{m}.lora_A.weight"].double()
        torch.testing.assert_close(fused - base[m + ".weight"].double(), ALPHA / R * ba, atol=1e-6, rtol=1e-5)
    assert abs(peft_scale(out, 1.0) - ALPHA / R) < 1e-6


def test_42_layer_lora(tmp_path, capsys):
    params = tiny_params("5b", heads=1, head_dim=16, layers=42)
    yaml_path = write_cogvideo_yaml(str(tmp_path / "model.yaml"), params)
    full = random_weights(shape_table(params), seed=5)
    factors = _factors(params, seed=6)
    src = write_ckpt(str(tmp_path / "sat"), full, 2, factors)
    out = str(tmp_path / "lora42.safetensors")
    rep = export_lora(src, out, "diffusers-lora", alpha=ALPHA, model_config=yaml_path)
    sd = load_file(out)
    assert len(sd) == 42 * 8 == len(rep.keys)
    assert "transformer.transformer_blocks.41.attn1.to_v.lora_B.weight" in sd
    back = str(tmp_path / "back")
    rep2 = export_lora(out, back, "sat-lora", model_config=yaml_path)
    assert rep2.lora_alpha == ALPHA and rep2.r == R and not rep2.zero_filled
    module = torch.load(os.path.join(back, "1", "mp_rank_00_model_states.pt"), weights_only=True)["module"]
    assert sorted(module) == sorted(PREFIX + k for k in factors)
    assert all(torch.equal(module[PREFIX + k], v) for k, v in factors.items())
    assert json.load(open(os.path.join(back, "lora_config.json")))["lora_alpha"] == ALPHA
    # the CLI without --lora-alpha (and a YAML without lora_config): refused, nothing written — SAT saves the
    # alpha nowhere, and a guessed one would write a LoRA of the wrong scale; with it, the metadata holds it
    capsys.readouterr()
    assert cli_main(["convert", src, str(tmp_path / "cli.safetensors"), "--to", "diffusers-lora",
                     "--config", yaml_path]) == 1
    assert "pass --lora-alpha" in capsys.readouterr().err and not os.path.exists(tmp_path / "cli.safetensors")
    assert cli_main(["convert", src, str(tmp_path / "cli.safetensors"), "--to", "diffusers-lora",
                     "--config", yaml_path, "--lora-alpha", "3"]) == 0
    assert "lora_alpha 3 (given)" in capsys.readouterr().out
    from lora_fixtures import lora_metadata

    assert lora_metadata(str(tmp_path / "cli.safetensors"))["transformer.lora_alpha"] == 3


# --------------------------------------------------------------------------- diffusers -> SAT -> load

def test_diffusers_lora_to_sat_lora_loads_the_same(tiny):
    src = peft_file(str(tiny["dir"] / "peft.safetensors"), tiny["params"], seed=7, skip={(0, "to_k")})
    dst = str(tiny["dir"] / "peft_as_sat")
    rep = export_lora(src, dst, "sat-lora", model_config=tiny["yaml"])
    assert rep.zero_filled == [f"transformer.layers.0.{QKV}.1"] and rep.lora_alpha == 6.0
    assert open(os.path.join(dst, "latest")).read() == "1"
    assert json.load(open(os.path.join(dst, "lora_config.json")))["r"] == R
    for tp in (1, 2):
        assert digests(tiny["base"], tiny["yaml"], tp, lora=[dst]) == digests(tiny["base"], tiny["yaml"], tp,
                                                                              lora=[src]), f"tp{tp}"
    # the CLI, with the base folder's model config (a SAT folder without model_config.json: YAML via --config)
    assert cli_main(["convert", src, str(tiny["dir"] / "cli_sat"), "--to", "sat-lora",
                     "--config", tiny["yaml"]]) == 0
    assert os.path.isfile(os.path.join(tiny["dir"], "cli_sat", "1", "mp_rank_00_model_states.pt"))


def test_sat_lora_refuses_what_loramixin_cannot_hold(tiny):
    ff = peft_file(str(tiny["dir"] / "ff.safetensors"), tiny["params"], seed=8, modules=("to_q", "ff.net.0.proj"))
    with pytest.raises(LoraError, match="ff.net.0.proj.*LoraMixin"):
        export_lora(ff, str(tiny["dir"] / "ff_sat"), "sat-lora", model_config=tiny["yaml"])
    mixed = str(tiny["dir"] / "mixed.safetensors")
    sd = load_file(peft_file(mixed, tiny["params"], seed=9))
    sd["transformer.transformer_blocks.1.attn1.to_q.lora_A.weight"] = torch.zeros(3, tiny["params"]["hidden_size"])
    sd["transformer.transformer_blocks.1.attn1.to_q.lora_B.weight"] = torch.zeros(tiny["params"]["hidden_size"], 3)
    save_file(sd, mixed)  # no metadata: alpha = r per module
    with pytest.raises(LoraError, match="mixes ranks"):
        export_lora(mixed, str(tiny["dir"] / "mixed_sat"), "sat-lora", model_config=tiny["yaml"])
    assert not glob.glob(str(tiny["dir"] / "ff_sat*")) and not glob.glob(str(tiny["dir"] / "mixed_sat*"))


# --------------------------------------------------------------------------- merged conversions

def test_convert_with_lora_is_the_merged_load(tiny):
    lora = peft_file(str(tiny["dir"] / "merge_me.safetensors"), tiny["params"], seed=10)
    out = tiny["dir"] / "merged_st"
    t0 = time.perf_counter()
    conv(tiny["base"], out, "safetensors", config=tiny["yaml"], lora=[f"{lora}:0.8"])
    print(f"\n[convert --lora] {time.perf_counter() - t0:.2f}s")
    got, want = state(out), state(tiny["base"], tiny["yaml"], lora=[(lora, 0.8)])
    plain = state(tiny["base"], tiny["yaml"])
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(got[f"transformer.layers.0.{QKV}.weight"], plain[f"transformer.layers.0.{QKV}.weight"])
    # diffusers output of the same merge: the same tensors (but those diffusers never stores: RoPE tables)
    dif = tiny["dir"] / "merged_dif"
    conv(tiny["base"], dif, "diffusers", config=tiny["yaml"], lora=[f"{lora}:0.8"])
    back = state(dif)
    stored = [k for k in want if not k.startswith(NOT_STORED)]
    assert len(stored) < len(want) and all(torch.equal(back[k], want[k]) for k in stored)


def test_loramixin_finetune_converts_to_a_plain_merged_checkpoint(tiny):
    out = tiny["dir"] / "finetune_merged"
    conv(tiny["sat2"], out, "sat", config=tiny["yaml"], lora_alpha=ALPHA, tp=2)
    names = torch.load(out / "1" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert not any(".matrix_" in k or ".original." in k for k in names)
    for tp in (1, 2):
        assert digests(out, None, tp) == digests(tiny["sat2"], tiny["yaml"], tp, lora_alpha=ALPHA), f"tp{tp}"
    assert digests(out, None, 1) != digests(tiny["base"], tiny["yaml"], 1)


def test_a_lora_for_another_model_fails_before_writing(tiny, tmp_path):
    other = peft_file(str(tmp_path / "other.safetensors"), tiny_params("5b", heads=2, head_dim=16, layers=4), seed=11)
    dst = tmp_path / "never"
    with pytest.raises(AssertionError, match="transformer_blocks.2"):
        conv(tiny["base"], dst, "safetensors", config=tiny["yaml"], lora=[other])
    assert not os.path.exists(dst) and not glob.glob(f"{dst}.tmp-*")
    with pytest.raises(LoraError, match="transformer_blocks.2"):
        export_lora(other, str(tmp_path / "never_sat"), "sat-lora", model_config=tiny["yaml"])
    assert not glob.glob(str(tmp_path / "never_sat*"))
