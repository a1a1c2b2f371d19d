#!/usr/bin/env bash
# Reproduces docs/benchmarks.md, as root: bash benchmarks/run.sh [--runs 5] [--size 512M]
# Installs what the benchmark alone needs (vmtouch, matplotlib), then runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v vmtouch >/dev/null || { apt-get update -q && apt-get install -y -q vmtouch; }
[ -x .venv/bin/python ] || { python3 -m venv .venv && .venv/bin/pip install -q -e . torch==2.13.0; }
.venv/bin/python -c 'import matplotlib' 2>/dev/null || .venv/bin/pip install -q matplotlib
exec .venv/bin/python -W ignore benchmarks/load_devices.py "$@"
