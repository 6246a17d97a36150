"""sat_dist's LoRA loading against the real SwissArmyTransformer (SAT 0.4.12).

A module fixture (on the SAT reference venv `.venv-sat`: the `sat_venv` fixture of conftest.py) runs
`tests/sat_ref/gen_sat_lora.py` once under torchrun (2 gloo ranks): SAT's `BaseModel`
(`plain_vocab_parallel`, the weights of gen_sat_reference.py) with SAT's own
`LoraMixin(num_layers, r=4, lora_alpha=2.0)` (sat/model/finetune/lora2.py) and non-zero random
`matrix_A`/`matrix_B`; SAT's own `save_checkpoint` of that LoRA fine-tune at mp=1 and at mp=2 (the
mp=2 model built as SAT does: `mp_split_model` of the base, then the mixin, LoRA tensors sliced);
SAT's own `merge_lora()` at mp=1 and at mp=2; SAT's mp=1 logits of the unmerged and the merged model.

Then, in this venv, sat_dist loads each SAT-written LoRA checkpoint (saved mp 1 and 2) at TP 1 and 2
on forked gloo ranks, `sat_dist.load_model(ckpt, tp=, lora_alpha=2.0, return_report=True)`:

* merged (the default for a checkpoint whose names are SAT LoRA names): every rank's state_dict must
  be SAT's merged state dict for that TP rank -- `merged[1]` at tp=1, SAT's own merged mp=2 shards
  `merged[2][rank]` at tp=2 (the generator checks that they are exactly SAT's `mp_split_model` split
  of `merged[1]`): same keys, shapes, dtypes, every tensor torch.equal -- the merged
  `query_key_value.weight` / `dense.weight` included: SAT computes `W + cat_i(B_i.float() @ A_i.float()
  * scaling)` in fp32, and a loader that merges in that order (per shard: the rows of B, the columns
  of A) gets the same bits (measured; a wrong alpha moves them by ~0.15). Its forward must equal
  SAT's mp=1 LoRA logits (atol 1e-5; SAT's own merged mp=1 logits differ from its unmerged ones by
  ~2e-6).
* unmerged (`lora_merge=False`: the low-rank path runs in the forward): logits within 1e-5 of SAT's
  mp=1 LoRA logits; the state_dict has the base names only (no `matrix_A/B`, no `original`), the
  base weights being SAT's `original` tensors for that rank.
* alpha matters: lora_alpha=1.0 gives logits more than 1e-3 away (a loader ignoring alpha fails).
* every rank reads at most 5% more than it needs.

The reference is SAT's mp=1 forward, not SAT's own mp=2 LoRA forward: SAT's `LoraLinear` on the
row-parallel `dense` adds `x_r @ A_r.T @ B.T`, rank r's partial sum, without the all-reduce
(`copy_to_model_parallel_region` is the identity in the forward), so SAT's mp=2 LoRA logits are off
by ~2 (manifest facts `mp2_vs_mp1_logits_max_abs_diff`; with the dense LoRA off they agree to 2e-6).
SAT's merged mp=2 state dicts are nevertheless the right shards (its merged mp=2 forward is broken
too: `merge_lora` swaps in a plain `nn.Linear` without the all-reduce).

If the reference venv cannot be built or SAT fails, the tests fail (never skip).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import assert_same_state_dict, run_sat_script
from sat_dist.testing.dist import run_ranks, values

REPO = Path(__file__).resolve().parents[1]
GEN = REPO / "tests" / "sat_ref" / "gen_sat_lora.py"
MP_RANKS = 2  # the generator's torchrun world (SAT's mp=2)
ATOL = 1e-5
ALPHA = 2.0
R = 4
TPS = (1, 2)
SAVED_MP = (1, 2)


@pytest.fixture(scope="module")
def lora_ref(sat_venv, tmp_path_factory) -> Path:
    """Run SAT once (torchrun, 2 ranks) and return the folder it wrote."""
    out = tmp_path_factory.mktemp("sat_lora")
    manifest = run_sat_script(sat_venv, GEN, out, MP_RANKS, "SAT LoRA reference generation")
    assert (manifest["r"], manifest["alpha"]) == (R, ALPHA), manifest
    return out


@pytest.fixture(scope="module")
def exp(lora_ref) -> dict:
    return torch.load(lora_ref / "expected.pt", weights_only=True)


def is_lora_name(k: str) -> bool:
    return ".matrix_A." in k or ".matrix_B." in k or ".original." in k


def is_merged_weight(k: str) -> bool:
    return k.endswith(("attention.query_key_value.weight", "attention.dense.weight"))


def want_merged(exp: dict, tp: int, r: int) -> dict:
    return exp["merged"][tp][0 if tp == 1 else r]


def want_unmerged(exp: dict, tp: int, r: int) -> dict:
    """The base names with SAT's un-merged values: `<linear>.original.<leaf>` of SAT's LoRA model for
    the LoRA-wrapped linears, the tensor itself for the rest (SAT's own mp=2 LoRA shards at tp=2)."""
    lora = exp["lora_sd"][tp][0 if tp == 1 else r]
    out = {}
    for k in want_merged(exp, tp, r):
        pre, leaf = k.rsplit(".", 1)
        out[k] = lora.get(f"{pre}.original.{leaf}", lora.get(k))
        assert out[k] is not None, k
    return out


def assert_state_dict(got: dict, want: dict, where: str) -> None:
    assert_same_state_dict(got, want, where, lambda k: " (a merged LoRA weight)" if is_merged_weight(k) else "")


def assert_logits(got: list, want: list, where: str) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{where}: logits {tuple(g.shape)} vs SAT mp=1 {tuple(w.shape)}"
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0, msg=lambda m: f"{where}, input {i}: logits vs SAT mp=1: {m}")


