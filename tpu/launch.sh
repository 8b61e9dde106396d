#!/usr/bin/env bash
# Launches one command on every worker of a slice (the same command everywhere: on a pod
# jax.distributed.initialize() finds the other workers by itself), detached, with a log
# per worker.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RUN_NAME=""
FORCE=0
SYNC=0
ENVS=()

usage() {
  cat <<EOF
Usage: tpu/launch.sh [flags] -- COMMAND [ARGS...]

Runs COMMAND on every worker (--worker=all) from ~/rlhi with ~/rlhi-venv/bin first on
PATH, under nohup in its own session, so it outlives the ssh connection. Each worker
logs to ~/rlhi-logs/RUN.log (tpu/logs.sh follows worker 0's). Arguments reach the
workers exactly as given here (spaces and quotes included). Re-running the same command
after a preemption resumes from the latest checkpoint in its --workdir.

  tpu/launch.sh --name rlhi-dpo --zone us-east5-a -- python -m experiments.train_dpo \\
      --config configs/dpo.py:rewrites,llama3_8b \\
      --config.model.init=gs://BUCKET/sft/hf --config.data.dir=gs://BUCKET/data \\
      --workdir gs://BUCKET/runs/dpo_8b

Flags:
  --run-name R           name of the run's log files (default: <module>-<UTC time>)
  --env KEY=VALUE        environment variable for COMMAND (repeatable)
  --sync                 copy the local code to the workers first (setup.sh --code-only)
  --force                start even if a job is still running on the slice (two jobs
                         cannot share the TPUs: stop the old one with tpu/stop.sh)

$COMMON_FLAGS_HELP
EOF
}

script_flag() {
  case $1 in
    --run-name)
      (($# >= 2)) || die "flag --run-name needs a value"; RUN_NAME=$2; CONSUMED=2 ;;
    --env)
      (($# >= 2)) || die "flag --env needs KEY=VALUE"
      [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env takes KEY=VALUE, got '$2'"
      ENVS+=("$2"); CONSUMED=2 ;;
    --sync) SYNC=1; CONSUMED=1 ;;
    --force) FORCE=1; CONSUMED=1 ;;
  esac
}

parse_flags "$@"
((${#REST[@]} > 0)) || die "no command: tpu/launch.sh [flags] -- python -m experiments.X ..."
resolve_settings

if [[ -z $RUN_NAME ]]; then
  module=job
  for ((i = 0; i + 1 < ${#REST[@]}; i++)); do
    if [[ ${REST[i]} == -m ]]; then module=${REST[i + 1]##*.}; break; fi
  done
  RUN_NAME=$module-$(date -u +%Y%m%d-%H%M%S)
fi
[[ $RUN_NAME =~ ^[A-Za-z0-9][-A-Za-z0-9_.=,+]*$ ]] ||
  die "--run-name '$RUN_NAME': use letters, digits and - _ . = , +"

if ((SYNC)); then sync_code; fi

remote=(bash tpu/remote_run.sh --run "$RUN_NAME")
if ((FORCE)); then remote+=(--force); fi
if [[ -n $BUCKET ]]; then remote+=(--log-bucket "$BUCKET/rlhi/logs/$NAME"); fi
remote+=(-- "${REST[@]}")
if ((${#ENVS[@]})); then remote=(env "${ENVS[@]}" "${remote[@]}"); fi
tpu_ssh all "cd $REMOTE_CODE_DIR && $(quote_args "${remote[@]}")"
if ((!DRY_RUN)); then
  info "follow worker 0's log: tpu/logs.sh --name $NAME --zone $ZONE --run $RUN_NAME"
fi
