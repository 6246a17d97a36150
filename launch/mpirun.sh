#!/usr/bin/env bash
# sat_dist under mpirun, Open MPI or MPICH/Hydra (told apart by `mpirun --version`): every rank
# runs `python -m sat_dist load ARGS...`. Ranks, local ranks and rank 0's address come from the
# MPI launcher (mpi4py broadcasts the rendezvous), so no MASTER_ADDR is needed.
#
#   NP=4 launch/mpirun.sh CKPT --tp 2                                 # one node, 4 ranks
#   NP=16 NPROC_PER_NODE=8 HOSTFILE=hosts launch/mpirun.sh CKPT --tp 8   # 2 nodes listed in `hosts`
#   NP=4 MPIRUN_ARGS=--oversubscribe launch/mpirun.sh CKPT --tp 2     # more ranks than cores (Open MPI)
#   NP=4 launch/mpirun.sh env                                         # print what each rank detected
#
# Environment: NP [1] ranks in all; NPROC_PER_NODE ranks per node (with HOSTFILE); HOSTFILE one host
# per line (Open MPI `--hostfile`, MPICH `-f`); MPIRUN [mpirun]; MPIRUN_ARGS extra mpirun options;
# PYTHON [python3] the interpreter that has sat_dist and mpi4py on every node (or a command prefix
# ending in one, e.g. "apptainer exec --nv sat-dist.sif python").
# Open MPI: run as root only in containers; the script then passes --allow-run-as-root.
# Open MPI forwards only the variables named with -x to remote nodes; the list is below.
set -euo pipefail

sub=load
if [[ $# -gt 0 && "$1" =~ ^(load|demo|env)$ && ! -e "$1" ]]; then sub="$1"; shift; fi

MPIRUN="${MPIRUN:-mpirun}"
PYTHON="${PYTHON:-python3}"
NP="${NP:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if ! version="$("$MPIRUN" --version 2>&1)"; then
  echo "launch/mpirun.sh: '$MPIRUN --version' failed: $version" >&2; exit 2
fi
args=(-np "$NP")
case "$version" in
  *"Open MPI"*|*"Open RTE"*|*prterun*|*PRRTE*)
    # Open MPI binds each rank to one core by default: torch's threads then fight over it.
    args+=(--bind-to none)
    [[ "$(id -u)" == 0 ]] && args+=(--allow-run-as-root)
    [[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE")
    [[ -n "${NPROC_PER_NODE:-}" ]] && args+=(--map-by "ppr:${NPROC_PER_NODE}:node")
    for var in PATH LD_LIBRARY_PATH PYTHONPATH OMP_NUM_THREADS MASTER_ADDR MASTER_PORT SAT_DIST_CACHE \
               GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME CUDA_VISIBLE_DEVICES; do
      [[ -n "${!var:-}" ]] && args+=(-x "$var")
    done
    ;;
  *HYDRA*|*MPICH*|*"Intel(R) MPI"*)
    # Hydra passes the whole environment to every rank, local or remote, by default.
    [[ -n "${HOSTFILE:-}" ]] && args+=(-f "$HOSTFILE")
    [[ -n "${NPROC_PER_NODE:-}" ]] && args+=(-ppn "$NPROC_PER_NODE")
    ;;
  *)
    echo "launch/mpirun.sh: '$MPIRUN' is neither Open MPI nor MPICH/Hydra:" >&2
    echo "$version" | head -n 3 >&2; exit 2
    ;;
esac
# shellcheck disable=SC2086  # MPIRUN_ARGS and PYTHON are word lists
exec "$MPIRUN" "${args[@]}" ${MPIRUN_ARGS:-} $PYTHON -m sat_dist "$sub" "$@"
