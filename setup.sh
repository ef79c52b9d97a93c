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
    "$@" || { local rc=$?; echo "setup.sh:   failed (exit $rc) after $((SECONDS - t0)) s"; return $rc; }
    echo "setup.sh:   done in $((SECONDS - t0)) s"
}

if [ ! -x .venv/bin/python ]; then
    step "creating .venv with $(python3 --version)" python3 -m venv .venv
fi
pip() { .venv/bin/python -m pip install --disable-pip-version-check "$@"; }
# the package names of a requirements file, for the step line: comments, -r lines and blanks dropped
names() { sed -e 's/#.*//' -e '/^ *-r/d' "$1" | tr -s ' \n' ' ' | sed 's/^ //; s/ $//'; }
# torch is the big download (hundreds of MB, GBs with CUDA): pip shows its progress; the rest is quiet.
# Without an NVIDIA GPU, PyPI's Linux torch is still the CUDA build plus ~17 nvidia/triton packages (GBs
# a CPU never uses): take the CPU build from PyTorch's own index, and PyPI's if that index cannot be reached.
CPU_INDEX=https://download.pytorch.org/whl/cpu
if [ "$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "setup.sh: no NVIDIA GPU found (no nvidia-smi): installing the CPU build of torch from $CPU_INDEX"
    step "installing torch==2.13.0, CPU build (kept if already installed)" \
        pip --progress-bar on --timeout 20 --retries 1 --index-url "$CPU_INDEX" "torch==2.13.0" ||
        step "that index could not be used: installing torch==2.13.0 from PyPI instead" \
            pip --progress-bar on "torch==2.13.0"
else
    step "installing torch==2.13.0 (kept if already installed)" pip --progress-bar on "torch==2.13.0"
fi
step "installing requirements.txt ($(names requirements.txt | sed 's/torch==[^ ]* //'))" pip -q -r requirements.txt
if [ "${1:-}" = "--dev" ]; then
    step "installing requirements-dev.txt ($(names requirements-dev.txt))" pip -q -r requirements-dev.txt
fi
echo "setup.sh: ready, in $SECONDS s: .venv/bin/python train.py trains the default model"
