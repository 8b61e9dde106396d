#!/usr/bin/env bash
# Creates a TPU VM or pod slice: a queued resource by default (waits in Cloud TPU's
# queue until capacity is free; the way to get spot capacity and large slices), or with
# --mode vm a plain `tpu-vm create` (immediate; fails when there is no capacity).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MODE=${RLHI_TPU_MODE:-qr}
WAIT=1
RESERVED=0
RECREATE=0
VALID_UNTIL=""

usage() {
  cat <<EOF
Usage: tpu/create.sh [flags]

Creates the TPU VM or pod slice NAME (one VM per host; a v5p-64 has 8 workers).

  tpu/create.sh --project my-proj --accelerator v5litepod-8 --name rlhi-dpo --spot
  tpu/create.sh --project my-proj --accelerator v5p-64 --zone us-east5-a --dry-run

Flags:
  --mode qr|vm           RLHI_TPU_MODE   qr (default): queued resource NAME with node
                                         NAME; vm: gcloud compute tpus tpu-vm create
  --no-wait              qr: return once queued instead of waiting for ACTIVE
  --reserved             qr: use the project's reservation
  --valid-until D        qr: give up if not provisioned within D (e.g. 6h)
  --recreate             qr: first delete queued resource NAME (e.g. after a spot
                         preemption left it SUSPENDED), then create it again

$COMMON_FLAGS_HELP
EOF
}

script_flag() {
  case $1 in
    --mode) (($# >= 2)) || die "flag --mode needs a value"; MODE=$2; CONSUMED=2 ;;
    --no-wait) WAIT=0; CONSUMED=1 ;;
    --wait) WAIT=1; CONSUMED=1 ;;
    --reserved) RESERVED=1; CONSUMED=1 ;;
    --recreate) RECREATE=1; CONSUMED=1 ;;
    --valid-until)
      (($# >= 2)) || die "flag --valid-until needs a value"; VALID_UNTIL=$2; CONSUMED=2 ;;
  esac
}

parse_flags "$@"
((${#REST[@]} == 0)) || die "unexpected arguments after --: ${REST[*]}"
resolve_settings
[[ $MODE == qr || $MODE == vm ]] || die "--mode must be qr or vm, got '$MODE'"
if [[ $MODE == vm ]] && { ((RESERVED || RECREATE)) || [[ -n $VALID_UNTIL ]]; }; then
  die "--reserved, --recreate and --valid-until are for --mode qr"
fi
if [[ -n $VALID_UNTIL && ! $VALID_UNTIL =~ ^[0-9]+[smhd]$ ]]; then
  die "--valid-until takes a duration like 30m, 6h or 2d, got '$VALID_UNTIL'"
fi

where=("--project=$PROJECT" "--zone=$ZONE")

if [[ $MODE == vm ]]; then
  args=(gcloud compute tpus tpu-vm create "$NAME" "${where[@]}"
    "--accelerator-type=$ACCELERATOR" "--version=$RUNTIME")
  if ((SPOT)); then args+=(--spot); fi
  run "${args[@]}"
  exit 0
fi

if ((RECREATE)); then
  if ((DRY_RUN)); then
    run gcloud compute tpus queued-resources delete "$NAME" "${where[@]}" --force --quiet
  elif gcloud compute tpus queued-resources describe "$NAME" "${where[@]}" \
      --format='value(state.state)' >/dev/null 2>&1; then
    run gcloud compute tpus queued-resources delete "$NAME" "${where[@]}" --force --quiet
  else
    info "no queued resource $NAME to delete"
  fi
fi

args=(gcloud compute tpus queued-resources create "$NAME" "${where[@]}"
  "--node-id=$NAME" "--accelerator-type=$ACCELERATOR" "--runtime-version=$RUNTIME")
if ((SPOT)); then args+=(--spot); fi
if ((RESERVED)); then args+=(--reserved); fi
if [[ -n $VALID_UNTIL ]]; then args+=("--valid-until-duration=$VALID_UNTIL"); fi
run "${args[@]}"

((WAIT)) || exit 0
describe=(gcloud compute tpus queued-resources describe "$NAME" "${where[@]}"
  "--format=value(state.state)")
if ((DRY_RUN)); then
  run "${describe[@]}"  # polled every 30 s until ACTIVE
  exit 0
fi
last="" failures=0
while true; do
  if ! state=$("${describe[@]}"); then
    # A passing API error should not end a wait that may last hours; a lasting one should.
    ((++failures < 5)) || die "cannot describe queued resource $NAME (5 tries)"
    sleep 30
    continue
  fi
  failures=0
  if [[ $state != "$last" ]]; then
    info "$(date -u +%H:%M:%SZ) queued resource $NAME: $state"
    last=$state
  fi
  case $state in
    ACTIVE) break ;;
    FAILED|SUSPENDED|SUSPENDING)
      die "queued resource $NAME is $state: see \`gcloud compute tpus queued-resources" \
        "describe $NAME --zone=$ZONE --project=$PROJECT\`; tpu/create.sh --recreate" \
        "asks again" ;;
  esac
  sleep 30
done
info "ready: next tpu/setup.sh --name $NAME --zone $ZONE"
