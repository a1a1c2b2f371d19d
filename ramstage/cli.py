"""The command line: the only module that prints or exits. build_parser() is the whole
command line, which the man page and shell completion are made from."""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, TextIO

from ramstage import __version__, bench, nodelabels, progress, units, view
from ramstage.client import staged
from ramstage.config import Config, config_path, load_config
from ramstage.converters import Invalid, parse_size
from ramstage.errors import ConfigError, NotFound, RamstageError, UsageError
from ramstage.instance import free, keep_for_restart
from ramstage.protocol import request
from ramstage.service import journal_stream
from ramstage.store import Store, fit_warnings
from ramstage.system import System
from ramstage.yamlfile import read_yaml

CLEAR = "\x1b[H\x1b[2J"
UNLESS_RESTARTING = "keep the store if UNIT is restarting, or its daemon died ($SERVICE_RESULT)"


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


def cmd_status(args: argparse.Namespace) -> int:
    socket = _socket(args)
    query = {"name": args.name} if args.name else {}
    while True:
        status = request(socket, "status", **query)
        if args.json:
            text = json.dumps(status, indent=2)
        else:
            text = view.status_text(status, args.name, sys.stdout)
        if args.watch and sys.stdout.isatty():
            text = CLEAR + text  # home, then clear: the screen is redrawn in place
        elif args.watch:
            text = f"{time.strftime('%H:%M:%S')}\n{text}\n"
        print(text, flush=True)
        if not args.watch:
            return 1 if any(view.in_trouble(m) for m in status.get("models", [])) else 0
        time.sleep(args.interval)


def cmd_path(args: argparse.Namespace) -> int:
    path, config = _config(args)
    if config.model(args.name) is None:
        raise NotFound(f"no model named {args.name} in {path}")
    print(config.links_dir / args.name)
    return 0


def _show(frames: Iterator[str]) -> None:
    """Progress goes to stderr, like git's and curl's, so stdout keeps only the outcome."""
    for frame in frames:
        print(frame, end="", file=sys.stderr, flush=True)


def _run_with_progress(socket: Path, shown: list[str], cmd: str, **args: Any) -> Any:
    work = progress.Background(socket, cmd, **args)
    work.start()
    _show(progress.frames(socket, shown, sys.stderr.isatty(), over=lambda: not work.is_alive()))
    work.join()
    return work.outcome()


def cmd_stage(args: argparse.Namespace) -> int:
    if not args.names and not args.all:
        raise UsageError("name one or more models, or give --all")
    socket = _socket(args)
    if args.no_wait:
        result = request(socket, "stage", names=args.names, all=args.all, wait=False)
        print("staging: " + (", ".join(result["staging"]) or "nothing"))
        return 0
    names = progress.model_names(socket, [] if args.all else args.names)
    result = _run_with_progress(socket, names, "stage", names=args.names, all=args.all)
    print("staged: " + (", ".join(result["staged"]) or "nothing"))
    return 0


