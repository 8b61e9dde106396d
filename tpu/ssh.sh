#!/usr/bin/env bash
# Runs a short command on the workers in the foreground (copying weights to local disk,
# checking versions, freeing a stuck TPU), or opens a shell on one worker.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER=""

usage() {
  cat <<EOF
Usage: tpu/ssh.sh [flags] [-- COMMAND [ARGS...]]

With a command: runs it from ~/rlhi with ~/rlhi-venv/bin first on PATH on every worker
(--worker=all) and waits for it. Without: an interactive shell on worker 0.

  tpu/ssh.sh --name rlhi-dpo -- python -c 'import jax; print(jax.devices())'
  tpu/ssh.sh --name rlhi-dpo --worker 3

Flags:
  --worker N|all         default: all with a command, 0 without

$COMMON_FLAGS_HELP
EOF
}

script_flag() {
  case $1 in
    --worker) (($# >= 2)) || die "flag --worker needs a value"; WORKER=$2; CONSUMED=2 ;;
  esac
}

parse_flags "$@"
resolve_settings
if ((${#REST[@]} == 0)); then
  WORKER=${WORKER:-0}
  [[ $WORKER =~ ^[0-9]+$ ]] || die "an interactive shell needs one worker, got '$WORKER'"
  tpu_ssh "$WORKER" ""
  exit 0
fi
WORKER=${WORKER:-all}
[[ $WORKER =~ ^([0-9]+|all)$ ]] || die "--worker takes a number or all, got '$WORKER'"
tpu_ssh "$WORKER" "cd $REMOTE_CODE_DIR && export PATH=$REMOTE_VENV/bin:\$PATH &&\
 $(quote_args "${REST[@]}")"
