#!/usr/bin/env bash
# Copies the source tree (tracked and new files, not build output or virtualenvs) into DEST:
# what the Debian and RPM builds start from.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=$1
mkdir -p "$dest"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$dest"
else
  tar --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude='./.*_cache' -cf - . | tar -C "$dest" -xf -
fi
