#!/usr/bin/env bash
# Sets everything up on a fresh Debian 12 machine (as root) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# The end-to-end tests build the .deb and .rpm and boot a Debian container.
E2E_APT="debootstrap systemd-container dpkg-dev debhelper dh-python pybuild-plugin-pyproject"
E2E_APT+=" python3-all python3-setuptools lintian rpm git"
RAMSTAGE_EXTRA_APT="$E2E_APT" bash scripts/setup.sh -e ".[test]"
# Lint first: it takes seconds, and a failure there needs no test run to be seen.
.venv/bin/ruff check ramstage tests benchmarks scripts
.venv/bin/ruff format --check ramstage tests benchmarks scripts
.venv/bin/mypy ramstage
exec .venv/bin/python -m pytest -ra "$@"
