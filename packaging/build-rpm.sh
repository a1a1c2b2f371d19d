#!/usr/bin/env bash
# Builds ramstage-VERSION-1.noarch.rpm into OUT_DIR (default: dist/) with `rpmbuild -bb`.
# On a system without the systemd/Python RPM macros (Debian's rpm package) it loads stand-ins
# and skips the BuildRequires check, which Debian's empty rpm database cannot satisfy.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-dist}")
version=$(sed -n 's/^Version: *//p' packaging/rpm/ramstage.spec)
top=$(mktemp -d)
trap 'rm -rf "$top"' EXIT
mkdir -p "$out" "$top/SOURCES"
bash packaging/copy-source.sh "$top/ramstage-$version"
tar -C "$top" -czf "$top/SOURCES/ramstage-$version.tar.gz" "ramstage-$version"
cp units/ramstage.sysusers "$top/SOURCES/"
options=(--define "_topdir $top")
if [ -z "$(rpm --eval '%{?_unitdir}')" ]; then
  options+=(--nodeps --load packaging/rpm/macros.fallback)
fi
PATH=/usr/sbin:/usr/bin:/sbin:/bin rpmbuild -bb "${options[@]}" packaging/rpm/ramstage.spec >"$top/build.log" 2>&1 || {
  cat "$top/build.log" >&2
  exit 1
}
cp "$top"/RPMS/noarch/ramstage-*.rpm "$out/"
ls "$out"/ramstage-*.rpm
