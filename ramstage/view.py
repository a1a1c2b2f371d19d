"""`status --json` as people read it: the store and memory header, the model table fit to the
terminal, one model in every detail, and progress lines for long work. Returns text only;
cli.py prints it. Colour is the caller's choice (a terminal, and no NO_COLOR)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, TextIO

from ramstage import units

HELP_DESCRIPTION = """\
ramstage keeps ML model checkpoints in RAM: the daemon copies each configured model into a
size-bounded tmpfs, verifies it, and publishes a stable link (/run/ramstage/models/NAME) that
applications load from. Under memory pressure a link goes back to the source and the RAM is
freed; when pressure passes, the model is staged again."""

HELP_EPILOG = """\
examples:
  ramstage status                    the store, memory and every model
  ramstage status lama               every detail of one model
  ramstage status --watch            redrawn every 2 s
  ramstage stage lama                stage now, with a progress bar
  ramstage wait lama sd15 --timeout 600 && systemctl start webui
  ramstage path lama                 the path to put in an application's config
  ramstage --config ./ramstage.yaml check-config

exit codes:
  0  done; for status: running, and no model in error or missing
  1  the operation failed; for status: a model is in error, untrusted, missing its
     source or its link; for wait: a model cannot be staged, or the timeout passed
  2  usage or config error, or an unknown model name
  3  the daemon is not running
  4  permission denied (stage, evict, verify and reload need root or the group ramstage)"""

# Each command's exit codes (docs/design.md), at the end of its --help.
COMMAND_EXITS = {
    "daemon": "0 clean stop, 1 failed (or another daemon runs on its store or socket),"
    " 2 config error",
    "status": "0 running and no model in trouble, 1 a model in trouble, 2 unknown NAME,"
    " 3 not running",
    "path": "0 printed, 2 unknown NAME or config error",
    "stage": "0 staged, 1 one could not be (its reason), 2 unknown NAME, 3 not running,"
    " 4 permission denied",
    "evict": "0 evicted, 2 unknown NAME, 3 not running, 4 permission denied",
    "verify": "0 every copy matches, 1 a mismatch (it is staged again), 3 not running,"
    " 4 permission denied",
    "wait": "0 every model staged, 1 one cannot be (its reason) or the timeout passed,"
    " 2 unknown NAME, 3 not running",
    "reload": "0 reloaded, 2 invalid config (the running one is kept), 3 not running,"
    " 4 permission denied",
    "mount": "0 mounted or adopted, 1 failed",
    "unmount": "0 freed, or kept for a restart, 1 failed (a daemon runs), 2 config error",
    "check-config": "0 valid (warnings on stderr), 2 problems",
    "label-node": "0 stopped (labels removed), 1 failed, 2 no node name or no kubernetes client",
    "bench": "0 measured, 1 failed, 2 usage error",
}

BAR_WIDTH = 20
GAP = "  "
# States whose model needs someone's attention: `status` exits 1 for them (cli.py).
TROUBLE_REASONS = ("error", "untrusted", "source_missing")
_COLOURS = {"staged": "32", "staging": "36", "pending": "36", "fallback": "33", "missing": "31"}


@dataclass(frozen=True)
class Style:
    colour: bool

    @classmethod
    def for_stream(cls, stream: TextIO) -> Style:
        """Colour only on a terminal, never with NO_COLOR set (no-color.org) or TERM=dumb."""
        env = os.environ
        return cls(stream.isatty() and not env.get("NO_COLOR") and env.get("TERM") != "dumb")

    def paint(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.colour and code and text else text


def terminal_width(stream: TextIO) -> int | None:
    """On a terminal, $COLUMNS or else its width; None in a pipe, where lines are never cut
    (scripts read whole reasons), and on a terminal that does not know its width."""
    if not stream.isatty():
        return None
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    return os.get_terminal_size(stream.fileno()).columns or None


def in_trouble(model: dict[str, Any]) -> bool:
    """In error, refused by the trust rule, or without its source or its link."""
    reason = model.get("reason") or ""
    return model["state"] == "missing" or reason.split(":")[0] in TROUBLE_REASONS


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    filled = round(min(max(fraction, 0.0), 1.0) * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def header(status: dict[str, Any], style: Style, width: int | None = None) -> list[str]:
    """Five or six short lines; on a narrow terminal the store's path is cut in its middle."""
    store, memory = status["store"], status["memory"]
    size, used = store["size_bytes"], store["used_bytes"]
    kind = "tmpfs" if store["mounted"] else "plain directory"
    swap = {True: ", can swap", False: ", never swapped", None: ""}[store.get("swappable")]
    where = f" ({kind}{swap})"
    path = store["path"]
    if width is not None:
        path = cut_middle(path, max(width - len("store   ") - len(where), 12))
    avg10 = memory.get("psi_avg10")
    pressure = style.paint("UNDER PRESSURE", "31") if memory["pressure"] else "no pressure"
    lines = [
        f"ramstage {status['version']} (pid {status['pid']})",
        f"store   {path}{where}",
        f"        {bar(used / size if size else 0)} {units.size(used)} of {units.size(size)} used",
    ]
    if rings := status.get("rings"):
        held = f"{units.size(rings['used_bytes'])} of {units.size(rings['size_bytes'])}"
        lines.append(f"rings   {held} kept for GPU loads")
    return [
        *lines,
        f"memory  {units.size(memory['available_bytes'])} available,"
        f" floor {units.size(memory['min_available_bytes'])},"
        f" resume {units.size(memory.get('resume_available_bytes'))}",
        f"        PSI {psi_text(memory.get('psi_trigger'))}"
        f"{'' if avg10 is None else f', avg10 {avg10:.2f}%'}; {pressure}",
    ]


