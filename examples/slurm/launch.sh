#!/bin/bash
# Shared launcher for the recipes in examples/slurm: one task per GPU (per slot on CPU) of the
# current allocation, started by srun, each running `python -u ARGS...` from the repository.
#
#   examples/slurm/launch.sh tools/train.py --config job.yaml train.run_dir=...
#
# The ranks read SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID themselves (no torchrun: a signal
# reaches every rank directly, and no agent SIGKILLs them 30 s after forwarding it).
# Environment (all optional):
#   OPDLM_REPO        repository root (default: the directory above this script's folder)
#   PYTHON            interpreter (default: python3)
#   OPDLM_DEVICE      gpu | cpu (default: gpu when nvidia-smi is present)
#   CONTAINER_IMAGE   run the tasks in this image with pyxis/enroot (--container-image);
#   CONTAINER_MOUNTS  its --container-mounts (default: the repository and the run directory)
#   SRUN_ARGS         extra srun arguments, e.g. "--cpu-bind=none"
set -euo pipefail
if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "error: launch.sh runs inside a SLURM allocation (sbatch or salloc)" >&2; exit 2
fi
REPO=${OPDLM_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
PYTHON=${PYTHON:-python3}
if [ -z "${OPDLM_DEVICE:-}" ]; then
  OPDLM_DEVICE=cpu; command -v nvidia-smi >/dev/null 2>&1 && OPDLM_DEVICE=gpu
fi

# Rendezvous: the first host of the allocation; a port from the job id keeps jobs that share a
# node apart (a requeued job keeps its id, hence its port).
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "$OPDLM_DEVICE" = gpu ]; then
  # What Megatron users expect: one outstanding kernel queue so TP comms overlap in order
  # (needed before Blackwell with TP/CP > 1), NCCL errors raised instead of hangs.
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...: set them for your fabric in the env file.
fi

container=()
if [ -n "${CONTAINER_IMAGE:-}" ]; then
  container=(--container-image="$CONTAINER_IMAGE"
             --container-mounts="${CONTAINER_MOUNTS:-$REPO:$REPO${RUN_DIR:+,$RUN_DIR:$RUN_DIR}}"
             --container-workdir="$REPO")
fi
echo "[launch] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NTASKS} tasks on" \
     "$SLURM_JOB_NODELIST, master $MASTER_ADDR:$MASTER_PORT, $OPDLM_DEVICE: $*"
# --kill-on-bad-exit=0: ranks leave together after agreeing on a stop (exit 3); a crashed rank
# makes the others fail at their next collective.
# shellcheck disable=SC2086
exec srun --kill-on-bad-exit=0 "${container[@]}" ${SRUN_ARGS:-} "$PYTHON" -u "$@"
