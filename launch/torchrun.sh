#!/usr/bin/env bash
# sat_dist under torchrun: every worker runs `python -m sat_dist load ARGS...`.
#
# One node (all its GPUs, or NPROC_PER_NODE workers):
#   launch/torchrun.sh CKPT --tp 4 --config configs/cogvideox_5b.yaml
#   NPROC_PER_NODE=4 launch/torchrun.sh CKPT --tp 2 --report load.json
# Several nodes (the same line on every node; MASTER_ADDR is node 0, which hosts the rendezvous):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun.sh CKPT --tp 8     # on 10.0.0.1
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/torchrun.sh CKPT --tp 8     # on the other node
# A first argument `env` or `demo` runs that subcommand instead of `load`:
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/torchrun.sh env            # what each rank sees
#
# Environment (defaults in brackets):
#   NNODES [1]  NODE_RANK [0]  NPROC_PER_NODE [GPUs per node if nvidia-smi works, else 1]
#   MASTER_ADDR, MASTER_PORT [29500]  rendezvous endpoint (node 0's address), multi-node only
#   RDZV_ID [$SLURM_JOB_ID or sat-dist]  the same on every node of one job, different between jobs
#   LOCAL_ADDR   this node's address as the other nodes reach it; needed when the hostname resolves
#                to 127.0.0.1 (e.g. containers), otherwise the workers advertise loopback and hang
#   TORCHRUN [torchrun]  TORCHRUN_ARGS  extra torchrun options, e.g. "--max_restarts=0"
# Set GLOO_SOCKET_IFNAME (CPU) or NCCL_SOCKET_IFNAME (GPU) to the interface that joins the nodes.
set -euo pipefail

sub=load
if [[ $# -gt 0 && "$1" =~ ^(load|demo|env)$ && ! -e "$1" ]]; then sub="$1"; shift; fi

TORCHRUN="${TORCHRUN:-torchrun}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=1
  if command -v nvidia-smi >/dev/null 2>&1 && n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')" && [[ "$n" -gt 0 ]]; then
    NPROC_PER_NODE="$n"
  fi
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

args=(--nproc_per_node="$NPROC_PER_NODE")
if [[ "$NNODES" == 1 ]]; then
  args+=(--standalone)
else
  if [[ -z "${MASTER_ADDR:-}" ]]; then
    echo "launch/torchrun.sh: NNODES=$NNODES needs MASTER_ADDR=<node 0's address> on every node" >&2
    exit 2
  fi
  # Node 0 hosts the c10d rendezvous store. Saying so explicitly avoids torchrun's guess, which
  # fails when the hostname resolves to loopback (every agent then waits for a store nobody runs).
  is_host=0; [[ "$NODE_RANK" == 0 ]] && is_host=1
  args+=(--nnodes="$NNODES" --rdzv_backend=c10d
         --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id="${RDZV_ID:-${SLURM_JOB_ID:-sat-dist}}"
         --rdzv_conf=is_host="$is_host")
  [[ -n "${LOCAL_ADDR:-}" ]] && args+=(--local_addr="$LOCAL_ADDR")
fi
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of options
exec "$TORCHRUN" "${args[@]}" ${TORCHRUN_ARGS:-} -m sat_dist "$sub" "$@"
