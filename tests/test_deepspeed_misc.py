"""DeepSpeed files without deepspeed: the pickled globals real 0.19.8 files carry and the stubs
that stand for them, SAT's training-checkpoint client state under weights_only=True, the optimizer
moments never being read, and `sat-dist inspect`."""
import contextlib
import glob
import io
import json
import math
import os
import shutil
import sys

import pytest
import torch

from sat_dist.testing.dist import run_ranks, values
from ds_testlib import (case, deepspeed_blocked, expected, fixtures, fp32_partition_keys, load_rank, local_expectation,
                        poison_all_but, warm_up)
from sat_dist.formats import ds_pickle
from sat_dist.formats.torchfile import allowed_globals, load_structure

warm_up()

DS_GLOBALS = {"deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
              "deepspeed.utils.tensor_fragment.fragment_address"}
NUMPY_GLOBALS = {"numpy.ndarray", "numpy._core.multiarray._reconstruct", "numpy.dtype"}



@pytest.fixture
def ds_attempts():
    """The test runs with deepspeed unimportable (ds_testlib.deepspeed_blocked); its tries are listed."""
    with deepspeed_blocked() as attempts:
        yield attempts

def _all_files(tmp_path_factory):
    out = []
    for kind in ("dp2", "dp4", "mp2"):
        out += glob.glob(os.path.join(fixtures(tmp_path_factory, kind), "*", "ckpt", "*", "*.pt"))
    return sorted(out)


def test_real_files_pickle_only_stubbed_globals(tmp_path_factory):
    """Every global in every fixture file (as torch itself lists them, without unpickling) is one
    the stubs or the numpy allow-list name; all three DeepSpeed classes do occur."""
    seen = set()
    for path in _all_files(tmp_path_factory):
        names = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        seen |= names
        if path.endswith("_optim_states.pt"):
            assert names and names <= DS_GLOBALS, (path, names)
        else:
            assert names <= NUMPY_GLOBALS, (path, names)
    assert DS_GLOBALS <= seen and NUMPY_GLOBALS <= seen, seen
    assert DS_GLOBALS <= set(ds_pickle.stub_names())
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in allowed_globals()}
    assert seen <= allowed


def test_optim_files_load_weights_only_without_deepspeed(tmp_path_factory, ds_attempts):
    """Plain torch.load(weights_only=True) refuses a real optim file; with the stubs registered
    it loads (real tensors, mmap) and the stub objects carry DeepSpeed's values."""
    c = case(tmp_path_factory, "dp2", "z2_fp32")
    path = os.path.join(c.tag_dir, "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(Exception, match="weights_only"):
        torch.load(path, map_location="cpu", weights_only=True)
    with torch.serialization.safe_globals(allowed_globals()):
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    osd = obj["optimizer_state_dict"]
    assert osd["zero_stage"] == 2 and isinstance(osd["zero_stage"], ds_pickle.ZeroStageEnum)
    assert vars(osd["loss_scaler"]) == {"cur_scale": 1.0, "dynamic": False}
    first = next(iter(osd["param_slice_mappings"][0].values()))
    assert isinstance(first, ds_pickle.fragment_address) and first.numel > 0
    assert osd["partition_count"] == [2] and osd["single_partition_of_fp32_groups"][0].dtype == torch.float32
    assert not ds_attempts


def test_sat_training_checkpoint_client_state(tmp_path_factory):
    """SAT's client state (iteration, lr scheduler, python/numpy/torch RNG states) is readable with
    weights_only=True, and the checkpoint loads with no config at all (model_config.json)."""
    c = case(tmp_path_factory, "dp2", "sat_z2_bf16")
    ms = load_structure(os.path.join(c.tag_dir, "mp_rank_00_model_states.pt"))
    assert ms["iteration"] == 1000 and ms["client_lr_scheduler"]["decay_style"] == "cosine"
    assert ms["np_rng_state"][0] == "MT19937" and ms["np_rng_state"][1].shape == (624,)
    assert tuple(ms["torch_rng_state"].shape) == (5056,) and len(ms["random_rng_state"][1]) == 625
    assert c.overrides() == [] and os.path.isfile(os.path.join(c.ckpt, "model_config.json"))
    for source, weights in (("module", None), ("fp32", "fp32")):
        exp = expected(c, source)
        for rank, (state, rep, _) in enumerate(values(run_ranks(2, load_rank, c.ckpt, 2, [], weights))):
            want, _ = local_expectation(exp, c.cfg, 2, rank)
            assert all(torch.equal(state[k], want[k]) for k in want), (source, rank)


@pytest.mark.parametrize("kind,name", [("dp4", "z3_bf16"), ("dp2", "z2_fp32"), ("dp2", "z1_bf16_fp32acc"),
                                       ("mp2", "mp2_z3_fp32")])
def test_optimizer_moments_are_never_read(tmp_path_factory, tmp_path, kind, name):
    """Overwrite every tensor record of every optim file except the fp32 partitions (the Adam
    moments and step counters: found by scanning data.pkl here, not with sat_dist) with 0xFF (NaN)
    bytes: the load is unchanged, so not one byte of them was read."""
    c = case(tmp_path_factory, kind, name)
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(c.ckpt, ckpt)
    poisoned = 0
    for path in glob.glob(os.path.join(ckpt, c.v["tag"], "*_optim_states.pt")):
        poisoned += poison_all_but(path, fp32_partition_keys(path))
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(ckpt, c.v["tag"], "*_optim_states.pt")))
    assert poisoned > 0.6 * total  # the moments are ~2/3 of the optim files
    exp = expected(c, "fp32")
    for rank, (state, rep, _) in enumerate(values(run_ranks(2, load_rank, ckpt, 2, c.overrides(), "fp32"))):
        want, share = local_expectation(exp, c.cfg, 2, rank)
        for k, t in state.items():
            assert torch.equal(t, want[k]), (name, rank, k)
        assert rep.bytes_read == share


