"""One measured torch.load in a fresh process, for load_devices.py.

The orchestrator starts this in the cgroup whose throttle emulates a device, so the process that
reads is the one that is throttled. It prints one JSON line: the seconds torch.load took and the
seconds it then took to touch every page of every tensor (mmap=True defers the reading there).
With --hold it waits on stdin before loading and again before exiting, so the orchestrator can
read its memory (PSS) before and after.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from typing import Any

PAGE_BYTES = 4096


def touch_every_page(state: dict[str, Any]) -> None:
    import torch

    for value in state.values():
        if isinstance(value, torch.Tensor):
            as_bytes = torch.empty(0, dtype=torch.uint8).set_(value.untyped_storage())
            as_bytes[::PAGE_BYTES].sum()  # one byte of each page: every page faults in once


def main() -> None:
    parser = argparse.ArgumentParser()
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--path", help="torch.load this file")
    where.add_argument("--client", metavar="NAME", help="ramstage.client.load(NAME)")
    parser.add_argument("--config", help="the ramstage config, with --client")
    parser.add_argument("--mmap", action="store_true")
    parser.add_argument("--touch", action="store_true", help="then read a byte of every page")
    parser.add_argument("--hold", action="store_true", help="wait on stdin before and after")
    args = parser.parse_args()

    import torch

    from ramstage import client  # imported before the clock starts, as an application would

    # torch's first load initialises lazily; do that on a tiny file so it is not timed.
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)
    if args.hold:
        print("ready", flush=True)
        sys.stdin.readline()

    start = time.perf_counter()
    if args.client:
        state = client.load(args.client, config=args.config, mmap=args.mmap)
    else:
        state = torch.load(args.path, map_location="cpu", mmap=args.mmap, weights_only=True)
    loaded = time.perf_counter()
    if args.touch:
        touch_every_page(state)
    touched = time.perf_counter()
    print(json.dumps({"load_s": loaded - start, "touch_s": touched - loaded}), flush=True)
    if args.hold:
        sys.stdin.read()  # keep the tensors alive until the orchestrator has measured


if __name__ == "__main__":
    main()
