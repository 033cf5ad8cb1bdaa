# Sourced by the recipes: read the env file named by $1 and check the variables a recipe needs.
#   source "$OPDLM_REPO/examples/slurm/common.sh" "$1" VAR1 VAR2 ...
ENV_FILE=${1:-}
if [ -z "$ENV_FILE" ] || [ ! -r "$ENV_FILE" ]; then
  echo "error: env file '${ENV_FILE}' is not readable; pass it as the recipe's argument" >&2
  exit 2
fi
# shellcheck disable=SC1090
set -a  # the launcher (a child process) reads the env file's variables too
source "$ENV_FILE"
set +a
shift
for _var in "$@"; do
  if [ -z "${!_var:-}" ]; then echo "error: $_var is not set in $ENV_FILE" >&2; exit 2; fi
done
REPO=${OPDLM_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
export OPDLM_REPO=$REPO
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
PYTHON=${PYTHON:-python3}
echo "[$(basename "${BASH_SOURCE[1]:-recipe}") $(date +%T)] job ${SLURM_JOB_ID:-?} env $ENV_FILE"
