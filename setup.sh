#!/usr/bin/env bash
# Creates .venv with what the project needs; `./setup.sh --dev` adds the test dependencies.
# torch is installed first and pinned, so pip never swaps in a different (multi-GB) build.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -r requirements.txt
if [ "${1:-}" = "--dev" ]; then
    .venv/bin/python -m pip install -q -r requirements-dev.txt
fi
