"""The GPU path as an application takes it: the ramstage daemon stages the checkpoints into its
tmpfs, and `ramstage.client.load(name, device="cuda")` loads them through the links.

Run on purpose, as root on a machine with a GPU (the daemon mounts a tmpfs):

    python3 benchmarks/bench_gpu_link.py --out "$OUT"

For each size and format, medians of --reps: client.load(device) through the link, and the plain
loader (torch.load(map_location); safetensors' load_file for .safetensors) through the same link.
Every client result is compared with the plain loader's (bits, layout, shared storages).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from bench_gpu import parse_size, plain_load, same, timed, write_checkpoints

from ramstage import client


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="512M,4G")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--huge", default="within_size", help="the store's store.huge setting")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/ramstage-gpu-link"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    args = parser.parse_args()
    device = torch.device("cuda")
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    sources = {}
    for size in args.sizes.split(","):
        for kind, path in write_checkpoints(parse_size(size), args.work, device).items():
            sources[f"{path.stem}-{kind}"] = path
    run = args.work / "run"
    config = args.work / "ramstage.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "store": {
                    "path": str(run / "store"),
                    "size": "12G",
                    "mount": True,
                    "huge": args.huge,
                },
                "links_dir": str(run / "models"),
                "socket": str(run / "control.sock"),
                "memory": {"min_available": "4G", "resume_available": "8G"},
                "models": [{"name": name, "source": str(path)} for name, path in sources.items()],
            }
        )
    )
    daemon = subprocess.Popen([sys.executable, "-m", "ramstage", "daemon", "--config", str(config)])
    rows = []
    try:
        for name in sources:
            client.wait_staged(name, timeout=300, config=config)
        status = [sys.executable, "-m", "ramstage", "status", "--config", str(config)]
        print(subprocess.run(status, capture_output=True, text=True, check=True).stdout, flush=True)
        for name, source in sources.items():
            link = client.resolve(name, config=config)
            nbytes = source.stat().st_size
            fast = client.load(name, device="cuda", config=config)
            identical = same(fast, plain_load(link.resolve(), device))
            del fast
            runs_client = timed(
                lambda name=name: client.load(name, device="cuda", config=config), device, args.reps
            )
            runs_plain = timed(
                lambda link=link: plain_load(link.resolve(), device), device, args.reps
            )
            row = {
                "model": name,
                "bytes": nbytes,
                "identical": identical,
                "client_median_s": statistics.median(runs_client),
                "plain_median_s": statistics.median(runs_plain),
                "client_runs_s": runs_client,
                "plain_runs_s": runs_plain,
            }
            row["client_gb_per_s"] = nbytes / row["client_median_s"] / 1e9
            row["ratio"] = row["client_median_s"] / row["plain_median_s"]
            rows.append(row)
            print(
                f"{name:24s} client.load(cuda) {row['client_median_s'] * 1e3:8.1f} ms "
                f"{row['client_gb_per_s']:6.2f} GB/s"
                f" | plain via link {row['plain_median_s'] * 1e3:8.1f} ms"
                f" | ratio {row['ratio']:.3f} | identical {identical}",
                flush=True,
            )
        client.release()
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    lines = [
        '| checkpoint | client.load(device="cuda") via link | GB/s | plain loader via link'
        " | ratio | bit-identical |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['client_median_s'] * 1e3:.1f} ms | {r['client_gb_per_s']:.1f} "
            f"| {r['plain_median_s'] * 1e3:.1f} ms | {r['ratio']:.3f} | {r['identical']} |"
        )
    (args.out / f"gpu-link-huge-{args.huge}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"gpu-link-huge-{args.huge}.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
