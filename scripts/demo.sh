#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine (as root): set up, generate a demo checkpoint, run the
# daemon in the foreground staging it into a real tmpfs, then show `ramstage status`.
# --keep leaves the daemon running in the foreground until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

demo=/var/tmp/ramstage-demo
run=/run/ramstage-demo
mkdir -p "$demo"
.venv/bin/python - "$demo/demo-model.pth" <<'PY'
import os, sys
path = sys.argv[1]
try:
    import torch
except ImportError:
    torch = None
if torch is not None:
    # A real state_dict of about 256 MiB, shaped like an image-inpainting generator's.
    generator = torch.Generator().manual_seed(0)
    state = {f"generator.model.{i}.conv.weight": torch.randn(512, 512, 3, 3, generator=generator) for i in range(28)}
    torch.save(state, path)
    print(f"generated a torch state_dict: {path} ({os.path.getsize(path) >> 20} MiB)")
else:
    with open(path, "wb") as f:
        for i in range(256):
            f.write(os.urandom(1 << 20))
    print(f"generated 256 MiB of checkpoint-like bytes (torch is not installed): {path}")
PY
cat > "$demo/ramstage.yaml" <<YAML
store: {path: $run/store, size: 1G, mount: true}
links_dir: $run/models
socket: $run/control.sock
ready: staged
memory: {min_available: 1G, resume_available: 2G}
models:
  - name: demo
    source: $demo/demo-model.pth
YAML
ramstage=(.venv/bin/ramstage)
"${ramstage[@]}" check-config "$demo/ramstage.yaml"

"${ramstage[@]}" daemon --config "$demo/ramstage.yaml" &
daemon=$!
# A stopped daemon keeps its copies for the next start; `ramstage unmount` frees them, as
# `systemctl stop` does for the service.
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon; "${ramstage[@]}" unmount --config "$demo/ramstage.yaml"' EXIT
for _ in $(seq 1 300); do
  "${ramstage[@]}" status demo --json --config "$demo/ramstage.yaml" 2>/dev/null | grep -q '"state": "staged"' && break
  sleep 0.2
done
echo
"${ramstage[@]}" status --config "$demo/ramstage.yaml"
echo
echo "applications load it through: $("${ramstage[@]}" path demo --config "$demo/ramstage.yaml")"
if [ "${1:-}" = "--keep" ]; then
  echo "the daemon keeps running in the foreground; Ctrl-C stops it, then the RAM is freed and the link goes back to the source"
  wait $daemon
fi
