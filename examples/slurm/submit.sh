#!/bin/bash
# Submit one recipe with the sizes of an env file:  examples/slurm/submit.sh RECIPE ENV_FILE [sbatch args]
#   RECIPE: convert | train | evaluate | export (examples/slurm/RECIPE.sbatch). Prints the job id.
#   Extra sbatch arguments come last, e.g. --dependency=afterok:123 --partition=batch.
# Chain:  c=$(submit.sh convert E); t=$(submit.sh train E --dependency=afterok:$c)
#         submit.sh export E --dependency=afterok:$t
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RECIPE=${1:?usage: submit.sh RECIPE ENV_FILE [sbatch args]}
ENV_FILE=${2:?usage: submit.sh RECIPE ENV_FILE [sbatch args]}
shift 2
if [ ! -f "$HERE/$RECIPE.sbatch" ]; then
  echo "error: no recipe $HERE/$RECIPE.sbatch (convert, train, evaluate, export)" >&2; exit 2
fi
if [ ! -r "$ENV_FILE" ]; then echo "error: env file '$ENV_FILE' is not readable" >&2; exit 2; fi
ENV_FILE=$(cd "$(dirname "$ENV_FILE")" && pwd)/$(basename "$ENV_FILE")
export OPDLM_REPO=${OPDLM_REPO:-$(cd "$HERE/../.." && pwd)}
# shellcheck disable=SC1090
source "$ENV_FILE"
sizes=()
case "$RECIPE" in
  train|evaluate)  # the parallel recipes: one task per GPU
    sizes=(--nodes="${NODES:-1}" --ntasks-per-node="${TASKS_PER_NODE:-8}")
    [ -n "${GPUS_PER_NODE:-}" ] && sizes+=(--gpus-per-node="$GPUS_PER_NODE")
    [ -n "${CPUS_PER_TASK:-}" ] && sizes+=(--cpus-per-task="$CPUS_PER_TASK")
    [ "$RECIPE" = train ] && [ -n "${SIGNAL:-}" ] && sizes+=(--signal="$SIGNAL")
    ;;
esac
[ -n "${TIME:-}" ] && sizes+=(--time="$TIME")
[ -n "${PARTITION:-}" ] && sizes+=(--partition="$PARTITION")
[ -n "${LOG_DIR:-}" ] && mkdir -p "$LOG_DIR" && sizes+=(--output="$LOG_DIR/%x-%j.out")
exec sbatch --parsable --export=ALL,OPDLM_REPO="$OPDLM_REPO" "${sizes[@]}" "$@" \
     "$HERE/$RECIPE.sbatch" "$ENV_FILE"
