#!/usr/bin/env bash
# Sets everything up on a fresh Debian 12 machine (as root) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
RAMSTAGE_EXTRA_APT="debootstrap systemd-container" bash scripts/setup.sh -e ".[test]"
exec .venv/bin/python -m pytest -ra "$@"
