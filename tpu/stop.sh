#!/usr/bin/env bash
# Stops the job running on a slice the way a preemption would: SIGTERM on every worker,
# so the training loop saves a checkpoint and exits; launching the same command again
# resumes it.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WAIT=0

usage() {
  cat <<EOF
Usage: tpu/stop.sh [flags]

Sends SIGTERM to the job on every worker (--worker=all). The loop saves a checkpoint
after the current step and exits 0.

  tpu/stop.sh --name rlhi-dpo --zone us-east5-a --wait

Flags:
  --wait                 return once the job has exited on every worker

$COMMON_FLAGS_HELP
EOF
}

script_flag() {
  case $1 in
    --wait) WAIT=1; CONSUMED=1 ;;
  esac
}

parse_flags "$@"
((${#REST[@]} == 0)) || die "unexpected arguments after --: ${REST[*]}"
resolve_settings
wait_flag=""
if ((WAIT)); then wait_flag=" --wait"; fi
tpu_ssh all "cd $REMOTE_CODE_DIR && bash tpu/remote_run.sh --stop$wait_flag"
