"""DeepSpeed ZeRO-1/2/3 checkpoints written by real DeepSpeed 0.19.8 (tests/ds_fixtures.py), loaded
tensor-parallel by sat_dist with world sizes and TP sizes independent of the saving dp (and mp).

For every rank: each tensor equals DeepSpeed's own reconstruction (`get_fp32_state_dict_from_zero_
checkpoint`, or the live engine's `safe_get_full_fp32_param` where zero_to_fp32 cannot: mp>1 and
BF16_Optimizer files) split by SAT's rule (tests/sat_rules.py, independent of sat_dist), bit for
bit after the same cast; bytes read equal the rank's share of the stored weights exactly (the
contract is <= 1.1x); deepspeed is never imported by the load path.
"""
import pytest
import torch

from sat_dist.testing.dist import run_ranks, values
from ds_fixtures import VARIANTS
from ds_testlib import case, expected, load_rank, local_expectation, warm_up

warm_up()

# (tp, world): world == tp, and TP=2 with 2 data-parallel replicas; none equals a saving layout.
LAYOUTS = [(1, 1), (2, 2), (4, 4), (2, 4)]
MODULE_LAYOUTS = [(2, 2), (4, 4)]


def _cases():
    for kind, mp in (("dp2", 1), ("dp4", 1), ("mp2", 2)):
        for v in VARIANTS:
            if v.mp != mp:
                continue
            yield pytest.param(kind, v.name, "fp32", id=f"{kind}-{v.name}-fp32")
            if v.stage < 3:
                yield pytest.param(kind, v.name, "module", id=f"{kind}-{v.name}-module")


def check_loads(c, source, layouts, weights=None, dtype=None):
    exp = expected(c, source)
    torch_dtype = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    for tp, world in layouts:
        results = values(run_ranks(world, load_rank, c.ckpt, tp, c.overrides(), weights, dtype))
        for rank, (state, rep, ds_imported) in enumerate(results):
            want, share = local_expectation(exp, c.cfg, tp, rank % tp, torch_dtype)
            where = f"{c.dir} source={source} tp={tp} world={world} rank={rank}"
            assert set(state) == set(want), where
            for name, got in state.items():
                assert got.dtype == want[name].dtype, (where, name, got.dtype, want[name].dtype)
                assert torch.equal(got, want[name]), (where, name)
            assert rep.bytes_needed == share, where
            assert rep.bytes_read <= 1.1 * share, (where, rep.bytes_read, share)
            assert rep.bytes_read == share, where  # exact here: every planned byte is needed
            assert not ds_imported, f"{where}: the load path imported deepspeed"


@pytest.mark.parametrize("kind,name,source", list(_cases()))
def test_load_equals_deepspeed_reconstruction(tmp_path_factory, kind, name, source):
    c = case(tmp_path_factory, kind, name)
    weights = "fp32" if source == "fp32" else None  # ZeRO-1/2 default is module; ZeRO-3 always fp32
    check_loads(c, source, LAYOUTS if source == "fp32" else MODULE_LAYOUTS, weights)


def test_zero3_default_weights_and_world_three(tmp_path_factory):
    """No --weights on ZeRO-3 means the fp32 partitions; 3 loading ranks (odd world, TP=1) from dp=4."""
    c = case(tmp_path_factory, "dp4", "z3_bf16")
    check_loads(c, "fp32", [(1, 3)], weights=None)


def test_explicit_dtype_overrides_the_run_dtype(tmp_path_factory):
    """--dtype fp32 on a bf16 run gives the fp32 masters themselves (not bf16 values upcast);
    --dtype bf16 on an fp32 run casts; --weights module --dtype fp32 upcasts the module."""
    c = case(tmp_path_factory, "dp2", "z2_bf16")
    check_loads(c, "fp32", [(2, 2)], weights="fp32", dtype="fp32")
    masters, module = expected(c, "fp32").full, expected(c, "module").full
    name = "transformer.layers.1.mlp.dense_h_to_4h.weight"
    assert masters[name].dtype == torch.float32 and module[name].dtype == torch.bfloat16
    assert not torch.equal(masters[name], module[name].float())  # the two sources really differ
    assert torch.equal(masters[name].bfloat16(), module[name])  # ... by exactly the bf16 rounding
    check_loads(c, "module", [(2, 2)], weights="module", dtype="fp32")
    check_loads(case(tmp_path_factory, "dp4", "z3_fp32"), "fp32", [(4, 4)], dtype="bf16")


def test_tag_folder_and_explicit_tag(tmp_path_factory, tmp_path):
    """`--tag` picks the tag folder; the tag folder itself works as the path (no `latest`)."""
    c = case(tmp_path_factory, "dp2", "z3_fp32")
    want = values(run_ranks(2, load_rank, c.ckpt, 2, c.overrides()))
    for path, tag in ((c.ckpt, "global_step1"), (c.tag_dir, None)):
        got = values(run_ranks(2, load_rank, path, 2, c.overrides(), None, None, tag))
        assert [r[1].digest for r in got] == [r[1].digest for r in want]
