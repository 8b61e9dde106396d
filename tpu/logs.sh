#!/usr/bin/env bash
# Streams a run's log from one worker (process 0 by default: the one that logs metrics),
# or reports on every worker whether a job is running and how the last one ended.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER=0
RUN_NAME=""
LINES=100
FOLLOW=1
STATUS=0

usage() {
  cat <<EOF
Usage: tpu/logs.sh [flags]

Follows ~/rlhi-logs/latest.log (or RUN.log) on worker 0 with tail -F; Ctrl-C stops
following, not the run.

  tpu/logs.sh --name rlhi-dpo --zone us-east5-a
  tpu/logs.sh --name rlhi-dpo --status

Flags:
  --worker N             worker to read (default: 0, process 0)
  --run R                the run's name (default: the latest run)
  --lines N              lines of history first (default: 100)
  --no-follow            print and return
  --status               on every worker: is a job running, the last run's exit code

$COMMON_FLAGS_HELP
EOF
}

script_flag() {
  case $1 in
    --worker) (($# >= 2)) || die "flag --worker needs a value"; WORKER=$2; CONSUMED=2 ;;
    --run) (($# >= 2)) || die "flag --run needs a value"; RUN_NAME=$2; CONSUMED=2 ;;
    --lines) (($# >= 2)) || die "flag --lines needs a value"; LINES=$2; CONSUMED=2 ;;
    --no-follow) FOLLOW=0; CONSUMED=1 ;;
    --status) STATUS=1; CONSUMED=1 ;;
  esac
}

parse_flags "$@"
((${#REST[@]} == 0)) || die "unexpected arguments after --: ${REST[*]}"
resolve_settings
[[ $WORKER =~ ^([0-9]+|all)$ ]] || die "--worker takes a number or all, got '$WORKER'"
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines takes a number, got '$LINES'"
[[ -z $RUN_NAME || $RUN_NAME =~ ^[A-Za-z0-9][-A-Za-z0-9_.=,+]*$ ]] ||
  die "--run '$RUN_NAME' is not a run name"

if ((STATUS)); then
  tpu_ssh all "cd $REMOTE_CODE_DIR && bash tpu/remote_run.sh --status"
  exit 0
fi
log="\$HOME/rlhi-logs/${RUN_NAME:-latest}.log"
if ((FOLLOW)); then
  tpu_ssh "$WORKER" "tail -n $LINES -F $log"
else
  tpu_ssh "$WORKER" "tail -n $LINES $log"
fi
