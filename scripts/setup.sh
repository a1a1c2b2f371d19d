#!/usr/bin/env bash
# Installs what ramstage needs on Debian 12 (as root) into .venv; sourced by demo.sh and test.sh.
# Extra pip arguments: "$@" (test.sh asks for the test extras).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

APT_PACKAGES=(python3 python3-venv python3-pip util-linux procps psmisc)
APT_PACKAGES+=(${RAMSTAGE_EXTRA_APT:-})
missing=()
for package in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# torch is pinned: an unpinned torch pulls several GB of CUDA packages. numpy only quiets a
# warning torch prints without it. pip's notes about absent extra index folders are noise.
.venv/bin/pip install -q -e "." "torch==2.13.0" numpy "$@" 2> >(grep -v "is ignored: it is neither" >&2)
