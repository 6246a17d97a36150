"""CogVideo's SAT LoRA fine-tune (sat/configs/cogvideox_5b_lora.yaml: `lora_config` LoraMixin, r), loaded as
saved: `model.diffusion_model.transformer.layers.N.attention.{query_key_value,dense}.original.*` plus
`matrix_A.i` / `matrix_B.i`, through a CogVideo-layout YAML, at TP 1 and 2 on forked gloo ranks.

The expected weights are computed here from the saved full tensors as SAT's `merge_linear_lora` does
(W + cat_i(B_i·A_i)·lora_alpha/r in fp32; lora_alpha LoraMixin's default 1 when the YAML names none),
then split with SAT's rule: every rank's merged DiT must equal them exactly. Also: the YAML's lora_alpha is
honoured; a YAML with `lora_config` on a checkpoint without LoRA, a LoRA checkpoint with nothing saying its
lora_alpha, and a rank that differs from the YAML's r are each refused on every rank at the plan agreement.
"""
import copy

import pytest
import torch

import sat_dist
from cvx_fixtures import random_weights, sat_split, shape_table, tiny_params, write_cogvideo_yaml, write_shipped
from sat_dist.errors import GroupLoadError
from sat_dist.testing.dist import run_ranks, values

R = 4
MIXIN = "sat.model.finetune.lora2.LoraMixin"


@pytest.fixture(scope="module")
def finetune(tmp_path_factory):
    base = tmp_path_factory.mktemp("cvx_lora")
    params = tiny_params("5b")
    full = random_weights(shape_table(params), seed=7)
    g = torch.Generator().manual_seed(8)
    saved, factors = {}, {}
    for name, t in full.items():
        linear = name.rsplit(".", 1)[0]
        if linear.endswith(("attention.query_key_value", "attention.dense")):
            saved[f"{linear}.original.{name.rsplit('.', 1)[1]}"] = t
            if name.endswith(".weight"):
                n = 3 if linear.endswith("query_key_value") else 1
                factors[linear] = [(torch.randn(R, t.shape[1], generator=g) * 0.2,
                                    torch.randn(t.shape[0] // n, R, generator=g) * 0.2) for _ in range(n)]
        else:
            saved[name] = t
    for linear, pairs in factors.items():
        for i, (a, b) in enumerate(pairs):
            saved[f"{linear}.matrix_A.{i}"], saved[f"{linear}.matrix_B.{i}"] = a, b
    ckpt = write_shipped(str(base / "transformer"), saved)  # mp 1: SAT's split rule does not know these names
    plain = write_shipped(str(base / "plain"), full)

    def yaml(name, lora_params):
        p = copy.deepcopy(params)
        if lora_params is not None:
            p["modules"]["lora_config"] = {"target": MIXIN, "params": lora_params}
        return write_cogvideo_yaml(str(base / name), p, {"load": ckpt})

    return {"full": full, "factors": factors, "ckpt": ckpt, "plain": plain, "yaml": yaml("lora.yaml", {"r": R}),
            "yaml_alpha": yaml("alpha.yaml", {"r": R, "lora_alpha": 8}), "yaml_r": yaml("r.yaml", {"r": R + 1}),
            "yaml_plain": yaml("plain.yaml", None)}


def _merged(full, factors, alpha):
    out = dict(full)
    for linear, pairs in factors.items():
        delta = torch.cat([b.float() @ a.float() * (alpha / R) for a, b in pairs], dim=0)
        out[f"{linear}.weight"] = (full[f"{linear}.weight"].float() + delta).to(full[f"{linear}.weight"].dtype)
    return out


def _load(rank, config, tp, path=None, merge=None):
    model = sat_dist.load_model(path, config, tp=tp, lora_merge=merge)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sat_dist.shutdown()
    return sd


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("which, alpha", [("yaml", 1.0), ("yaml_alpha", 8.0)])
def test_finetune_loads_merged_as_sat_merges_it(finetune, tp, which, alpha):
    want = _merged(finetune["full"], finetune["factors"], alpha)
    for rank, sd in enumerate(values(run_ranks(tp, _load, [finetune[which]], tp))):
        assert sorted(sd) == sorted(want)
        for name, t in sd.items():
            assert torch.equal(t, sat_split(name, want[name], tp, rank)), (name, tp, rank)


def test_unmerged_keeps_the_base_weights(finetune):
    (sd,) = values(run_ranks(1, _load, [finetune["yaml"]], 1, None, False))
    assert all(torch.equal(sd[n], finetune["full"][n]) for n in sd)


@pytest.mark.parametrize("which, path, words", [
    ("yaml_plain", "ckpt", "pass --lora-alpha"),  # LoRA names, nothing saying lora_alpha
    ("yaml_r", "ckpt", "lora_config says r=5"),
    ("yaml", "plain", "holds no LoRA tensors"),
])
def test_refused_on_every_rank_before_reading(finetune, which, path, words):
    results = run_ranks(2, _load, [finetune[which]], 2, finetune[path])
    for r in results:
        assert r.error_type == GroupLoadError.__name__ and "during 'plan'" in r.error, r
        assert words in r.error and "LoraError" in r.error