def _inspect(*argv):
    from sat_dist.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["inspect", *argv]) == 0
    return out.getvalue()


def test_inspect(tmp_path_factory, ds_attempts):
    c = case(tmp_path_factory, "dp4", "z3_fp32")
    info = json.loads(_inspect(c.ckpt, "--json"))
    ref = c.ref("zero_to_fp32.pt")
    frozen = set(c.v["frozen"])
    assert (info["stage"], info["dp_size"], info["mp_size"], info["run_dtype"]) == (3, 4, 1, "fp32")
    assert info["trainable_numel"] == sum(t.numel() for k, t in ref.items() if k not in frozen)
    assert info["frozen_numel"] == sum(ref[k].numel() for k in frozen) and info["frozen_params"] == 2
    assert info["param_groups"] == 3  # sub_group_size=4000 cut the one param group into 3 sub-groups
    optim = [f for f in info["files"] if f["file"].endswith("_optim_states.pt")]
    assert len(optim) == 4 and len(info["files"]) == 8
    per_rank = sum(math.ceil(t.numel() / 4) for k, t in ref.items() if k not in frozen)
    assert all(f"{per_rank} fp32 elements" in f["holds"] and f["partition_count"] == 4 for f in optim)
    text = _inspect(c.ckpt)
    assert "DeepSpeed ZeRO-3" in text and "dp size 4" in text and "never read" in text

    c2 = case(tmp_path_factory, "dp2", "sat_z2_bf16")
    info = json.loads(_inspect(c2.ckpt, "--json"))
    assert (info["stage"], info["dp_size"], info["run_dtype"], info["tag"]) == (2, 2, "bf16", "1000")
    assert {"iteration", "np_rng_state", "client_lr_scheduler"} <= set(info["client_state_keys"])
    assert "module (--weights fp32: fp32 partitions)" in _inspect(c2.ckpt)
    info = json.loads(_inspect(case(tmp_path_factory, "mp2", "mp2_z2_bf16").ckpt, "--json"))
    assert (info["mp_size"], info["dp_size"], len(info["files"])) == (2, 2, 6)
    info = json.loads(_inspect(case(tmp_path_factory, "dp2", "z1_bf16_fp32acc").ckpt, "--json"))
    assert (info["stage"], info["optimizer"]) == (1, "BF16_Optimizer")
    assert not ds_attempts


def test_cli_under_torchrun(tmp_path_factory, tmp_path):
    """The user's command: `torchrun ... -m sat_dist load CKPT --tp 2 --weights fp32`; the report's
    per-rank digests equal the digests of the expected shards."""
    import subprocess

    from ds_testlib import HERE
    from sat_dist.report import state_dict_digest

    c = case(tmp_path_factory, "dp4", "z2_bf16")
    report = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(HERE)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "sat_dist", "load", c.ckpt, "--tp", "2", "--weights", "fp32", "--report",
                           str(report), "--exchange", "off", *c.overrides()], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads(report.read_text())["ranks"]
    exp = expected(c, "fp32")
    for r in ranks:
        want, share = local_expectation(exp, c.cfg, 2, r["tp_rank"])
        assert r["digest"] == state_dict_digest(want) and r["bytes_read"] == share
