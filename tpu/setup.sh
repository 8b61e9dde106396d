#!/usr/bin/env bash
# Sets up every worker of a slice: copies this checkout to ~/rlhi and installs rlhi
# (pip install -e, so a later code copy is live) with jax[tpu] into ~/rlhi-venv.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CODE_ONLY=0
PYTHON_VERSION=${RLHI_TPU_PYTHON:-3.11}
JAX_VERSION=${RLHI_TPU_JAX_VERSION:-}

usage() {
  cat <<EOF
Usage: tpu/setup.sh [flags]

Copies this checkout to ~/rlhi on every worker (--worker=all; through gs://BUCKET when
--bucket is set, else scp) and installs it there: Python $PYTHON_VERSION (uv fetches it;
TPU images ship an older one) in ~/rlhi-venv with 'pip install -e ~/rlhi', jax[tpu] and
gcsfs (gs:// paths), then prints each worker's TPU devices. Re-run after changing code
(--code-only is enough then: the install is editable).

  tpu/setup.sh --project my-proj --name rlhi-dpo --zone us-east5-a
  tpu/setup.sh --name rlhi-dpo --code-only

Flags:
  --code-only            only copy the code
  --python V             RLHI_TPU_PYTHON        Python for the venv (default: 3.11)
  --jax-version V        RLHI_TPU_JAX_VERSION   pin jax[tpu]==V (default: newest)

$COMMON_FLAGS_HELP
EOF
}

script_flag() {
  case $1 in
    --code-only) CODE_ONLY=1; CONSUMED=1 ;;
    --python)
      (($# >= 2)) || die "flag --python needs a value"; PYTHON_VERSION=$2; CONSUMED=2 ;;
    --jax-version)
      (($# >= 2)) || die "flag --jax-version needs a value"; JAX_VERSION=$2; CONSUMED=2 ;;
  esac
}

parse_flags "$@"
((${#REST[@]} == 0)) || die "unexpected arguments after --: ${REST[*]}"
resolve_settings
[[ $PYTHON_VERSION =~ ^3\.[0-9]+$ ]] || die "--python takes 3.N, got '$PYTHON_VERSION'"
[[ -z $JAX_VERSION || $JAX_VERSION =~ ^[0-9]+(\.[0-9]+)*$ ]] ||
  die "--jax-version takes a version like 0.7.2, got '$JAX_VERSION'"

sync_code
if ((CODE_ONLY)); then exit 0; fi

jax_req="jax[tpu]${JAX_VERSION:+==$JAX_VERSION}"
# One script for every worker; uv installs a standalone Python and resolves quickly.
# gcsfs: etils.epath (Orbax checkpoints, rlhi's own files) reaches gs:// through it.
install="set -euo pipefail; export PATH=\$HOME/.local/bin:\$PATH;\
 command -v uv >/dev/null || python3 -m pip install --user --quiet uv;\
 [ -x $REMOTE_VENV/bin/python ] || uv venv --python $PYTHON_VERSION $REMOTE_VENV;\
 uv pip install --python $REMOTE_VENV/bin/python -e $REMOTE_CODE_DIR '$jax_req' gcsfs;\
 timeout 600 $REMOTE_VENV/bin/python -c 'import socket, jax;\
 print(socket.gethostname(), jax.local_device_count(), jax.local_devices()[0].device_kind)'"
tpu_ssh all "$install"
info "set up: launch with tpu/launch.sh --name $NAME --zone $ZONE -- python -m ..."
