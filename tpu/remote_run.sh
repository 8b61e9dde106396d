#!/usr/bin/env bash
# Runs ON each TPU worker, from ~/rlhi (tpu/launch.sh, logs.sh and stop.sh call it over
# ssh): starts a job detached from the ssh session, reports on it, or stops it.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage (on a worker, from ~/rlhi):
  bash tpu/remote_run.sh --run NAME [--force] [--log-bucket gs://B/PREFIX] -- CMD...
      start CMD in the background (nohup, own session) with ~/rlhi-venv/bin first on
      PATH; output to ~/rlhi-logs/NAME.log (~/rlhi-logs/latest.log points to it), exit
      code to ~/rlhi-logs/NAME.exit; with --log-bucket the log is copied to
      gs://B/PREFIX/NAME/<host>.log when CMD ends. Refuses while a job runs (--force).
  bash tpu/remote_run.sh --status      is a job running; how did the last one end
  bash tpu/remote_run.sh --stop [--wait]
      SIGTERM to the job's process group: the training loop saves a checkpoint and
      exits (re-running the same launch command resumes); --wait until it has.
EOF
}

LOG_DIR=${RLHI_LOG_DIR:-$HOME/rlhi-logs}
VENV=${RLHI_VENV:-$HOME/rlhi-venv}
PID_FILE=$LOG_DIR/current.pid
HOST=$(hostname)

die() {
  echo "[$HOST] remote_run.sh: error: $*" >&2
  exit 2
}

# Prints the pid of the running job, if any; fails when there is none.
job_pid() {
  local pid
  [[ -f $PID_FILE ]] || return 1
  pid=$(<"$PID_FILE")
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

last_run() {
  local link
  link=$(readlink "$LOG_DIR/latest.log" 2>/dev/null) || return 1
  basename "$link" .log
}

action="" run="" force=0 wait=0 log_bucket=""
while (($#)); do
  case $1 in
    --run) (($# >= 2)) || die "--run needs a value"; run=$2; action=${action:-start}; shift 2 ;;
    --force) force=1; shift ;;
    --log-bucket) (($# >= 2)) || die "--log-bucket needs a value"; log_bucket=$2; shift 2 ;;
    --foreground) action=foreground; shift ;;
    --status) action=status; shift ;;
    --stop) action=stop; shift ;;
    --wait) wait=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -n $action ]] || { usage >&2; exit 2; }
mkdir -p "$LOG_DIR"

case $action in
  start)
    (($#)) || die "no command after --"
    [[ $run =~ ^[A-Za-z0-9][-A-Za-z0-9_.=,+]*$ ]] || die "bad run name '$run'"
    if pid=$(job_pid) && ((!force)); then
      die "a job is still running here (pid $pid, run $(last_run || echo '?')): stop" \
        "it with tpu/stop.sh (it saves a checkpoint), or launch with --force"
    fi
    log=$LOG_DIR/$run.log
    ln -sfn "$run.log" "$LOG_DIR/latest.log"
    rm -f "$LOG_DIR/$run.exit"
    # Own session (setsid) so that the job outlives the ssh connection and stop.sh can
    # signal the whole process group.
    setsid nohup bash "$0" --foreground --run "$run" ${log_bucket:+--log-bucket "$log_bucket"} \
      -- "$@" >>"$log" 2>&1 </dev/null &
    echo $! >"$PID_FILE"
    echo "[$HOST] started run $run (pid $!); log: $log"
    ;;

  foreground)
    export PATH="$VENV/bin:$PATH"
    # Every worker of the slice runs this: rlhi.sharding.initialize_distributed() then
    # calls jax.distributed.initialize(), which finds the peers from the TPU metadata.
    export RLHI_DISTRIBUTED=${RLHI_DISTRIBUTED:-1}
    # A trap (rather than the default action) keeps this wrapper alive while the job
    # handles SIGTERM itself, so the exit code is still recorded.
    trap 'echo "[rlhi] SIGTERM: the job saves a checkpoint and exits; re-run the same \
launch command to resume"' TERM
    echo "[rlhi] $(date -u +%Y-%m-%dT%H:%M:%SZ) $HOST run $run: $*"
    set +e
    "$@"
    rc=$?
    set -e
    echo "[rlhi] $(date -u +%Y-%m-%dT%H:%M:%SZ) $HOST run $run: exit code $rc"
    echo "$rc" >"$LOG_DIR/$run.exit"
    if [[ -n $log_bucket ]]; then
      gcloud storage cp --quiet "$LOG_DIR/$run.log" "$log_bucket/$run/$HOST.log" || true
    fi
    if [[ $(cat "$PID_FILE" 2>/dev/null) == "$$" ]]; then rm -f "$PID_FILE"; fi
    exit "$rc"
    ;;

  status)
    if pid=$(job_pid); then
      echo "[$HOST] running: run $(last_run || echo '?') (pid $pid)"
    elif run=$(last_run); then
      rc=$(cat "$LOG_DIR/$run.exit" 2>/dev/null || echo "none recorded (killed?)")
      echo "[$HOST] idle: last run $run, exit code $rc"
    else
      echo "[$HOST] idle: no run yet"
    fi
    ;;

  stop)
    if ! pid=$(job_pid); then
      echo "[$HOST] no job running"
      exit 0
    fi
    kill -TERM -- "-$pid"
    echo "[$HOST] SIGTERM sent to run $(last_run || echo '?') (pid $pid): it saves a" \
      "checkpoint and exits"
    if ((wait)); then
      while kill -0 "$pid" 2>/dev/null; do sleep 2; done
      echo "[$HOST] stopped"
    fi
    ;;
esac
