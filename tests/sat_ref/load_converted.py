"""Load a SAT checkpoint written by `sat-dist convert` with the real SwissArmyTransformer (SAT 0.4.12).

Run with the reference venv under torchrun, one rank per model-parallel rank of the checkpoint:

    .venv-sat/bin/torchrun --standalone --nproc_per_node=M tests/sat_ref/load_converted.py --ckpt DIR --out FILE

SAT's own entry points only: `get_args` (inference mode, gloo, model parallel M), then
`BaseModel.from_pretrained(DIR, args)` (THUDM/SwissArmyTransformer sat/model/base_model.py), which
reads DIR/model_config.json into the args, builds the model at mp=M and runs SAT's
`load_checkpoint` (sat/training/model_io.py: `latest` -> `<iteration>/mp_rank_XX_model_states.pt`,
`load_state_dict(sd['module'])`; in inference mode a missing key is an error). Rank 0 saves every
rank's state dict, `[rank 0's, rank 1's, ...]`, to FILE.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from sat import get_args  # noqa: E402
from sat.model import BaseModel  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    world = int(os.environ["WORLD_SIZE"])
    args = get_args(["--mode", "inference", "--distributed-backend", "gloo", "--model-parallel-size", str(world)])
    torch.set_num_threads(1)
    model, _ = BaseModel.from_pretrained(a.ckpt, args)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = [None] * world
    torch.distributed.all_gather_object(out, sd)
    if torch.distributed.get_rank() == 0:
        torch.save(out, a.out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