def cmd_evict(args: argparse.Namespace) -> int:
    request(_socket(args), "evict", names=args.names)
    print("evicted: " + ", ".join(args.names) + " (links point at the sources)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    socket = _socket(args)
    names = args.names or progress.model_names(socket, [], state="staged")
    result = _run_with_progress(socket, names, "verify", names=args.names)
    print("verified: " + (", ".join(result["verified"]) or "no staged models"))
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    """0 once every model named is staged; 1 (with the reason) as soon as one cannot be, or
    at the timeout; 3 at once when no daemon runs (request raises NotRunning)."""
    socket = _socket(args)
    known = {m["name"] for m in request(socket, "status")["models"]}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        raise NotFound(f"no model named {', '.join(unknown)}")
    deadline = None if args.timeout is None else time.monotonic() + args.timeout

    def done(models: list[dict[str, Any]]) -> bool:
        if all([staged(m) for m in models]):  # a list: every model is looked at, in order
            return True
        if deadline is not None and time.monotonic() >= deadline:
            waiting = ", ".join(m["name"] for m in models if m["state"] != "staged")
            raise RamstageError(f"not staged within {args.timeout:g}s: {waiting}")
        return False

    _show(progress.frames(socket, list(args.names), sys.stderr.isatty(), done=done))
    print("staged: " + ", ".join(args.names))
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    result = request(_socket(args), "reload", timeout=60)
    print(f"reloaded: {result['models']} models")
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    store = Store(_config(args)[1].store, System())
    store.open()
    size, used = store.fs.usage()
    kind = "tmpfs" if store.fs.mounted else "plain directory"
    print(f"store {store.path}: {kind}, {units.size(used)} used of {units.size(size)}")
    return 0


def cmd_unmount(args: argparse.Namespace) -> int:
    config, system = _config(args)[1], System()
    kept = args.unless_restarting and keep_for_restart(system, args.unless_restarting)
    if kept:
        print(f"store {config.store.path}: kept, {kept}")
        return 0
    print(free(config, system))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    path = config_path(args.path or args.config)
    config = load_config(path, check_sources=True)
    for warning in fit_warnings(config):
        print(f"ramstage: warning: {warning}", file=sys.stderr)
    print(f"{path}: OK ({len(config.models)} models)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if (args.name is None) == (args.size is None):
        raise UsageError("name a configured model, or give --size for a generated one")
    if args.runs < 1:
        raise UsageError("--runs must be at least 1")
    progress = _progress_line(sys.stderr)
    try:
        if args.name is not None:
            path = config_path(args.config)
            result = bench.bench_model(path, args.name, args.runs, args.file, progress)
        else:
            result = bench.bench_generated(args.size, Path(args.dir), args.runs, progress)
    finally:
        progress("")
    print(json.dumps(result.as_json(), indent=2) if args.json else bench.table(result))
    return 0


def cmd_label_node(args: argparse.Namespace) -> int:
    nodelabels.serve(args.node, _socket(args), args.interval, debug=args.debug)
    return 0


def _progress_line(stream: TextIO) -> Callable[[str], None]:
    """On a terminal one line rewritten in place (and cleared by ""); elsewhere a line each."""

    def show(text: str) -> None:
        if stream.isatty():
            stream.write(f"\r\x1b[K{text}")
        elif text:
            stream.write(f"{text}\n")
        stream.flush()

    return show


def _size_argument(text: str) -> int:
    try:
        return parse_size(text, total_bytes=System().meminfo_bytes("MemTotal"))
    except Invalid as error:
        raise argparse.ArgumentTypeError(str(error)) from None


GLOBAL_VALUE_OPTIONS = ("--config",)


def _global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """Before or after the command: the subcommand's copies default to SUPPRESS so that they
    do not overwrite what was given before it."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=default,
        help="config file (default: $RAMSTAGE_CONFIG or /etc/ramstage/ramstage.yaml)",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default if default is argparse.SUPPRESS else False,
        help="show tracebacks and debug logs",
    )


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, help included; man pages and completion are made from it."""
    parser = argparse.ArgumentParser(
        prog="ramstage",
        description=view.HELP_DESCRIPTION,
        epilog=view.HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ramstage {__version__}")
    _global_options(parser, None)
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="ramstage COMMAND --help tells more"
    )

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        epilog = f"exit codes: {view.COMMAND_EXITS[name]}"
        sub = commands.add_parser(name, help=help, description=help, epilog=epilog)
        _global_options(sub, argparse.SUPPRESS)
        sub.set_defaults(handler=handler)
        return sub

    command("daemon", cmd_daemon, "run the daemon in the foreground (the unit's ExecStart)")
    sub = command("status", cmd_status, "state of the store, memory and every model")
    sub.add_argument("name", nargs="?", metavar="NAME", help="show every detail of this model")
    sub.add_argument("--json", action="store_true", help="machine-readable output (the contract)")
    sub.add_argument("--watch", action="store_true", help="redraw until interrupted")
    sub.add_argument(
        "--interval", type=float, default=2.0, metavar="S", help="--watch's period (default 2)"
    )
    sub = command("path", cmd_path, "print the link path to put in an application's config")
    sub.add_argument("name", metavar="NAME", help="a configured model")
    sub = command("stage", cmd_stage, "stage models now (after an evict, or to retry)")
    sub.add_argument("names", nargs="*", metavar="NAME", help="configured models to stage")
    sub.add_argument("--all", action="store_true", help="every configured model")
    sub.add_argument("--no-wait", action="store_true", help="return at once; copies go on")
    sub = command("evict", cmd_evict, "point links at the sources and free the RAM")
    sub.add_argument("names", nargs="+", metavar="NAME", help="configured models to evict")
    sub = command("verify", cmd_verify, "re-hash generations in RAM against their digests")
    sub.add_argument("names", nargs="*", metavar="NAME", help="default: every staged model")
    sub = command("wait", cmd_wait, "wait until models are staged (for scripts and probes)")
    sub.add_argument("names", nargs="+", metavar="NAME", help="configured models to wait for")
    sub.add_argument(
        "--timeout", type=float, metavar="S", help="give up after S seconds (default: never)"
    )
    command("reload", cmd_reload, "re-read the config (as SIGHUP)")
    command("mount", cmd_mount, "mount or adopt the store's tmpfs for all (ExecStartPre)")
    sub = command("unmount", cmd_unmount, "free the store a stop left (ExecStopPost)")
    sub.add_argument("--unless-restarting", metavar="UNIT", help=UNLESS_RESTARTING)
    sub = command("check-config", cmd_check_config, "validate a config file and list its problems")
    sub.add_argument("path", nargs="?", metavar="PATH", help="the file (default: --config's)")
    sub = command("label-node", cmd_label_node, "keep this Kubernetes Node's labels on the models")
    sub.add_argument("--node", help="the Node's name (default: $NODE_NAME)")
    sub.add_argument("--interval", type=float, default=5.0, metavar="S", help="default 5 s")
    _bench_arguments(
        command("bench", cmd_bench, "time loading a model from its source and from RAM")
    )
    return parser


def _bench_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("name", nargs="?", metavar="NAME", help="a configured model")
    sub.add_argument("--size", type=_size_argument, help="generate a state_dict of SIZE (512M)")
    sub.add_argument("--dir", default="/var/tmp", help="where to write it (default /var/tmp)")
    sub.add_argument(
        "--file", metavar="RELPATH", help="load only this file of a directory model (default: all)"
    )
    sub.add_argument("--runs", type=int, default=5, help="runs per case (default 5)")
    sub.add_argument("--json", action="store_true", help="the table as JSON")


def _mistyped(argv: list[str], parser: argparse.ArgumentParser) -> str | None:
    """A message with a suggestion when the first word that is no option is no command."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    words = iter(argv)
    for word in words:
        if word in GLOBAL_VALUE_OPTIONS:
            next(words, None)
        elif not word.startswith("-"):
            if word in commands.choices:
                return None
            close = difflib.get_close_matches(word, list(commands.choices), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            return f"unknown command '{word}'{hint} (ramstage --help lists them)"
    return None


def _report(error: RamstageError) -> None:
    """On stderr; as errors in the journal when systemd runs the command (the unit's mount)."""
    lines = [f"ramstage: {error.message}"]
    if isinstance(error, ConfigError):
        lines = ["ramstage: the config has problems:", *(f"  {p}" for p in error.problems)]
    prefix = "<3>" if journal_stream(System(), sys.stderr) else ""
    print("\n".join(prefix + line for line in lines), file=sys.stderr)


def _quiet_stdout() -> None:
    """The reader went away (`status | head -1`): what is left unwritten goes nowhere, and
    no 'Broken pipe' follows at exit (the Python docs' recipe for SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    mistyped = _mistyped(argv, parser)
    if mistyped:
        print(f"ramstage: {mistyped}", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return 2 if exit.code else 0
    try:
        code = int(args.handler(args))
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except RamstageError as error:
        if args.debug:
            traceback.print_exc()
        _report(error)
        return error.exit_code
    except KeyboardInterrupt:
        return 0 if getattr(args, "watch", False) else 130
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
