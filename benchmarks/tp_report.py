"""bench_gpu_tp.py's rounds, as the ranks reported them, summed up into rates and a table."""

from __future__ import annotations

import statistics
from typing import Any

MODES = ("slices", "files", "whole")
LOADERS = ("fastload", "fastsafetensors", "load_file")


def summarize(world: int, items: list[dict[str, Any]], cpu: bool) -> dict[str, Any]:
    def span(rows: list[dict[str, Any]]) -> float:
        return float(max(r["end"] for r in rows) - min(r["start"] for r in rows))

    def rounds(kind: str, **key: Any) -> dict[int, list[dict[str, Any]]]:
        chosen: dict[int, list[dict[str, Any]]] = {}
        for item in items:
            if item["kind"] == kind and all(item.get(k) == v for k, v in key.items()):
                chosen.setdefault(item["rep"], []).append(item)
        return chosen

    alone = [i["gbps"] for i in items if i["kind"] == "h2d alone"]
    together = [len(r) * r[0]["nbytes"] / span(r) / 1e9 for r in rounds("h2d together").values()]
    read_bytes = {rep: sum(i["nbytes"] for i in r) for rep, r in rounds("host read bytes").items()}
    host = [read_bytes[rep] / span(r) / 1e9 for rep, r in rounds("host read").items()]
    bound = min(world * statistics.median(alone), statistics.median(host))
    out: dict[str, Any] = {
        "world": world,
        "cpu": cpu,
        "h2d_alone_gbps": alone,
        "h2d_together_gbps": together,
        "host_read_gbps": host,
        "bound_gbps": bound,
        "loads": [],
    }
    cells = sorted(
        {(i["mode"], i["loader"]) for i in items if i["kind"] == "load"},
        key=lambda cell: (MODES.index(cell[0]), LOADERS.index(cell[1])),
    )
    for mode, loader in cells:
        landed = rounds("landed", mode=mode, loader=loader)
        times = {rep: span(r) for rep, r in rounds("load", mode=mode, loader=loader).items()}
        gbps = {rep: sum(i["nbytes"] for i in landed[rep]) / t / 1e9 for rep, t in times.items()}
        warm = [gbps[rep] for rep in sorted(gbps) if rep > 0]
        checks = landed[0]
        out["loads"].append(
            {
                "mode": mode,
                "loader": loader,
                "bytes": sum(i["nbytes"] for i in landed[0]),
                "first_round_s": times[0],
                "first_round_gbps": gbps[0],
                "warm_rounds_s": [times[r] for r in sorted(times) if r > 0],
                "warm_gbps": statistics.median(warm) if warm else None,
                "identical": all(i["why"] is None for i in checks),
                "why_not": [i["why"] for i in checks if i["why"]],
            }
        )
    return out


def markdown(summary: dict[str, Any]) -> str:
    med = statistics.median
    lines = [
        f"#### {summary['world']} processes",
        "",
        *(
            ["Dry run: the CPU is the target; no rate here says anything about GPUs.", ""]
            if summary["cpu"]
            else []
        ),
        (
            f"Bound: {summary['bound_gbps']:.1f} GB/s = min({summary['world']} x one GPU's pinned"
            f" copy {med(summary['h2d_alone_gbps']):.1f} GB/s, host read"
            f" {med(summary['host_read_gbps']):.1f} GB/s); all GPUs' pinned copies at once:"
            f" {med(summary['h2d_together_gbps']):.1f} GB/s."
        ),
        "",
        "| mode | loader | GB landed | warm GB/s (median) | x bound | first round GB/s | bit-identical |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in summary["loads"]:
        warm = row["warm_gbps"] or float("nan")
        lines.append(
            f"| {row['mode']} | {row['loader']} | {row['bytes'] / 1e9:.2f} | {warm:.1f} | "
            f"{warm / summary['bound_gbps']:.2f} | {row['first_round_gbps']:.1f} | {row['identical']} |"
        )
    return "\n".join(lines + ["", *verdicts(summary)]) + "\n"


def verdicts(summary: dict[str, Any]) -> list[str]:
    """Issue 18's targets, per mode: fastload at >= 0.8 x the bound, and >= fastsafetensors."""
    warm = {(r["mode"], r["loader"]): r["warm_gbps"] for r in summary["loads"]}
    lines = []
    for mode in MODES:
        ours, peer = warm.get((mode, "fastload")), warm.get((mode, "fastsafetensors"))
        if ours is None:
            continue
        ratio = ours / summary["bound_gbps"]
        line = f"- {mode}: fastload {ours:.1f} GB/s, {ratio:.2f} x bound ({_met(ratio >= 0.8)})"
        if peer is not None:
            line += f"; fastsafetensors {peer:.1f} GB/s ({_met(ours >= peer)})"
        lines.append(line)
    return lines


def _met(ok: bool) -> str:
    return "met" if ok else "missed"