# --------------------------------------------------------------------------- the reference itself

def test_sat_lora_files(lora_ref, exp):
    """Self-check: SAT's files are the LoRA model (SAT's names, non-zero B), mp2 is SAT's shards, and
    SAT's merged mp=2 shards are exactly SAT's split of its merged mp=1 model."""
    for mp in SAVED_MP:
        ckpt = lora_ref / f"mp{mp}"
        tag = (ckpt / "latest").read_text().strip()
        assert json.loads((ckpt / "model_config.json").read_text())["model_parallel_size"] == mp
        files = sorted(p.name for p in (ckpt / tag).iterdir())
        assert files == [f"mp_rank_{r:02d}_model_states.pt" for r in range(mp)]
        for r in range(mp):
            sd = torch.load(ckpt / tag / files[r], weights_only=True)["module"]
            want = exp["lora_sd"][mp][r]
            assert sorted(sd) == sorted(want)
            assert all(torch.equal(sd[k], want[k]) for k in want), f"mp{mp} rank {r}"
            qkv = "transformer.layers.0.attention.query_key_value"
            dense = "transformer.layers.0.attention.dense"
            for name in [f"{qkv}.original.weight", f"{dense}.original.weight", f"{dense}.matrix_A.0",
                         f"{dense}.matrix_B.0"] + [f"{qkv}.matrix_{m}.{i}" for m in "AB" for i in range(3)]:
                assert name in sd, name
            assert f"{qkv}.matrix_A.3" not in sd and f"{qkv}.weight" not in sd
            assert all(sd[k].abs().sum() > 0 for k in sd if ".matrix_B." in k)
    for r in range(MP_RANKS):
        assert_state_dict(exp["merged"][2][r], exp["merged_split"][2][r], f"SAT merged mp=2 rank {r} vs split")
    assert_logits(exp["logits_merged"], exp["logits_lora"], "SAT merged mp=1 vs unmerged mp=1")


# --------------------------------------------------------------------------- sat_dist vs SAT

def _load_rank(rank, ckpt, tp, inputs, kw):
    import sat_dist

    model, rep = sat_dist.load_model(ckpt, tp=tp, return_report=True, **kw)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = [model(x["input_ids"], x["position_ids"], x["attention_mask"]).clone() for x in inputs]
    r = rep.ranks[rank]
    return {"sd": sd, "logits": logits, "tp_rank": r.tp_rank, "bytes": (r.bytes_read, r.bytes_needed)}


def _load(lora_ref, exp, saved_mp, tp, **kw):
    return values(run_ranks(tp, _load_rank, str(lora_ref / f"mp{saved_mp}"), tp, exp["inputs"], kw, timeout=120))


def _check_bytes(res, where):
    for r, v in enumerate(res):
        read, needed = v["bytes"]
        assert 0 < read <= 1.05 * needed, f"{where} rank {r}: read {read} B, needs {needed} B"


CASES = [(mp, tp) for mp in SAVED_MP for tp in TPS]
IDS = [f"mp{m}-tp{t}" for m, t in CASES]


@pytest.mark.parametrize("saved_mp,tp", CASES, ids=IDS)
def test_lora_merged_equals_sat(lora_ref, exp, saved_mp, tp):
    res = _load(lora_ref, exp, saved_mp, tp, lora_alpha=ALPHA)
    for r, v in enumerate(res):
        where = f"LoRA saved mp={saved_mp} loaded tp={tp} (merged) rank {r}"
        assert v["tp_rank"] == r
        assert not any(is_lora_name(k) for k in v["sd"]), f"{where}: LoRA names left after the merge"
        assert_state_dict(v["sd"], want_merged(exp, tp, r), where)
        assert_logits(v["logits"], exp["logits_lora"], where)
    _check_bytes(res, f"mp{saved_mp} tp{tp} merged")


@pytest.mark.parametrize("saved_mp,tp", CASES, ids=IDS)
def test_lora_unmerged_equals_sat(lora_ref, exp, saved_mp, tp):
    res = _load(lora_ref, exp, saved_mp, tp, lora_alpha=ALPHA, lora_merge=False)
    for r, v in enumerate(res):
        where = f"LoRA saved mp={saved_mp} loaded tp={tp} (lora_merge=False) rank {r}"
        assert v["tp_rank"] == r
        assert not any(is_lora_name(k) for k in v["sd"]), f"{where}: state_dict has LoRA names"
        assert_state_dict(v["sd"], want_unmerged(exp, tp, r), where)
        assert_logits(v["logits"], exp["logits_lora"], where)
    _check_bytes(res, f"mp{saved_mp} tp{tp} unmerged")


@pytest.mark.parametrize("saved_mp,tp,merge", [(1, 2, True), (2, 1, False)],
                         ids=["mp1-tp2-merged", "mp2-tp1-unmerged"])
def test_lora_wrong_alpha_is_observable(lora_ref, exp, saved_mp, tp, merge):
    res = _load(lora_ref, exp, saved_mp, tp, lora_alpha=1.0, lora_merge=merge)
    for r, v in enumerate(res):
        worst = max((g - w).abs().max().item() for g, w in zip(v["logits"], exp["logits_lora"]))
        assert worst > 1e-3, f"rank {r}: lora_alpha=1.0 gives SAT's alpha=2.0 logits (max |diff| {worst:.3g})"
