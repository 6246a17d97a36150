"""Subprocess helper for tests/test_deepspeed_writer.py (imports deepspeed, so it runs outside
the pytest process): rewrite a real-DeepSpeed ZeRO-3 fixture with sat_dist/testing/zero3_writer.py from
the fixture's own weights, then compare the two checkpoints file by file.

    python tests/ds_writer_check.py FIXTURE_VARIANT_DIR OUT_DIR   -> prints one JSON line
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections import OrderedDict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def struct(obj):
    """Shape of a pickled object: containers, key order, tensor dtype/shape, scalar values."""
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        return ["T", str(obj.dtype), list(obj.shape)]
    if isinstance(obj, dict):
        return [type(obj).__name__, [[str(k), struct(v)] for k, v in obj.items()]]
    if isinstance(obj, (list, tuple)):
        return [type(obj).__name__, [struct(v) for v in obj]]
    if isinstance(obj, np.ndarray):
        return ["ndarray", str(obj.dtype), list(obj.shape)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return [type(obj).__name__, obj]
    return [f"{type(obj).__module__}.{type(obj).__qualname__}", struct(vars(obj)) if hasattr(obj, "__dict__") else None]


def main(src: str, out: str) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    import ds_fixtures
    from sat_dist.testing.zero3_writer import Zero3Spec, write_zero3_checkpoint
    from sat_dist.config import build_model_config
    from sat_dist.models import TPInfo, build_meta_model

    with open(os.path.join(src, "variant.json")) as f:
        v = json.load(f)
    variant = ds_fixtures.BY_NAME[v["name"]]
    real_ckpt, tag = os.path.join(src, "ckpt"), v["tag"]
    real_dir = os.path.join(real_ckpt, tag)
    dp = sum(1 for n in os.listdir(real_dir) if n.endswith("_optim_states.pt"))
    model = build_meta_model(build_model_config(dict(v["model_cfg"])), TPInfo())
    shapes = OrderedDict((n, tuple(p.shape)) for n, p in model.named_parameters())
    trainable = [n for n in shapes if n not in variant.frozen]
    if variant.two_groups:  # as ds_fixtures passes them to deepspeed.initialize
        nodecay = [n for n in trainable if n.endswith("bias") or "layernorm" in n]
        groups = [[n for n in trainable if n not in nodecay], nodecay]
        user_groups = [{"params": [torch.nn.Parameter(torch.zeros(1))]},
                       {"params": [torch.nn.Parameter(torch.zeros(1))], "weight_decay": 0.0}]
    else:
        groups = [trainable]
        user_groups = [{"params": [torch.nn.Parameter(torch.zeros(1))]}]
    # DeepSpeed's "Adam" with torch_adam=True is torch.optim.AdamW (adam_w_mode); its param_groups
    # entries (key order included) are what torch builds from the groups ds_fixtures passes.
    hparams = [{k: val for k, val in g.items() if k != "params"}
               for g in torch.optim.AdamW(user_groups, lr=1e-2, weight_decay=0.01).state_dict()["param_groups"]]
    ref = torch.load(os.path.join(src, "zero_to_fp32.pt"), weights_only=True)
    module0 = torch.load(os.path.join(src, "module_mp0.pt"), weights_only=True)
    real_ms = torch.load(os.path.join(real_dir, "zero_pp_rank_0_mp_rank_00_model_states.pt"), weights_only=False)
    common = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
              "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "skipped_steps", "global_steps",
              "global_samples", "dp_world_size", "mp_world_size", "checkpoint_parallel_dimensions", "ds_config",
              "ds_version"}
    buffers = {n: module0[n] for n in real_ms["buffer_names"]}
    spec = Zero3Spec(
        param_shapes=shapes, groups=groups, frozen=list(variant.frozen), buffers=buffers,
        module_order=list(model.state_dict()), dp=dp, bf16=variant.bf16,
        sub_group_size=variant.sub_group_size or 1_000_000_000, ds_config=ds_fixtures.ds_config(variant),
        param_group_hparams=hparams, global_steps=1, global_samples=2 * dp,
        client_state={k: val for k, val in real_ms.items() if k not in common},
    )
    written_ckpt = os.path.join(out, "ckpt")
    write_zero3_checkpoint(written_ckpt, tag, spec, lambda n: ref[n],
                           frozen_values={n: ref[n] for n in variant.frozen})
    if os.path.isfile(os.path.join(real_ckpt, "model_config.json")):  # SAT writes it next to `latest`
        shutil.copy(os.path.join(real_ckpt, "model_config.json"), written_ckpt)

    problems = []
    real_files = sorted(os.listdir(real_dir))
    written_files = sorted(os.listdir(os.path.join(written_ckpt, tag)))
    if real_files != written_files:
        problems.append(f"file names differ: {real_files} vs {written_files}")
    for name in real_files:
        a_path, b_path = os.path.join(real_dir, name), os.path.join(written_ckpt, tag, name)
        if not os.path.isfile(b_path):
            continue
        ga = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(a_path))
        gb = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(b_path))
        if ga != gb:
            problems.append(f"{name}: pickled globals differ: {ga} vs {gb}")
        a = torch.load(a_path, weights_only=False)
        b = torch.load(b_path, weights_only=False)
        if list(a) != list(b):
            problems.append(f"{name}: top-level keys differ: {list(a)} vs {list(b)}")
        for k in set(a) - common - {"optimizer_state_dict"}:  # client state (per-rank RNG values)
            a.pop(k), b.pop(k, None)
        if struct(a) != struct(b):
            problems.append(f"{name}: pickle structure differs:\n{json.dumps(struct(a))[:3000]}\n"
                            f"{json.dumps(struct(b))[:3000]}")
            continue
        if name.endswith("_model_states.pt"):
            if [list(d.items()) for d in a["param_shapes"]] != [list(d.items()) for d in b["param_shapes"]]:
                problems.append(f"{name}: param_shapes differ")
            rank = int(name.split("_")[3])
            for n, t in a["frozen_param_fragments"].items():
                numel = math.prod(a["frozen_param_shapes"][n])
                q = math.ceil(numel / dp)
                valid = max(0, min(numel, (rank + 1) * q) - rank * q)
                if not torch.equal(t[:valid], b["frozen_param_fragments"][n][:valid]):
                    problems.append(f"{name}: frozen fragment {n} differs")
        else:
            osd_a, osd_b = a["optimizer_state_dict"], b["optimizer_state_dict"]
            rank = int(name.replace("bf16_", "").split("_")[3])
            for s, (fa, fb) in enumerate(zip(osd_a["fp32_flat_groups"], osd_b["fp32_flat_groups"])):
                off = 0
                for n, shape in real_ms["param_shapes"][s].items():
                    numel = math.prod(shape)
                    q = math.ceil(numel / dp)
                    valid = max(0, min(numel, (rank + 1) * q) - rank * q)
                    if not torch.equal(fa[off: off + valid], fb[off: off + valid]):
                        problems.append(f"{name}: fp32_flat_groups[{s}] differs at {n}")
                    off += q
    sd_a = get_fp32_state_dict_from_zero_checkpoint(real_ckpt, tag=tag)
    sd_b = get_fp32_state_dict_from_zero_checkpoint(written_ckpt, tag=tag)
    if list(sd_a) != list(sd_b) or any(not torch.equal(sd_a[k].contiguous(), sd_b[k].contiguous()) for k in sd_a):
        problems.append("zero_to_fp32 output differs between the real and the written checkpoint")
    print(json.dumps({"problems": problems, "files": written_files, "dp": dp}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
