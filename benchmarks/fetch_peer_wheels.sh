#!/usr/bin/env bash
# Downloads the pinned peer loaders that bench_gpu_peers.py compares fastload with, as wheels for
# the GPU machine (CPython 3.12, x86-64 manylinux), which has no package index. The GPU image
# already holds torch, safetensors and numpy, so only the peers and what they add are fetched.
#   bash benchmarks/fetch_peer_wheels.sh [DIR]     (default: .gpu-wheels)
set -euo pipefail
dest="${1:-.gpu-wheels}"
platforms=()
# pip matches manylinux_2_N exactly; the peers' wheels are tagged 2_27/2_28 and 2_30.
for n in 17 24 27 28 30 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 -d "$dest" \
  fastsafetensors==0.5.0 runai-model-streamer==0.17.0
for wheel in "$dest"/*.whl; do
  echo "$wheel needs:"
  unzip -p "$wheel" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' || true
done
