#!/usr/bin/env bash
# Sets everything up on a fresh Debian 12 machine (as root) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# The end-to-end tests build the .deb and .rpm and boot a Debian container.
E2E_APT="debootstrap systemd-container dpkg-dev debhelper dh-python pybuild-plugin-pyproject"
E2E_APT+=" python3-all python3-setuptools lintian rpm git"
# The package builds generate the man pages and completion with Debian's own tools, from the
# CLI's parser (which imports the daemon's modules).
E2E_APT+=" python3-argparse-manpage python3-shtab python3-prometheus-client python3-xxhash python3-yaml"
E2E_APT+=" python3-sdnotify"
# The unit tests render the man pages and load the completion in bash and zsh.
E2E_APT+=" man-db groff-base zsh"
# The fast loader's copy loop in C is built at install (setup.py) and tested with the rest.
E2E_APT+=" gcc libc6-dev"
RAMSTAGE_EXTRA_APT="$E2E_APT" bash scripts/setup.sh -e ".[test]"
# Lint first: it takes seconds, and a failure there needs no test run to be seen.
.venv/bin/ruff check ramstage tests benchmarks scripts
.venv/bin/ruff format --check ramstage tests benchmarks scripts
.venv/bin/mypy ramstage
RAMSTAGE_TEST_COPYLOOP=1 exec .venv/bin/python -m pytest -ra "$@"
