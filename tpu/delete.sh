#!/usr/bin/env bash
# Deletes a slice: the queued resource together with its TPU VMs (default), or a TPU VM
# made with `create.sh --mode vm`. Work directories in GCS are left alone.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MODE=${RLHI_TPU_MODE:-qr}
YES=0

usage() {
  cat <<EOF
Usage: tpu/delete.sh [flags]

  tpu/delete.sh --name rlhi-dpo --zone us-east5-a

Flags:
  --mode qr|vm           RLHI_TPU_MODE   qr (default): delete queued resource NAME and
                                         its VMs (--force); vm: delete TPU VM NAME
  --yes                  do not ask for confirmation

$COMMON_FLAGS_HELP
EOF
}

script_flag() {
  case $1 in
    --mode) (($# >= 2)) || die "flag --mode needs a value"; MODE=$2; CONSUMED=2 ;;
    --yes|-y) YES=1; CONSUMED=1 ;;
  esac
}

parse_flags "$@"
((${#REST[@]} == 0)) || die "unexpected arguments after --: ${REST[*]}"
resolve_settings
[[ $MODE == qr || $MODE == vm ]] || die "--mode must be qr or vm, got '$MODE'"

if ((!DRY_RUN && !YES)) && [[ -t 0 ]]; then
  read -r -p "Delete TPU $NAME in $ZONE ($PROJECT)? Running jobs die unsaved. [y/N] " reply
  [[ $reply == [yY]* ]] || die "not deleted"
fi
where=("--project=$PROJECT" "--zone=$ZONE")
if [[ $MODE == qr ]]; then
  run gcloud compute tpus queued-resources delete "$NAME" "${where[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$NAME" "${where[@]}" --quiet
fi
