"""Bad input: each case fails on every rank with the same clear error, and nothing hangs."""
import argparse
import os
import random

import numpy as np
import pytest
import torch

import sat_dist
from sat_dist.testing.dist import run_ranks, timed_group_load, values
from sat_rules import CONFIGS, full_state_dict, write_sat_checkpoint

CFG = CONFIGS["plain"]


def _load(rank, path, tp, *overrides, timeout_s=60):
    sat_dist.load_model(path, tp=tp, overrides=overrides, timeout_s=timeout_s)
    return "loaded"


def same_error_everywhere(results, *needles):
    """Every rank failed with the identical GroupLoadError text containing each needle."""
    assert all(not r.ok for r in results), [r.value for r in results]
    assert {r.error_type for r in results} == {"GroupLoadError"}, [(r.error_type, r.error) for r in results]
    assert len({r.error for r in results}) == 1, [r.error for r in results]
    for needle in needles:
        assert needle in results[0].error, results[0].error
    return results[0].error


@pytest.fixture()
def ckpt(tmp_path):
    root = str(tmp_path / "ckpt")
    write_sat_checkpoint(root, CFG, full_state_dict(CFG), 2)
    return root


def test_missing_latest(ckpt):
    os.remove(os.path.join(ckpt, "latest"))
    err = same_error_everywhere(run_ranks(2, _load, ckpt, 2), "no 'latest' file", ckpt, "rank(s) [0, 1]")
    assert "during 'plan'" in err


def test_latest_names_missing_iteration(ckpt):
    with open(os.path.join(ckpt, "latest"), "w") as f:
        f.write("2000")
    same_error_everywhere(run_ranks(2, _load, ckpt, 2), "'2000'", "does not exist")


def test_missing_mp_rank_file(ckpt):
    os.remove(os.path.join(ckpt, "1000", "mp_rank_01_model_states.pt"))
    # model_config.json says 2, the folder has 1: both ranks refuse, naming the missing file
    same_error_everywhere(run_ranks(2, _load, ckpt, 2), "missing ['mp_rank_01_model_states.pt']",
                          "found 1 of 2", "model_parallel_size=2")
    os.remove(os.path.join(ckpt, "model_config.json"))
    os.rename(os.path.join(ckpt, "1000", "mp_rank_00_model_states.pt"),
              os.path.join(ckpt, "1000", "mp_rank_02_model_states.pt"))
    same_error_everywhere(run_ranks(2, _load, ckpt, 2, *[f"model.{k}={v}" for k, v in CFG.items()]),
                          "missing ['mp_rank_00_model_states.pt', 'mp_rank_01_model_states.pt']")


def _rewrite(path, fn):
    obj = torch.load(path, weights_only=True)
    fn(obj)
    torch.save(obj, path)


def test_missing_and_unexpected_keys(ckpt):
    f0 = os.path.join(ckpt, "1000", "mp_rank_00_model_states.pt")
    _rewrite(f0, lambda o: o["module"].pop("transformer.layers.1.mlp.dense_4h_to_h.bias"))
    err = same_error_everywhere(run_ranks(2, _load, ckpt, 2), "mp_rank_00_model_states.pt",
                                "missing tensors ['transformer.layers.1.mlp.dense_4h_to_h.bias']", "rank(s) [0]")
    assert "rank 1:" not in err  # rank 1 opened only its own file, which is fine
    _rewrite(f0, lambda o: o["module"].update({
        "transformer.layers.1.mlp.dense_4h_to_h.bias": torch.zeros(64), "transformer.extra.weight": torch.zeros(2)}))
    same_error_everywhere(run_ranks(2, _load, ckpt, 2), "unexpected tensors ['transformer.extra.weight']")


def test_replicated_tensors_disagreeing_across_files_fail_the_group(ckpt):
    """At TP=2 each rank reads replicated tensors from its own mp file: if the files disagree, the
    agreement step names the rank whose copy differs from rank 0's, on every rank."""
    f1 = os.path.join(ckpt, "1000", "mp_rank_01_model_states.pt")
    _rewrite(f1, lambda o: o["module"]["transformer.final_layernorm.weight"].add_(1.0))
    err = same_error_everywhere(run_ranks(2, _load, ckpt, 2), "rank(s) [1]", "during 'agree'",
                                "replicated tensors differ from rank 0's")
    assert "rank 0:" not in err


