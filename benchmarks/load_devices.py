"""The slow-load problem and ramstage's answer, measured side by side in one run (root).

    sudo bash benchmarks/run.sh            # = .venv/bin/python benchmarks/load_devices.py

A torch state_dict (512 MiB by default) on an ext4 loop device, loaded by a fresh process:
cold through blkio throttles that emulate an HDD, a SATA SSD and an NVMe SSD (page cache
dropped before every run); locked in the page cache by vmtouch; through the ramstage link
after the real daemon staged it into its tmpfs (plain and mmap=True). Then the memory (PSS) of
1 and 4 worker processes loading it with and without mmap, and the first-touch cost of mmap on
tmpfs with and without huge=within_size. Prints markdown tables and writes a PNG chart.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import testbed

from ramstage.bench import save_state_dict
from ramstage.converters import parse_size

WORKER = Path(__file__).with_name("load_once.py")
MODEL = "lama"
DEVICES = {"HDD": 150e6, "SATA SSD": 520e6, "NVMe SSD": 3e9}  # read bytes/s
PUBLISHED = {"HDD": 5.8, "SATA SSD": 1.1, "NVMe SSD": 0.4, "RAM disk": 0.1}  # 512 MB, seconds
STORES = {"4 KiB pages": "", "huge=within_size": "huge=within_size"}  # store tmpfs options
TARGETS = (  # (what, numerator row, denominator row, bound): measured ratio must be <= bound
    ("link >= 10x faster than emulated HDD", "ramstage link", "HDD (150 MB/s), cold", 0.1),
    (
        "link >= 3x faster than emulated SATA SSD",
        "ramstage link",
        "SATA SSD (520 MB/s), cold",
        1 / 3,
    ),
    ("link within 1.1x of page-cache-hot source", "ramstage link", "source locked by vmtouch", 1.1),
    ("link mmap <= 0.2x plain load via link", "ramstage link, mmap=True", "ramstage link", 0.2),
)  # fmt: skip


def link_row(row: str, store: str) -> str:
    """'ramstage link, mmap=True' on a store -> 'ramstage link (store), mmap=True'."""
    return row.replace("ramstage link", f"ramstage link (store {store})")


def worker(*args: str, cgroup: Path | None = None) -> dict[str, float]:
    def join_cgroup() -> None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))  # type: ignore[operator]

    result = subprocess.run(
        [sys.executable, str(WORKER), *args],
        preexec_fn=join_cgroup if cgroup else None,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def repeat(runs: int, *args: str, cgroup: Path | None = None) -> list[dict[str, float]]:
    """Each run in a fresh process, after dropping the page cache."""
    results = []
    for _ in range(runs):
        testbed.drop_caches()
        results.append(worker(*args, cgroup=cgroup))
    return results


def median(results: list[dict[str, float]], key: str = "load_s") -> float:
    return statistics.median(r[key] for r in results)


def total(run: dict[str, float]) -> float:
    """A run's time to usable tensors: the load, plus touching every page where asked."""
    return run["load_s"] + run["touch_s"]


def medians(results: dict) -> dict[str, float]:
    return {label: statistics.median(map(total, runs)) for label, runs in results["rows"].items()}


def load_times(workdir: Path, source_file: Path, device: str, runs: int) -> dict[str, list]:
    rows: dict[str, list] = {}
    with testbed.throttles(device, DEVICES) as groups:
        for label, rate in DEVICES.items():
            row = f"{label} ({rate / 1e6:.0f} MB/s), cold"
            rows[row] = repeat(runs, "--path", str(source_file), cgroup=groups[label])
    rows["device unthrottled, cold"] = repeat(runs, "--path", str(source_file))
    with testbed.vmtouch_locked(source_file):
        rows["source locked by vmtouch"] = repeat(runs, "--path", str(source_file))
    memory, huge_pages = {}, {}
    for index, (store, options) in enumerate(STORES.items()):
        daemon_dir = workdir / f"ramstage-{index}"
        before = testbed.meminfo_bytes("ShmemHugePages")
        with testbed.staged_by_daemon(daemon_dir, MODEL, source_file, options) as config:
            huge_pages[store] = testbed.meminfo_bytes("ShmemHugePages") - before
            link = ["--client", MODEL, "--config", str(config)]
            rows[link_row("ramstage link", store)] = repeat(runs, *link)
            rows[link_row("ramstage link, mmap=True", store)] = repeat(runs, *link, "--mmap")
            rows[link_row("ramstage link, mmap=True, every page touched", store)] = repeat(
                runs, *link, "--mmap", "--touch"
            )
            memory[store] = worker_memory(link)
    return {"rows": rows, "memory": memory, "store_huge_pages_bytes": huge_pages}


