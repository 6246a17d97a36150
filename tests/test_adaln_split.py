"""CogVideoX's opt-in AdaLN split (`model.adaln_split=true`, issue 14): the per-layer modulation
linears are column-split across the TP group (their [b, 12*hidden] output all-gathered) instead of
replicated. The forward equals the default layout's TP=1 forward (which test_cogvideox_forward
checks against diffusers); each rank holds and reads 1/TP of those weights; SAT's layout stays the
default."""
import pytest
import torch

import sat_dist
from cvx_fixtures import tiny_params, write_tiny_shipped
from sat_dist.testing.dist import run_ranks, values

REL_TOL = 1e-5
ADALN = "mixins.adaln_layer.adaLN_modulations.0.1.weight"


def _inputs(kind):
    t, h, w, text = {"5b": (2, 8, 12, 5), "15_i2v": (4, 4, 8, 3)}[kind]
    g = torch.Generator().manual_seed(7)
    inp = {"x": torch.randn(2, t, 4, h, w, generator=g), "timesteps": torch.tensor([3.0, 811.0]),
           "context": torch.randn(2, text, 24, generator=g)}
    if kind == "15_i2v":
        inp.update(concat_images=torch.randn(2, t, 4, h, w, generator=g), ofs=torch.tensor([2.0, 2.0]))
    return inp


def _forward(rank, config, tp, inputs, split):
    model, rep = sat_dist.load_model(None, config, tp=tp, return_report=True, exchange="off",
                                     overrides=[f"model.adaln_split={str(split).lower()}"])
    with torch.no_grad():
        out = model(**inputs)
    return out, tuple(model.state_dict()[ADALN].shape), rep.ranks[rank].bytes_read


@pytest.mark.parametrize("kind", ["5b", "15_i2v"])
def test_adaln_split_forward_equals_the_reference(tmp_path, kind):
    params, _, config = write_tiny_shipped(tmp_path, kind, 31, {})
    inputs = _inputs(kind)
    (ref, full_shape, _), = values(run_ranks(1, _forward, config, 1, inputs, False))
    hidden = tiny_params(kind)["hidden_size"]
    assert full_shape[0] == 12 * hidden
    scale = ref.abs().max().item()
    for tp in (2, 3):
        default = values(run_ranks(tp, _forward, config, tp, inputs, False))
        split = values(run_ranks(tp, _forward, config, tp, inputs, True))
        for (out, shape, read), (_, dshape, dread) in zip(split, default):
            assert (out - ref).abs().max().item() <= REL_TOL * scale, (kind, tp)
            assert dshape == full_shape and shape == (full_shape[0] // tp, full_shape[1])
            # each layer's modulation weight + bias: 1/tp of them read instead of all
            saved = params["num_layers"] * (12 * hidden * (full_shape[1] + 1)) * 4 * (tp - 1) // tp
            assert dread - read == saved, (kind, tp, dread, read, saved)
