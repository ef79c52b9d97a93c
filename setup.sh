#!/usr/bin/env bash
# Creates .venv with what the project needs; `./setup.sh --dev` adds the test dependencies.
# torch is installed first and pinned, so pip never swaps in a different (multi-GB) build.
# Each step says what it installs and how long it took: the torch download alone can take minutes.
set -euo pipefail
cd "$(dirname "$0")"

step() {  # step "what" command...: announce, run, time
    local what=$1 t0=$SECONDS
    shift
    echo "setup.sh: $what ..."
    "$@"
    echo "setup.sh:   done in $((SECONDS - t0)) s"
}

if [ ! -x .venv/bin/python ]; then
    step "creating .venv with $(python3 --version)" python3 -m venv .venv
fi
pip() { .venv/bin/python -m pip install --disable-pip-version-check "$@"; }
# torch is the big download (hundreds of MB, GBs with CUDA): pip shows its progress; the rest is quiet
step "installing torch==2.13.0 (kept if already installed)" pip --progress-bar on "torch==2.13.0"
step "installing requirements.txt ($(grep -v '^ *#' requirements.txt | sed 's/ *#.*//' | grep -v torch | xargs))" \
    pip -q -r requirements.txt
if [ "${1:-}" = "--dev" ]; then
    step "installing requirements-dev.txt ($(grep -v '^ *#\|^-r' requirements-dev.txt | xargs))" pip -q -r requirements-dev.txt
fi
echo "setup.sh: ready, in $SECONDS s: .venv/bin/python train.py trains the default model"
