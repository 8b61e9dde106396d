#!/usr/bin/env bash
# Shared by the tpu/*.sh scripts (sourced, never run): flags and environment variables
# with checked defaults, quoting, and gcloud commands that --dry-run prints instead of
# running.
#
# Every setting comes from a flag or else an environment variable (flags win):
#
#   --project P       RLHI_TPU_PROJECT      required; no default
#   --zone Z          RLHI_TPU_ZONE         default: per accelerator family (below)
#   --name N          RLHI_TPU_NAME         default: rlhi (the TPU VM and queued resource)
#   --accelerator A   RLHI_TPU_ACCELERATOR  default: v5litepod-8
#   --runtime R       RLHI_TPU_RUNTIME      default: per accelerator family (below)
#   --bucket B        RLHI_TPU_BUCKET       optional; gs://B stages code (setup.sh) and
#                                           keeps each worker's log when a run ends
#   --spot            RLHI_TPU_SPOT=1       spot capacity (create.sh)
#   --internal-ip     RLHI_TPU_INTERNAL_IP=1  ssh/scp over internal IPs (no external IP)
#   --dry-run         RLHI_TPU_DRY_RUN=1    print the commands, one per line; run nothing
#
# Accelerator families (the `--accelerator` prefix), their default runtime and zone:
#   v5litepod-N (v5e)  v2-alpha-tpuv5-lite   us-west4-a     N in 1 4 8 16 32 64 128 256
#   v5p-N              v2-alpha-tpuv5        us-east5-a     N a multiple of 8
#   v6e-N (Trillium)   v2-alpha-tpuv6e       us-east5-b     N in 1 4 8 16 32 64 128 256
#   v4-N               tpu-ubuntu2204-base   us-central2-b  N a multiple of 8

# Settings below are read by the scripts that source this file.
# shellcheck disable=SC2034

# The checkout these scripts belong to (tpu/..), and where it goes on every worker.
RLHI_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Literal strings, expanded by the worker's shell, not here.
# shellcheck disable=SC2016
REMOTE_CODE_DIR='$HOME/rlhi'
# shellcheck disable=SC2016
REMOTE_VENV='$HOME/rlhi-venv'

PROJECT=${RLHI_TPU_PROJECT:-}
ZONE=${RLHI_TPU_ZONE:-}
NAME=${RLHI_TPU_NAME:-rlhi}
ACCELERATOR=${RLHI_TPU_ACCELERATOR:-v5litepod-8}
RUNTIME=${RLHI_TPU_RUNTIME:-}
BUCKET=${RLHI_TPU_BUCKET:-}
SPOT=${RLHI_TPU_SPOT:-0}
INTERNAL_IP=${RLHI_TPU_INTERNAL_IP:-0}
DRY_RUN=${RLHI_TPU_DRY_RUN:-0}
FAMILY=""
REST=()  # arguments after `--`

COMMON_FLAGS_HELP="Common flags (each also from an environment variable; flags win):
  --project P        RLHI_TPU_PROJECT      GCP project (required)
  --zone Z           RLHI_TPU_ZONE         default: by accelerator family (v5e us-west4-a,
                                           v5p us-east5-a, v6e us-east5-b, v4 us-central2-b)
  --name N           RLHI_TPU_NAME         TPU VM / queued resource name (default: rlhi)
  --accelerator A    RLHI_TPU_ACCELERATOR  v5litepod-N | v5p-N | v6e-N | v4-N
                                           (default: v5litepod-8)
  --runtime R        RLHI_TPU_RUNTIME      default: by family (v5e v2-alpha-tpuv5-lite,
                                           v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e,
                                           v4 tpu-ubuntu2204-base)
  --bucket B         RLHI_TPU_BUCKET       gs://bucket for code staging and run logs
  --spot             RLHI_TPU_SPOT=1       spot (preemptible) capacity
  --internal-ip      RLHI_TPU_INTERNAL_IP=1  ssh/scp to internal IPs
  --dry-run          RLHI_TPU_DRY_RUN=1    print the commands, one per line, run nothing
  -h, --help         this text"

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

info() {
  echo "$(basename "$0"): $*" >&2
}