def worker_memory(link: list[str]) -> dict[str, dict[str, int]]:
    """Total PSS growth of N workers from before to after they load and touch the model."""
    memory = {}
    for mmap in (False, True):
        for count in (1, 4):
            extra = ["--mmap"] if mmap else []
            procs = [
                subprocess.Popen(
                    [sys.executable, str(WORKER), *link, *extra, "--touch", "--hold"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for _ in range(count)
            ]
            for p in procs:
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            before = sum(testbed.pss_bytes(p.pid) for p in procs)
            for p in procs:
                p.stdin.write("go\n")  # type: ignore[union-attr]
                p.stdin.flush()  # type: ignore[union-attr]
            for p in procs:
                p.stdout.readline()  # type: ignore[union-attr]
            after = sum(testbed.pss_bytes(p.pid) for p in procs)
            for p in procs:
                p.communicate()
            label = f"{count} worker{'s' if count > 1 else ''}, {'mmap=True' if mmap else 'plain'}"
            memory[label] = {"model_pss_bytes": after - before, "total_pss_bytes": after}
    return memory


def first_touch(workdir: Path, model: Path, runs: int) -> dict[str, dict[str, float]]:
    """mmap load + touching every page from tmpfs with and without transparent huge pages."""
    table = {}
    for option in ("huge=never", "huge=within_size"):
        with testbed.tmpfs(workdir / option.replace("=", "-"), f"size=2G,{option}") as mount:
            before = testbed.meminfo_bytes("ShmemHugePages")
            testbed.copy_preallocated(model, mount / "model.pt")
            huge = testbed.meminfo_bytes("ShmemHugePages") - before
            path = ["--path", str(mount / "model.pt")]
            mapped = repeat(runs, *path, "--mmap", "--touch")
            plain = repeat(runs, *path)
            table[option] = {
                "huge_pages_bytes": huge,
                "mmap_load_s": median(mapped),
                "first_touch_s": median(mapped, "touch_s"),
                "plain_load_s": median(plain),
            }
    return table


def report(results: dict, size_bytes: int, runs: int) -> str:
    rows = medians(results)
    link = rows[link_row("ramstage link", "huge=within_size")]
    out = [
        (
            f"torch.load of a {size_bytes / 2**20:.0f} MiB state_dict, median of {runs} runs"
            " (fresh process each, page cache dropped before each run)"
        ),
        "",
        "| case | median | vs link (huge store) | runs (s) |",
        "|---|---:|---:|---|",
    ]
    for label, seconds in rows.items():
        every = ", ".join(f"{total(r):.3f}" for r in results["rows"][label])
        out.append(f"| {label} | {seconds:.3f} s | {seconds / link:.2f}x | {every} |")
    out.append("")
    for store, huge in results["store_huge_pages_bytes"].items():
        out.append(f"Huge pages in the store {store} once staged: {huge / 2**20:.0f} MiB")
    out += ["", "| target | " + " | ".join(f"store {s}" for s in STORES) + " |", "|---|---|---|"]
    for what, numerator, denominator, bound in TARGETS:
        cells = []
        for store in STORES:
            ratio = rows[link_row(numerator, store)] / rows[link_row(denominator, store)]
            cells.append(f"{ratio:.3f}x {'met' if ratio <= bound else 'NOT met'}")
        out.append(f"| {what} (<= {bound:.3g}x) | " + " | ".join(cells) + " |")
    cells = []
    for store in STORES:
        memory = results["memory"][store]
        one, four = memory["1 worker, mmap=True"], memory["4 workers, mmap=True"]
        ratio = four["model_pss_bytes"] / one["model_pss_bytes"]
        cells.append(f"{ratio:.3f}x {'met' if ratio <= 1.2 else 'NOT met'}")
    out.append("| 4 mmap workers <= 1.2x memory of one | " + " | ".join(cells) + " |")
    out += [
        "",
        "| store | workers | model PSS (growth while loading) | total PSS |",
        "|---|---|---:|---:|",
    ]
    for store in STORES:
        for label, m in results["memory"][store].items():
            out.append(
                f"| {store} | {label} | {m['model_pss_bytes'] / 2**20:.0f} MiB"
                f" | {m['total_pss_bytes'] / 2**20:.0f} MiB |"
            )
    out += [
        "",
        "| tmpfs | huge pages used | mmap load | first touch of every page | plain load |",
        "|---|---:|---:|---:|---:|",
    ]
    for option, t in results["first_touch"].items():
        out.append(
            f"| {option} | {t['huge_pages_bytes'] / 2**20:.0f} MiB | {t['mmap_load_s']:.4f} s"
            f" | {t['first_touch_s']:.4f} s | {t['plain_load_s']:.3f} s |"
        )
    return "\n".join(out)


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = medians(results)
    published = {
        "HDD (150 MB/s), cold": PUBLISHED["HDD"],
        "SATA SSD (520 MB/s), cold": PUBLISHED["SATA SSD"],
        "NVMe SSD (3000 MB/s), cold": PUBLISHED["NVMe SSD"],
        link_row("ramstage link", "huge=within_size"): PUBLISHED["RAM disk"],
    }
    labels = [label for label in rows if "touched" not in label]
    fig, ax = plt.subplots(figsize=(11, 5.5))
    y = [float(i) for i in range(len(labels))]
    measured = [rows[label] for label in labels]
    ax.barh(y, measured, height=0.6, color="#4878a8", label="measured here (median)")
    marked = [(i, published[label]) for i, label in enumerate(labels) if label in published]
    ax.barh(
        [i + 0.42 for i, _ in marked],
        [v for _, v in marked],
        height=0.22,
        color="#e0a0a0",
        hatch="//",
        label="published comparison: HDD, SATA SSD, NVMe SSD, RAM disk",
    )
    for i, seconds in enumerate(measured):
        ax.text(seconds * 1.06, i, f"{seconds:.3f} s", va="center", fontsize=8)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("seconds for torch.load (log scale)")
    runs = len(next(iter(results["rows"].values())))
    ax.set_title(f"torch.load of a 512 MiB state_dict, median of {runs} runs")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, -0.32), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="512M", help="state_dict size (default 512M)")
    parser.add_argument("--runs", type=int, default=5, help="runs per case (default 5)")
    parser.add_argument("--out", default="docs", help="where the chart goes (default docs)")
    parser.add_argument("--dir", default="/var/tmp", help="work directory on a real disk")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: loop devices, mounts, cgroups and drop_caches")
    size_bytes = parse_size(args.size)
    workdir = Path(tempfile.mkdtemp(prefix="ramstage-bench-", dir=args.dir))
    try:
        model = workdir / "model.pt"
        save_state_dict(model, size_bytes)
        disk_bytes = model.stat().st_size + (256 << 20)
        with testbed.loop_filesystem(workdir / "disk.img", disk_bytes, workdir / "disk") as device:
            source = workdir / "disk" / "model.pt"
            shutil.copyfile(model, source)
            results = load_times(workdir, source, device, args.runs)
        results["first_touch"] = first_touch(workdir, model, args.runs)
    finally:
        shutil.rmtree(workdir)
    print(report(results, size_bytes, args.runs))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    chart(results, Path(args.out) / "benchmarks-load.png")
    (Path(args.out) / "benchmarks-results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
