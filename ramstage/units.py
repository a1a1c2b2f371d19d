"""Figures in human units, for the journal and the command line: sizes in binary units
(`2.0 GiB`, as free(1) -h and systemd print them), durations, rates, and a reason with the
figures that explain it (`too_large: needs 2.0 GiB, store has 944 MiB free`)."""

from __future__ import annotations

from collections.abc import Mapping

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def size(nbytes: float | None) -> str:
    """`944 MiB`, `2.0 GiB`: three significant digits at most, none lost below 10."""
    if nbytes is None:
        return "-"
    value = float(nbytes)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            break
        value /= 1024
    if unit == "B":
        return f"{value:.0f} B"
    return f"{value:.1f} {unit}" if abs(value) < 10 else f"{value:.0f} {unit}"


def rate(nbytes_per_second: float | None) -> str:
    return "-" if nbytes_per_second is None else f"{size(nbytes_per_second)}/s"


def duration(seconds: float | None) -> str:
    """`150ms`, `2s`, `2.5s`, `12s`, `3m05s`, `2h07m`, `3d04h`."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 10:
        return f"{seconds:.1f}s".replace(".0s", "s")
    whole = int(seconds)
    for unit, next_unit, length in (("d", "h", 86400), ("h", "m", 3600), ("m", "s", 60)):
        if whole >= length:
            rest = whole % length // {"h": 3600, "m": 60, "s": 1}[next_unit]
            return f"{whole // length}{unit}{rest:02d}{next_unit}"
    return f"{whole}s"


def reason(text: str | None, figures: Mapping[str, int] | None) -> str:
    """The contract's `reason` with its figures (status --json `reason_figures`) spelt out."""
    if text is None:
        return ""
    if not figures:
        return text
    need = size(figures.get("need_bytes"))
    if text == "too_large":
        return f"too_large: needs {need}, store has {size(figures.get('store_free_bytes'))} free"
    if text == "pressure" and "available_bytes" in figures:
        return (
            f"pressure: needs {need}, {size(figures['available_bytes'])} available,"
            f" floor {size(figures.get('floor_bytes'))}"
        )
    return text