# Quotes one word for a POSIX shell; plain words stay as they are, so that printed
# commands read naturally and paste back into a shell unchanged.
shell_quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    # --flag='value with spaces' reads better than '--flag=value with spaces'.
    printf '%s' "${BASH_REMATCH[1]}"
    shell_quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${1//"'"/"'\\''"}"
  fi
}

# Joins words into one shell command line, each quoted as needed.
quote_args() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(shell_quote "$word")"
  done
  printf '%s' "$out"
}

# Runs a command, or with --dry-run prints it (one line, pasteable) instead.
run() {
  if ((DRY_RUN)); then
    quote_args "$@"
    echo
  else
    echo "+ $(quote_args "$@")" >&2
    "$@"
  fi
}

# Parses the common flags; anything else goes to the script's `script_flag FLAG [VALUE...]`
# which sets CONSUMED to the number of words it took (0: unknown flag). `--flag=value`
# and `--flag value` are the same. Words after `--` end up in REST.
parse_flags() {
  local value_flags=" --project --zone --name --accelerator --runtime --bucket "
  while (($#)); do
    if [[ $1 == --*=* ]]; then
      set -- "${1%%=*}" "${1#*=}" "${@:2}"
    fi
    if [[ $value_flags == *" $1 "* ]] && { (($# < 2)) || [[ $2 == --* ]]; }; then
      die "flag $1 needs a value"
    fi
    case $1 in
      --project) PROJECT=$2; shift 2 ;;
      --zone) ZONE=$2; shift 2 ;;
      --name) NAME=$2; shift 2 ;;
      --accelerator) ACCELERATOR=$2; shift 2 ;;
      --runtime) RUNTIME=$2; shift 2 ;;
      --bucket) BUCKET=$2; shift 2 ;;
      --spot) SPOT=1; shift ;;
      --internal-ip) INTERNAL_IP=1; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h|--help) usage; exit 0 ;;
      --) shift; REST=("$@"); return 0 ;;
      *)
        CONSUMED=0
        if declare -F script_flag >/dev/null; then
          script_flag "$@"
        fi
        ((CONSUMED)) || die "unknown flag or argument '$1' (see $(basename "$0") --help)"
        shift "$CONSUMED"
        ;;
    esac
  done
}

