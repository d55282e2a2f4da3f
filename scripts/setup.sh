#!/usr/bin/env bash
# One-time set-up of a machine for running and testing trainwarden (Debian/Ubuntu):
#  - the Debian packages the end-to-end tests start for real (Prometheus, Alertmanager,
#    node_exporter for the overhead benchmark, Slurm + munge for the drain tests), when missing;
#  - .venv with torch==2.13.0 (CPU build) installed first, so pip never pulls a CUDA build,
#  - then trainwarden in editable mode with its dev and torch extras.
# Safe to re-run: every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    prometheus prometheus-alertmanager prometheus-node-exporter
    slurmctld slurmd munge
)
TORCH_VERSION=2.13.0
PYTHON=${PYTHON:-python3}

missing=()
for package in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then sudo=(sudo); fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup: trainwarden needs Python >= 3.11; $PYTHON is $("$PYTHON" -V 2>&1)" >&2
    exit 1
fi
if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating .venv"
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    # The exact pin matters: an open-ended torch requirement would pull a multi-GB CUDA build.
    echo "setup: installing torch==$TORCH_VERSION (CPU build)"
    .venv/bin/pip install --quiet "torch==$TORCH_VERSION"
fi
.venv/bin/pip install --quiet -e '.[dev,torch]'
# The framework extras for the integration tests, constrained to the tested versions and to the torch
# above (a framework's own torch requirement can never replace it); then check that it did not.
.venv/bin/pip install --quiet -c scripts/integrations-constraints.txt -e '.[lightning,transformers]'
if ! .venv/bin/python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')"; then
    echo "setup: torch is no longer $TORCH_VERSION after installing the framework extras" >&2
    exit 1
fi
echo "setup: done. Run the tests with: .venv/bin/pytest"
