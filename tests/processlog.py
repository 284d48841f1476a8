"""Every proxy run as a real process in this test session registers its log here, so the
session can check at its end that no stream anywhere ended as `internal-error` (issue 15:
that outcome means an exception escaped, and no test scenario should cause one)."""
from __future__ import annotations

from collections.abc import Callable

from proxyenv import _parse_line

_LOGS: list[tuple[str, Callable[[], list[str]]]] = []


def register(name: str, lines: Callable[[], list[str]]) -> None:
    """`lines()` returns the process's log lines so far (it is called at the session's end)."""
    _LOGS.append((name, lines))


def internal_errors() -> list[str]:
    """Log lines, over every registered process, that report an internal-error ending."""
    found = []
    for name, lines in _LOGS:
        for line in lines():
            fields = _parse_line(line)
            event = fields.get("event")
            if (event == "stream-closed" and fields.get("outcome") == "internal-error") or \
                    (event == "stopped" and fields.get("outcome_internal_error", "0") != "0"):
                found.append(f"{name}: {line}")
    return found


def processes() -> int:
    return len(_LOGS)
