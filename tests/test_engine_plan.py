"""`sat-dist plan --engine`: per-rank weights of DiT + T5 + VAE and the phases' activations at each
TP size, from the shipped configs alone (no checkpoint, nothing allocated)."""
import json
import os

import pytest

from cvx_fixtures import CONFIGS
from sat_dist.capacity import engine_plan, plan_model
from sat_dist.cli import main
from sat_dist.engine.capacity import T5_XXL
from sat_dist.config import build_model_config

V15 = os.path.join(CONFIGS, "cogvideox1.5_5b.yaml")


@pytest.mark.parametrize("name,valid", [("cogvideox_2b", (1, 2)), ("cogvideox_5b", (1, 2, 4, 8))])
def test_engine_plan_per_rank(name, valid):
    plan = engine_plan([os.path.join(CONFIGS, f"{name}.yaml")], [1, 2, 4, 8])
    t5 = plan.components["text_encoder"]
    assert 4.7e9 < t5.total_params < 4.8e9  # t5-v1_1-xxl's encoder
    rows = {r["tp"]: r for r in plan.rows}
    assert tuple(tp for tp, r in rows.items() if r["valid"]) == valid
    ok = [rows[tp] for tp in valid]
    for a, b in zip(ok, ok[1:]):  # DiT and T5 shrink with TP, the VAE is whole on every rank
        assert b["weights"]["transformer"] < a["weights"]["transformer"]
        assert b["weights"]["text_encoder"] < a["weights"]["text_encoder"]
        assert b["weights"]["vae"] == a["weights"]["vae"]
    for r in ok:
        acts = r["activations"]
        assert r["device_bytes"] == sum(r["weights"].values()) + max(acts.values())
    one = rows[1]
    assert one["weights"]["text_encoder"] == plan_model(build_model_config(T5_XXL), [1], _dtype(plan)).rows[0].param_bytes


def _dtype(plan):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[plan.dtype]


def test_v15_needs_the_latent_size(capsys):
    plan = engine_plan([V15], [1, 4])
    assert all(r["device_bytes"] is None for r in plan.rows)
    assert "--latent" in plan.table()
    plan = engine_plan([V15], [1, 4], latent=(22, 96, 170))
    assert plan.rows[1]["device_bytes"] < plan.rows[0]["device_bytes"]
    assert main(["plan", "--config", V15, "--engine", "--latent", "22", "96", "170",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["tp"] for r in out["rows"]] == [1, 2, 4, 8] and "76 GB" in out["published"]
