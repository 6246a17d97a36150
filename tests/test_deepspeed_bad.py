"""Bad DeepSpeed checkpoints: every rank fails with the same error naming the file (and tensor),
the failing rank(s) and what to do; nothing hangs and nothing is half-loaded."""
import glob
import os
import shutil

import pytest

from sat_dist.testing.dist import run_ranks
from ds_testlib import case, load_error, same_error_everywhere, warm_up

warm_up()


def _copy(tmp_path_factory, tmp_path, kind, name):
    c = case(tmp_path_factory, kind, name)
    dst = str(tmp_path / "ckpt")
    shutil.copytree(c.ckpt, dst)
    return c, dst, os.path.join(dst, c.v["tag"])


@pytest.mark.parametrize("name", ["z3_fp32", "z2_fp32"])
def test_missing_partition_file(tmp_path_factory, tmp_path, name):
    c, ckpt, tag_dir = _copy(tmp_path_factory, tmp_path, "dp4", name)
    os.remove(os.path.join(tag_dir, "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    err = same_error_everywhere(run_ranks(2, load_error, ckpt, 2, c.overrides(), "fp32"),
                                "missing partition file(s) ['zero_pp_rank_1_mp_rank_00_optim_states.pt']",
                                "dp ranks [0, 2, 3] of 4", "copy the missing file(s)", "rank(s) [0, 1]", tag_dir)
    assert "during 'plan'" in err


@pytest.mark.parametrize("name,key", [("z3_bf16", "dp_world_size=4"), ("z1_fp32", "dp_world_size=4")])
def test_dp_size_disagrees_with_file_count(tmp_path_factory, tmp_path, name, key):
    """The last rank's file is gone: the remaining 0..2 look complete, but the files say dp=4."""
    c, ckpt, tag_dir = _copy(tmp_path_factory, tmp_path, "dp4", name)
    (victim,) = glob.glob(os.path.join(tag_dir, "*zero_pp_rank_3_mp_rank_00_optim_states.pt"))
    os.remove(victim)
    same_error_everywhere(run_ranks(2, load_error, ckpt, 2, c.overrides(), "fp32"),
                          key, "holds 3 optimizer partition file(s)", "restore exactly the files of one save")


def test_partition_count_disagrees_with_file_count(tmp_path_factory, tmp_path):
    """A stray partition file from a larger run (dp rank 2 of a dp=2 save): partition_count says 2."""
    c, ckpt, tag_dir = _copy(tmp_path_factory, tmp_path, "dp2", "z2_bf16")
    src = os.path.join(tag_dir, "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    shutil.copy(src, os.path.join(tag_dir, "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt"))
    same_error_everywhere(run_ranks(2, load_error, ckpt, 2, c.overrides(), "fp32"),
                          "dp_world_size=2", "holds 3 optimizer partition file(s)")


def test_truncated_optim_file(tmp_path_factory, tmp_path):
    c, ckpt, tag_dir = _copy(tmp_path_factory, tmp_path, "dp2", "z3_bf16")
    path = os.path.join(tag_dir, "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    same_error_everywhere(run_ranks(2, load_error, ckpt, 2, c.overrides()),
                          "optimizer partition file of dp rank 1", path, "truncated", "copy it again")


def test_unknown_pickled_global(tmp_path_factory, tmp_path):
    """An optim file that also pickles an argparse.Namespace (written by the fixture generator with
    real DeepSpeed): refused by name, never unpickled with weights_only=False."""
    c, ckpt, tag_dir = _copy(tmp_path_factory, tmp_path, "dp2", "z3_fp32")
    path = os.path.join(tag_dir, "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    shutil.copy(os.path.join(c.dir, "bad_global_optim.pt"), path)
    same_error_everywhere(run_ranks(2, load_error, ckpt, 2, c.overrides()),
                          "['argparse.Namespace']", path, "outside sat_dist's allow-list", "never unpickled")


def test_module_weights_on_zero3(tmp_path_factory):
    c = case(tmp_path_factory, "dp2", "z3_fp32")
    same_error_everywhere(run_ranks(2, load_error, c.ckpt, 2, c.overrides(), "module"),
                          "is a ZeRO-3 checkpoint", "size-0 placeholders", "use --weights fp32")


def test_fp32_weights_without_optimizer_files(tmp_path_factory, tmp_path):
    """A ZeRO-1/2 folder whose optim files were not copied loads from `module` by default, but
    --weights fp32 says where the fp32 masters would have been."""
    c, ckpt, tag_dir = _copy(tmp_path_factory, tmp_path, "dp2", "z2_fp32")
    for p in glob.glob(os.path.join(tag_dir, "*_optim_states.pt")):
        os.remove(p)
    assert all(r.ok for r in run_ranks(2, load_error, ckpt, 2, c.overrides()))
    same_error_everywhere(run_ranks(2, load_error, ckpt, 2, c.overrides(), "fp32"),
                          "--weights fp32 reads DeepSpeed ZeRO optimizer partitions", "holds no *_optim_states.pt")


def test_model_config_disagrees(tmp_path_factory):
    c = case(tmp_path_factory, "dp2", "z3_fp32")
    overrides = [o for o in c.overrides() if not o.startswith("model.inner_hidden_size")] + \
        ["model.inner_hidden_size=56"]
    same_error_everywhere(run_ranks(2, load_error, c.ckpt, 2, overrides),
                          "'transformer.layers.0.mlp.dense_h_to_4h.weight' has shape [52, 42]",
                          "the model config gives [56, 42]", "check --config")


def test_zero3_without_optim_files(tmp_path_factory, tmp_path):
    c, ckpt, tag_dir = _copy(tmp_path_factory, tmp_path, "dp2", "z3_fp32")
    for p in glob.glob(os.path.join(tag_dir, "*_optim_states.pt")):
        os.remove(p)
    same_error_everywhere(run_ranks(2, load_error, ckpt, 2, c.overrides()),
                          "ZeRO-3 model states but no *_optim_states.pt", "copy the *_optim_states.pt")