def where(model: dict[str, Any]) -> str:
    return {"staged": "ram", "missing": "none"}.get(model["state"], "ssd")


def copy_text(copy: dict[str, Any] | None) -> str:
    """`1.2 GiB of 2.0 GiB, 3 of 16 files at 150 MiB/s, ETA 5.0s`: a copy or a verify in
    flight."""
    if not copy:
        return ""
    if not copy["total_bytes"]:
        return "starting"
    done, total, rate = copy["done_bytes"], copy["total_bytes"], copy["rate_bytes_per_second"]
    eta = (total - done) / rate if rate else None
    eta_text = units.duration(eta)
    total_files = copy.get("files_total") or 0  # a verify's, or an older daemon's: none
    files = f", {copy['files_done']} of {_files(total_files)}" if total_files > 1 else ""
    return f"{units.size(done)} of {units.size(total)}{files} at {units.rate(rate)}, ETA {eta_text}"


def _files(count: int) -> str:
    return f"{count} file{'s' * (count != 1)}"


def psi_text(trigger: str | None) -> str:
    """`some 150000 1000000` (the kernel's microseconds) as `some 150ms/1s`."""
    if not trigger:
        return "no trigger"
    kind, stall, window = trigger.split()
    return f"{kind} {units.duration(int(stall) / 1e6)}/{units.duration(int(window) / 1e6)}"


def reason_text(model: dict[str, Any]) -> str:
    """The REASON column: why not in RAM (with figures), the copy in flight, files skipped."""
    parts = [units.reason(model.get("reason"), model.get("reason_figures"))]
    if model.get("copy"):
        parts.append("copying " + copy_text(model["copy"]))
    skipped = model.get("skipped") or []
    if skipped:
        parts.append(f"{_files(len(skipped))} skipped ({skipped[0]})")
    return "; ".join(p for p in parts if p)


def _state(model: dict[str, Any]) -> str:
    if model["state"] == "staging":
        return f"staging {model['progress']:.0%}"
    return str(model["state"])


def _size(model: dict[str, Any]) -> str:
    if model.get("size_bytes") is not None:
        return units.size(model["size_bytes"])
    copy = model.get("copy")
    return units.size(copy["total_bytes"]) if copy else "-"


def _row(model: dict[str, Any], now: float) -> dict[str, str]:
    digest = model.get("digest")
    since = model.get("since")
    return {
        "NAME": model["name"],
        "STATE": _state(model),
        "WHERE": where(model),
        "SIZE": _size(model),
        "DIGEST": digest.partition(":")[2][:8] if digest else "-",
        "SINCE": units.duration(now - since) if since else "-",
        "USERS": str(len(model["users"])),
        "PINNED": units.size(model["pinned_bytes"]) if model["pinned_bytes"] else "-",
        "REASON": reason_text(model),
    }


# Dropped in this order when the terminal is too narrow; NAME, STATE, SIZE and REASON stay.
OPTIONAL = ("PINNED", "DIGEST", "USERS", "SINCE", "WHERE")
COLUMNS = ("NAME", "STATE", "WHERE", "SIZE", "DIGEST", "SINCE", "USERS", "PINNED", "REASON")
NAME_MIN, REASON_MIN = 12, 24