# Checks every setting and fills in the defaults that depend on the accelerator.
resolve_settings() {
  [[ -n $PROJECT ]] || die "no GCP project: pass --project PROJECT or export" \
    "RLHI_TPU_PROJECT=PROJECT (\`gcloud config get-value project\` shows your default)"
  [[ $PROJECT =~ ^[a-z][-a-z0-9.:]*[a-z0-9]$ ]] ||
    die "project '$PROJECT' is not a GCP project id (lowercase letters, digits, hyphens)"
  [[ $NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    die "name '$NAME': use lowercase letters, digits and hyphens, starting with a" \
      "letter (at most 63 characters)"

  local size=${ACCELERATOR##*-} default_runtime default_zone
  case $ACCELERATOR in
    v5litepod-*) FAMILY=v5e; default_runtime=v2-alpha-tpuv5-lite; default_zone=us-west4-a ;;
    v5p-*) FAMILY=v5p; default_runtime=v2-alpha-tpuv5; default_zone=us-east5-a ;;
    v6e-*) FAMILY=v6e; default_runtime=v2-alpha-tpuv6e; default_zone=us-east5-b ;;
    v4-*) FAMILY=v4; default_runtime=tpu-ubuntu2204-base; default_zone=us-central2-b ;;
    *) die "unknown accelerator type '$ACCELERATOR': expected v5litepod-N (v5e)," \
      "v5p-N, v6e-N or v4-N, e.g. v5litepod-8 or v5p-64" ;;
  esac
  [[ $size =~ ^[0-9]+$ ]] || die "accelerator '$ACCELERATOR': the size after '-' must" \
    "be a number, e.g. ${ACCELERATOR%-*}-8"
  case $FAMILY in
    v5e|v6e)
      [[ " 1 4 8 16 32 64 128 256 " == *" $size "* ]] || die "accelerator" \
        "'$ACCELERATOR': $FAMILY slices have 1, 4, 8, 16, 32, 64, 128 or 256 chips" ;;
    v5p|v4)
      ((size >= 8 && size % 8 == 0)) || die "accelerator '$ACCELERATOR': $FAMILY" \
        "sizes count TensorCores, a multiple of 8 (v5p-8 is one host, v5p-64 eight)" ;;
  esac
  RUNTIME=${RUNTIME:-$default_runtime}
  ZONE=${ZONE:-$default_zone}
  [[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ||
    die "zone '$ZONE' is not a GCP zone (e.g. us-east5-a)"
  [[ $RUNTIME =~ ^[-a-z0-9.]+$ ]] || die "runtime version '$RUNTIME' looks wrong" \
    "(e.g. v2-alpha-tpuv5-lite)"
  if [[ -n $BUCKET ]]; then
    BUCKET=gs://${BUCKET#gs://}
    BUCKET=${BUCKET%/}
    [[ $BUCKET =~ ^gs://[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9]$ ]] ||
      die "bucket '$BUCKET' is not a bucket name (gs://my-bucket)"
  fi
  [[ $SPOT =~ ^[01]$ && $INTERNAL_IP =~ ^[01]$ && $DRY_RUN =~ ^[01]$ ]] ||
    die "RLHI_TPU_SPOT, RLHI_TPU_INTERNAL_IP and RLHI_TPU_DRY_RUN take 0 or 1"
  if ((!DRY_RUN)) && ! command -v gcloud >/dev/null; then
    die "gcloud not found: install the Google Cloud CLI" \
      "(https://cloud.google.com/sdk/docs/install), or use --dry-run to see the commands"
  fi
  local spot_note=""
  if ((SPOT)); then spot_note=" spot"; fi
  info "project=$PROJECT zone=$ZONE name=$NAME accelerator=$ACCELERATOR" \
    "runtime=$RUNTIME${BUCKET:+ bucket=$BUCKET}$spot_note"
}

# `gcloud compute tpus tpu-vm ssh` to WORKER (all, or a number) running COMMAND there.
tpu_ssh() {
  local worker=$1 command=$2
  local args=(gcloud compute tpus tpu-vm ssh "$NAME" "--project=$PROJECT"
    "--zone=$ZONE" "--worker=$worker")
  if ((INTERNAL_IP)); then args+=(--internal-ip); fi
  if [[ -n $command ]]; then args+=("--command=$command"); fi
  run "${args[@]}"
}

# Copies this checkout to ~/rlhi on every worker: one tarball, through the bucket when
# there is one (one upload however many workers), else scp to each worker.
sync_code() {
  local tarball=${TMPDIR:-/tmp}/rlhi-code-$NAME.tgz
  # shellcheck disable=SC2016  # expanded on the worker
  local remote_tgz='$HOME/rlhi-code.tgz'
  run tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=__pycache__ \
    --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.ruff_cache -C "$RLHI_REPO" .
  local fetch=""
  if [[ -n $BUCKET ]]; then
    local staged=$BUCKET/rlhi/code/$NAME.tgz
    run gcloud storage cp "$tarball" "$staged"
    fetch="gcloud storage cp $staged $remote_tgz && "
  else
    local args=(gcloud compute tpus tpu-vm scp "$tarball" "$NAME:rlhi-code.tgz"
      "--project=$PROJECT" "--zone=$ZONE" --worker=all)
    if ((INTERNAL_IP)); then args+=(--internal-ip); fi
    run "${args[@]}"
  fi
  # Extract next to the old copy and swap, so that files deleted locally go away too.
  tpu_ssh all "set -euo pipefail; ${fetch}rm -rf $REMOTE_CODE_DIR.new &&\
 mkdir -p $REMOTE_CODE_DIR.new && tar -xzf $remote_tgz -C $REMOTE_CODE_DIR.new &&\
 rm -rf $REMOTE_CODE_DIR && mv $REMOTE_CODE_DIR.new $REMOTE_CODE_DIR &&\
 echo \"\$(hostname): code in $REMOTE_CODE_DIR\""
}