def test_shape_mismatch_with_config(ckpt):
    same_error_everywhere(run_ranks(2, _load, ckpt, 2, "model.inner_hidden_size=128"),
                          "transformer.layers.0.mlp.dense_h_to_4h.weight", "has shape [128, 64]", "gives [64, 64]",
                          "check --config / model_config.json")


def test_tp_not_dividing_heads_refused_before_any_read(tmp_path):
    cfg = dict(CFG, num_attention_heads=4, hidden_size=64)
    root = str(tmp_path / "ckpt")
    write_sat_checkpoint(root, cfg, full_state_dict(cfg), 1)
    # make the weights unreadable: had any rank opened a file, the error would be a file error
    with open(os.path.join(root, "1000", "mp_rank_00_model_states.pt"), "wb") as f:
        f.write(b"not a zip")
    err = same_error_everywhere(run_ranks(3, _load, root, 3), "TP=3 does not divide num_attention_heads=4",
                                "TP sizes that work for this model: [1, 2, 4]", "during 'plan'")
    assert "zip" not in err


def test_pickle_global_outside_allow_list(ckpt):
    f1 = os.path.join(ckpt, "1000", "mp_rank_01_model_states.pt")
    obj = torch.load(f1, weights_only=True)
    obj["args"] = argparse.Namespace(lr=0.1)
    torch.save(obj, f1)
    err = same_error_everywhere(run_ranks(2, _load, ckpt, 2), "argparse.Namespace", "allow-list",
                                "mp_rank_01_model_states.pt", "rank(s) [1]")
    assert "weights_only=False" in err  # says it will not fall back to unsafe unpickling


def test_sat_training_client_state_with_numpy_rng_loads(tmp_path):
    """SAT training saves pickle numpy RNG state; the named allow-list accepts exactly that."""
    root = str(tmp_path / "ckpt")
    full = full_state_dict(CFG)
    extra = {"iteration": 1000, "client_lr_scheduler": {"num_iters": 1000, "warmup_iter": 10.0, "decay_style": "cosine"},
             "random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state()}
    write_sat_checkpoint(root, CFG, full, 1, extra=extra)
    assert values(run_ranks(2, _load, root, 2)) == ["loaded", "loaded"]


def test_truncated_file_fails_all_ranks_naming_the_rank(ckpt):
    f1 = os.path.join(ckpt, "1000", "mp_rank_01_model_states.pt")
    size = os.path.getsize(f1)
    with open(f1, "r+b") as f:
        f.truncate(size // 2)
    same_error_everywhere(run_ranks(2, _load, ckpt, 2), "rank(s) [1]", "mp_rank_01_model_states.pt")


def test_tp_not_dividing_world_is_a_config_error_on_every_rank(ckpt):
    """3 ranks at --tp 2: refused before the process group forms, the same ConfigError everywhere."""
    results = run_ranks(3, _load, ckpt, 2)
    assert {r.error_type for r in results} == {"ConfigError"}, [(r.error_type, r.error) for r in results]
    assert len({r.error for r in results}) == 1
    assert "--tp 2 does not divide the world size 3" in results[0].error


def test_unknown_config_key_named(ckpt):
    results = run_ranks(1, _load, ckpt, 1, "model.num_layer=3")
    assert results[0].error_type == "ConfigError" and "'num_layer'" in results[0].error


def _die_before_plan(rank, path):
    if rank == 1:
        import sat_dist.loader as L

        def die(*a, **k):
            os._exit(3)
        L.make_plan = die
    return timed_group_load(path, 2, 8)


def test_peer_death_fails_survivor_within_timeout(ckpt):
    results = run_ranks(2, _die_before_plan, ckpt, timeout=60)
    assert results[1].error_type == "Died"
    msg, seconds = results[0].value
    assert "could not reach its peers" in msg and "'plan'" in msg
    assert seconds < 8 + 10
