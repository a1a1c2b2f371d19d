"""Errors that carry the exit code and the wire type the contract gives them."""

from __future__ import annotations


class RamstageError(Exception):
    exit_code = 1
    wire_type = "Failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class SourceHung(RamstageError):
    """A copy read nothing from its source for a while (a hung mount): given up on."""


class Cancelled(RamstageError):
    """Staging was called off (model removed, daemon stopping)."""


class ConfigError(RamstageError):
    exit_code = 2
    wire_type = "ConfigError"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class UsageError(RamstageError):
    exit_code = 2
    wire_type = "BadRequest"


class NotFound(RamstageError):
    exit_code = 2
    wire_type = "NotFound"


class NotRunning(RamstageError):
    exit_code = 3
    wire_type = "NotRunning"


class PermissionDenied(RamstageError):
    exit_code = 4
    wire_type = "PermissionDenied"


class Busy(RamstageError):
    """The daemon turned the connection away for now (too many open from this user, or from
    all users); nothing was done, so the same request may be sent again."""

    wire_type = "Busy"


class NoAnswer(RamstageError):
    """The daemon took the request but gave no answer in time (client side only)."""


WIRE_TYPES = {
    cls.wire_type: cls
    for cls in (RamstageError, UsageError, NotFound, NotRunning, PermissionDenied, Busy)
}


def from_wire(error_type: str, message: str) -> RamstageError:
    if error_type == ConfigError.wire_type:
        return ConfigError(message.splitlines())
    return WIRE_TYPES.get(error_type, RamstageError)(message)
