"""The command line: the only module that prints or exits."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from ramstage import __version__, bench
from ramstage.config import Config, config_path, load_config, read_yaml
from ramstage.converters import Invalid, parse_size
from ramstage.errors import ConfigError, NotFound, RamstageError, UsageError
from ramstage.protocol import request
from ramstage.store import Store
from ramstage.system import System

STAGE_TIMEOUT_SECONDS = 3700.0


def _human(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError(unit)


def _config(args: argparse.Namespace) -> tuple[Path, Config]:
    path = config_path(args.config)
    return path, load_config(path)


def _socket(args: argparse.Namespace) -> Path:
    """The socket from the config; with no config file, the default, so `status` still works.
    A file being edited may be invalid while the daemon runs on the last good one: then only
    its `socket:` key is read, so `status` still answers and `reload` reports the problems."""
    path = config_path(args.config)
    if not path.exists():
        return Config().socket
    try:
        return load_config(path).socket
    except ConfigError:
        try:
            data = read_yaml(path)
        except ConfigError:
            data = None
        socket = data.get("socket") if isinstance(data, dict) else None
        return (
            Path(socket) if isinstance(socket, str) and socket.startswith("/") else Config().socket
        )


def cmd_daemon(args: argparse.Namespace) -> int:
    from ramstage.daemon import run_daemon
    from ramstage.service import setup_logging

    system = System()
    setup_logging(system, args.debug)
    return run_daemon(config_path(args.config), system)


def _status_table(status: dict[str, Any]) -> str:
    store, memory = status["store"], status["memory"]
    swap = {True: ", can swap", False: ", never swapped", None: ""}[store.get("swappable")]
    avg10 = memory.get("psi_avg10")
    psi = "" if avg10 is None else f", PSI some avg10 {avg10:.2f}%"
    lines = [
        f"ramstage {status['version']} (pid {status['pid']})",
        (
            f"store   {store['path']}: {_human(store['used_bytes'])} used of"
            f" {_human(store['size_bytes'])}"
            f" ({'tmpfs' if store['mounted'] else 'plain directory'}{swap})"
        ),
        (
            f"memory  {_human(memory['available_bytes'])} available, evicting below"
            f" {_human(memory['min_available_bytes'])}, staging again above"
            f" {_human(memory.get('resume_available_bytes'))}"
            f"{psi}"
            f"{', UNDER PRESSURE' if memory['pressure'] else ''}"
        ),
        "",
    ]
    rows = [("NAME", "STATE", "SIZE", "GENERATION", "USERS", "PINNED", "REASON / TARGET")]
    for m in status["models"]:
        state = m["state"] if m["state"] != "staging" else f"staging {m['progress']:.0%}"
        rows.append(
            (
                m["name"],
                state,
                _human(m["size_bytes"]),
                m["generation"] or "-",
                str(len(m["users"])),
                _human(m["pinned_bytes"]) if m["pinned_bytes"] else "-",
                m["reason"] or m["target"] or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    if not status["models"]:
        lines.append("(no models configured)")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    status = request(_socket(args), "status", **({"name": args.name} if args.name else {}))
    print(json.dumps(status, indent=2) if args.json else _status_table(status))
    return 0


def cmd_path(args: argparse.Namespace) -> int:
    path, config = _config(args)
    if config.model(args.name) is None:
        raise NotFound(f"no model named {args.name} in {path}")
    print(config.links_dir / args.name)
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    if not args.names and not args.all:
        raise UsageError("name one or more models, or give --all")
    result = request(
        _socket(args), "stage", names=args.names, all=args.all, timeout=STAGE_TIMEOUT_SECONDS
    )
    print("staged: " + (", ".join(result["staged"]) or "nothing"))
    return 0


def cmd_evict(args: argparse.Namespace) -> int:
    request(_socket(args), "evict", names=args.names)
    print("evicted: " + ", ".join(args.names) + " (links point at the sources)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    result = request(_socket(args), "verify", names=args.names, timeout=STAGE_TIMEOUT_SECONDS)
    print("verified: " + (", ".join(result["verified"]) or "no staged models"))
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    result = request(_socket(args), "reload", timeout=60)
    print(f"reloaded: {result['models']} models")
    return 0


def _store(args: argparse.Namespace) -> Store:
    return Store(_config(args)[1].store, System())


def cmd_mount(args: argparse.Namespace) -> int:
    store = _store(args)
    store.open()
    size, used = store.fs.usage()
    kind = "tmpfs" if store.fs.mounted else "plain directory"
    print(f"store {store.path}: {kind}, {_human(used)} used of {_human(size)}")
    return 0


def cmd_unmount(args: argparse.Namespace) -> int:
    store = _store(args)
    if not (store.config.mount and store.fs.mounted):
        print(f"store {store.path}: not mounted")
    elif store.holds_generations():
        # After a crash links still point into the store; the next start adopts it.
        print(f"store {store.path}: left mounted, it holds generations (not stopped cleanly)")
    else:
        store.fs.unmount()
        print(f"store {store.path}: unmounted")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    path = config_path(args.path or args.config)
    config = load_config(path, check_sources=True)
    print(f"{path}: OK ({len(config.models)} models)")
    return 0


def _bench_table(result: bench.BenchResult) -> str:
    lines = [
        (
            f"torch.load of {result.title} ({_human(result.size_bytes)}),"
            f" median of {len(result.cases[0].seconds)} runs"
        ),
        f"  source:   {result.source}",
        f"  RAM copy: {result.ram_copy}",
        "",
        f"{'':<28}  {'median':>9}  {'vs RAM copy':>11}",
    ]
    for case in result.cases:
        lines.append(
            f"{case.label:<28}  {case.median_seconds:>7.3f} s  {result.ratio(case):>10.2f}x"
        )
    return "\n".join(lines + [""] + [f"note: {note}" for note in result.notes])


def cmd_bench(args: argparse.Namespace) -> int:
    if (args.name is None) == (args.size is None):
        raise UsageError("name a configured model, or give --size for a generated one")
    if args.runs < 1:
        raise UsageError("--runs must be at least 1")
    if args.name is not None:
        result = bench.bench_model(config_path(args.config), args.name, args.runs, args.file)
    else:
        result = bench.bench_generated(args.size, Path(args.dir), args.runs)
    print(_bench_table(result))
    return 0


def cmd_label_node(args: argparse.Namespace) -> int:
    import signal
    import threading

    from ramstage import nodelabels
    from ramstage.service import setup_logging

    system = System()
    setup_logging(system, args.debug)
    node = args.node or system.environ.get("NODE_NAME")
    if not node:
        raise UsageError("name the node: --node NAME, or NODE_NAME from the downward API")
    try:
        nodes = nodelabels.connect()
    except ImportError:
        raise UsageError(
            "label-node needs the kubernetes client: pip install 'ramstage[kubernetes]'"
        ) from None
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: stop.set())
    nodelabels.Labeler(nodes, node, _socket(args)).run(stop, args.interval)
    return 0


def _size_argument(text: str) -> int:
    try:
        return parse_size(text, total_bytes=System().meminfo_bytes("MemTotal"))
    except Invalid as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ramstage", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ramstage {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument(
            "--config",
            metavar="PATH",
            help="config file (default: $RAMSTAGE_CONFIG or /etc/ramstage/ramstage.yaml)",
        )
        sub.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
        sub.set_defaults(handler=handler)
        return sub

    command("daemon", cmd_daemon, "run the daemon in the foreground")
    sub = command("status", cmd_status, "state of the store, memory and every model")
    sub.add_argument("name", nargs="?", metavar="NAME")
    sub.add_argument("--json", action="store_true", help="machine-readable output")
    sub = command("path", cmd_path, "print the link path to put in an application's config")
    sub.add_argument("name", metavar="NAME")
    sub = command("stage", cmd_stage, "stage models now (after an evict, or to retry)")
    sub.add_argument("names", nargs="*", metavar="NAME")
    sub.add_argument("--all", action="store_true", help="every configured model")
    sub = command("evict", cmd_evict, "point links at the sources and free the RAM")
    sub.add_argument("names", nargs="+", metavar="NAME")
    sub = command("verify", cmd_verify, "re-hash generations in RAM against their digests")
    sub.add_argument("names", nargs="*", metavar="NAME")
    command("reload", cmd_reload, "re-read the config (as SIGHUP)")
    command(
        "mount",
        cmd_mount,
        "mount or adopt the store's tmpfs where every service sees it (the unit's ExecStartPre)",
    )
    command(
        "unmount",
        cmd_unmount,
        "unmount the store unless it holds generations (the unit's ExecStopPost)",
    )
    sub = command("check-config", cmd_check_config, "validate a config file and list its problems")
    sub.add_argument("path", nargs="?", metavar="PATH")
    sub = command(
        "label-node",
        cmd_label_node,
        "keep this Kubernetes Node's ramstage.io/MODEL labels equal to the models' states",
    )
    sub.add_argument("--node", help="the Node's name (default: $NODE_NAME)")
    sub.add_argument(
        "--interval", type=float, default=5.0, help="seconds between looks (default 5)"
    )
    sub = command("bench", cmd_bench, "time torch.load from a model's source and from RAM")
    sub.add_argument("name", nargs="?", metavar="NAME", help="a configured model")
    sub.add_argument("--size", type=_size_argument, help="generate a state_dict of SIZE (512M)")
    sub.add_argument("--dir", default="/var/tmp", help="where to write it (default /var/tmp)")
    sub.add_argument("--file", metavar="RELPATH", help="the file to load in a directory model")
    sub.add_argument("--runs", type=int, default=5, help="runs per case (default 5)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return 2 if exit.code else 0
    try:
        return int(args.handler(args))
    except RamstageError as error:
        if args.debug:
            traceback.print_exc()
        if isinstance(error, ConfigError):
            print("ramstage: the config has problems:", file=sys.stderr)
            for problem in error.problems:
                print(f"  {problem}", file=sys.stderr)
        else:
            print(f"ramstage: {error.message}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        else:
            logging.getLogger("ramstage").debug("unexpected error", exc_info=True)
            print(
                f"ramstage: unexpected error: {error} (run with --debug for details)",
                file=sys.stderr,
            )
        return 1