def cut_middle(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    keep = width - 1
    return text[: (keep + 1) // 2] + "…" + text[len(text) - keep // 2 :]


def cut_end(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _widths(rows: list[dict[str, str]], width: int | None) -> dict[str, int]:
    """Each column's width; with a terminal width, optional columns go first, then the long
    name is cut in its middle and the reason at its end. The state is never cut."""
    natural = {c: max(len(c), *(len(r[c]) for r in rows)) for c in COLUMNS}
    if width is None:
        return natural
    columns = list(COLUMNS)

    def fixed() -> int:
        return sum(natural[c] for c in columns if c not in ("NAME", "REASON")) + len(GAP) * (
            len(columns) - 1
        )

    def least() -> int:
        return min(natural["NAME"], NAME_MIN) + min(natural["REASON"], REASON_MIN)

    for optional in OPTIONAL:
        if fixed() + least() <= width:
            break
        columns.remove(optional)
    room = max(width - fixed(), least())
    name, reason = natural["NAME"], natural["REASON"]
    if name + reason > room:  # both are cut, in proportion to their lengths
        name = max(min(name, NAME_MIN), room * name // (name + reason))
        name = min(name, room - min(reason, REASON_MIN))
    shown = {c: natural[c] for c in columns}
    shown.update(NAME=name, REASON=max(room - name, 0))
    return shown


def table(models: list[dict[str, Any]], width: int | None, style: Style) -> list[str]:
    """One row per model, aligned for any name length; `width` None: as wide as it takes."""
    if not models:
        return ["(no models configured)"]
    now = time.time()
    rows = [_row(m, now) for m in models]
    widths = _widths([dict(zip(COLUMNS, COLUMNS)), *rows], width)
    lines = [GAP.join(c.ljust(w) for c, w in widths.items()).rstrip()]
    for model, row in zip(models, rows):
        cells = []
        for column, w in widths.items():
            text = row[column]
            text = cut_middle(text, w) if column == "NAME" else cut_end(text, w)
            code = _COLOURS.get(model["state"], "") if column == "STATE" else ""
            if column == "REASON" and in_trouble(model):
                code = "31"
            cells.append(style.paint(text, code) + " " * (w - len(text)))
        lines.append(GAP.join(cells).rstrip())
    return lines


def _when(stamp: float | None, now: float) -> str:
    if stamp is None:
        return "-"
    clock = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))
    return f"{clock} ({units.duration(now - stamp)} ago)"


def _retry(retry: dict[str, Any] | None) -> str:
    if not retry:
        return "-"
    failures = "1 failure" if retry["failures"] == 1 else f"{retry['failures']} failures"
    return f"{failures} in a row; tried again in {units.duration(retry['due_in_seconds'])}"


def details(model: dict[str, Any], style: Style) -> list[str]:
    """Everything `status --json` knows of one model, one fact per line."""
    now = time.time()
    digest = model.get("digest")
    took, size = model.get("copy_seconds"), model.get("size_bytes")
    copy = "-"
    if took is not None and size is not None:
        copy = f"{units.duration(took)} at {units.rate(size / took if took > 0 else None)}"
    backoff = model.get("backoff_seconds")
    holders = model.get("holders") or [{"pid": pid, "command": None} for pid in model["users"]]
    facts = [
        ("state", style.paint(_state(model), _COLOURS.get(model["state"], ""))),
        ("since", _when(model.get("since"), now)),
        ("where", where(model)),
        ("reason", units.reason(model.get("reason"), model.get("reason_figures")) or "-"),
        ("link", f"{model['link']} -> {model['target'] or '(none)'}"),
        ("source", model["source"]),
        ("generation", model.get("generation") or "-"),
        ("digest", digest or "-"),
        ("algorithm", digest.partition(":")[0] if digest else "-"),
        ("size", units.size(size)),
        ("staged at", _when(model.get("staged_at"), now)),
        ("copy took", copy),
        ("copying", copy_text(model.get("copy")) or "-"),
        ("priority", str(model.get("priority", 0))),
        ("holders", ", ".join(f"{h['pid']} ({h['command'] or '?'})" for h in holders) or "-"),
        ("pinned", units.size(model["pinned_bytes"]) if model["pinned_bytes"] else "-"),
        ("pressure evictions", str(model.get("pressure_evictions", 0))),
        ("backoff", units.duration(backoff) if backoff else "-"),
        ("retry", _retry(model.get("retry"))),
    ]
    skipped = model.get("skipped") or []
    facts.append(("skipped", _files(len(skipped)) if skipped else "-"))
    lines = [model["name"]] + [f"  {label + ':':<19} {value}" for label, value in facts]
    return lines + [f"    {entry}" for entry in skipped]


def status_text(status: dict[str, Any], name: str | None, stream: TextIO) -> str:
    """The answer as `stream` shows it: the header and table, or one model's details."""
    style = Style.for_stream(stream)
    if name is not None:
        return "\n".join(details(status["models"][0], style))
    width = terminal_width(stream)
    rows = table(status["models"], width, style)
    return "\n".join([*header(status, style, width), "", *rows])


def progress_line(model: dict[str, Any], name_width: int, live: bool) -> str:
    """One model's line while `stage`, `verify` or `wait` waits: a bar on a terminal, a
    sentence in a pipe or a log."""
    work = model.get("verify") or model.get("copy")
    if work and work["total_bytes"]:
        fraction = work["done_bytes"] / work["total_bytes"]
    else:
        fraction = 1.0 if model["state"] == "staged" and not work else 0.0
    state = f"verifying {fraction:.0%}" if model.get("verify") else _state(model)
    detail = copy_text(work) or reason_text(model) or units.size(model.get("size_bytes"))
    if live:
        doing = "verifying " if model.get("verify") else ""
        return f"{model['name']:<{name_width}}  {bar(fraction)} {fraction:>4.0%}  {doing}{detail}"
    return f"{model['name']}: {state}: {detail}"
