#!/usr/bin/env bash
# Builds ramstage_VERSION_all.deb into OUT_DIR (default: dist/) from a clean copy of the tree.
# Needs: dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-dist}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
bash packaging/copy-source.sh "$work/ramstage"
cp -r packaging/debian "$work/ramstage/debian"
# Debian's own python3 builds the package, whatever python3 comes first in PATH.
(cd "$work/ramstage" && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b >"$work/build.log" 2>&1) || {
  cat "$work/build.log" >&2
  exit 1
}
cp "$work"/ramstage_*_all.deb "$out/"
ls "$out"/ramstage_*_all.deb
