"""The markdown tables and target checks of bench_gpu_peers.py's report."""

from __future__ import annotations

import statistics
from typing import Any

COLUMNS = [(size, store) for size in ("512 MiB", "4 GiB") for store in ("never", "within_size")]
NAMES = {
    "fastload": "**ramstage.fastload**",
    "fsst-new": "fastsafetensors 0.5.0 (nogds), new loader per load",
    "runai": "runai-model-streamer 0.17.0, then .to(cuda)",
    "load_file": "safetensors.torch.load_file(device=cuda)",
    "torch.load": "torch.load(map_location=cuda)",
}


def _cell(row: dict[str, Any] | None, key: str) -> str:
    if row is None:
        return ""
    seconds = row[key]
    return f"{seconds * 1e3:.1f} ({row['bytes'] / seconds / 1e9:.1f})"


def _best_kept(rows: list[dict], size: str, store: str) -> dict | None:
    kept = [
        r
        for r in rows
        if r["loader"].startswith("fsst-kept") and (r["size"], r["store"]) == (size, store)
    ]
    return min(kept, key=lambda r: r["warm_s"]) if kept else None


def table(rows: list[dict], fmt: str) -> list[str]:
    header = "| loader | " + " | ".join(
        f"{size} huge={store} {when}" for size, store in COLUMNS for when in ("first", "warm")
    )
    lines = [header + " |", "|---" + "|---:" * (2 * len(COLUMNS)) + "|"]
    mine = [r for r in rows if r["format"] == fmt]
    for name in dict.fromkeys(r["loader"] for r in mine if not r["loader"].startswith("fsst-kept")):
        cells = []
        for size, store in COLUMNS:
            row = next(
                (r for r in mine if (r["loader"], r["size"], r["store"]) == (name, size, store)),
                None,
            )
            cells += [_cell(row, "first_s"), _cell(row, "warm_s")]
        lines.append(f"| {NAMES.get(name, name)} | " + " | ".join(cells) + " |")
    if fmt == "safetensors":
        cells = []
        for size, store in COLUMNS:
            best = _best_kept(mine, size, store)
            label = best["loader"].removeprefix("fsst-kept-") if best else ""
            cells += [f"{_cell(best, 'first_s')} [{label}]", f"{_cell(best, 'warm_s')} [{label}]"]
        lines.append(
            "| fastsafetensors, loader kept, best bounce buffer | " + " | ".join(cells) + " |"
        )
    return lines


def ratios(rows: list[dict], fmt: str) -> list[str]:
    """fastload over the fastest peer, per cell (below 1: fastload is ahead)."""
    out = []
    mine = [r for r in rows if r["format"] == fmt]
    for size, store in COLUMNS:
        here = [r for r in mine if (r["size"], r["store"]) == (size, store)]
        fast = next(r for r in here if r["loader"] == "fastload")
        peers = [r for r in here if not r["loader"].startswith("fastload")]
        if not peers:
            continue
        for key in ("first_s", "warm_s"):
            best = min(peers, key=lambda r: r[key])
            out.append(
                f"- {fmt} {size} huge={store} {key[:-2]}: fastload {fast[key] * 1e3:.1f} ms, "
                f"fastest peer {best['loader']} {best[key] * 1e3:.1f} ms, "
                f"ratio {fast[key] / best[key]:.2f}"
            )
    return out


def markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    lines = [
        (
            "Each cell: median ms (GB/s). first: the first load in a fresh process (CUDA "
            "context excluded); warm: the loads after it in those processes. The loaders of "
            "one checkpoint took turns, one process each."
        ),
        "",
    ]
    for fmt in ("safetensors", "pth"):
        lines += [f"### .{fmt}", "", *table(rows, fmt), "", *ratios(rows, fmt), ""]
    contexts = [r["context_s"] for r in rows]
    lines.append(
        f"CUDA context creation, median over all cells: {statistics.median(contexts) * 1e3:.0f} ms"
    )
    for label, runs in report["ceiling"].items():
        lines.append(
            f"Pinned host-to-device copy alone, {label}: {statistics.median(runs) * 1e3:.1f} ms"
        )
    lines += [
        "",
        "### Workers loading the 4 GiB .safetensors at once",
        "",
        (
            "| store | processes | threads sized by LOCAL_WORLD_SIZE | median round ms | "
            "× one warm load | target (≤ processes ×) |"
        ),
        "|---|---:|---|---:|---:|---|",
    ]
    for w in report["workers"]:
        solo = next(
            r["warm_s"]
            for r in rows
            if (r["loader"], r["size"], r["format"], r["store"])
            == ("fastload", "4 GiB", "safetensors", w["store"])
        )
        ratio = statistics.median(w["rounds_s"]) / solo
        lines.append(
            f"| {w['store']} | {w['processes']} | {w['sized']} | "
            f"{statistics.median(w['rounds_s']) * 1e3:.1f} | {ratio:.2f} | "
            f"{'met' if ratio <= w['processes'] else 'missed'} |"
        )
    lines.append("")
    lines.append(
        "Bit-identical to the plain loader: "
        + ", ".join(
            f"{r['loader']} {r['format']} {r['size']} {r['store']}: {r['identical']}"
            for r in rows
            if r["identical"] is not None
        )
    )
    return "\n".join(lines) + "\n"
