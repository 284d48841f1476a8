"""File descriptors: the limit the proxy runs with, and telling "out of descriptors" apart.

Every relayed stream holds two descriptors (peer and backend).  Outside systemd (whose units
set LimitNOFILE) the soft RLIMIT_NOFILE is usually 1024, so the proxy would top out near 500
streams although `limits.max_connections` defaults to 10,000.  At start the soft limit is
raised to the hard limit (what any process may do for itself), and a warning says when even
the hard limit is below what max_connections needs.
"""
from __future__ import annotations

import errno
import resource

# Descriptors besides the streams: listeners, the metrics endpoint, DNS sockets, the epoll
# descriptor, log files, and one-off files read at reload (policies, certificates).
SLACK = 64
# Errors meaning "this process or the system ran out of something", not "the other side is
# unreachable": a peer then gets resource-constraint (RFC 6120 §4.9.3.17).
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# RLIM_INFINITY is not a valid soft limit for RLIMIT_NOFILE on Linux (the kernel caps it at
# fs.nr_open, 1,048,576 by default).
_NR_OPEN_DEFAULT = 1 << 20


def needed(max_connections: int) -> int:
    """Descriptors `max_connections` streams need: two each, plus SLACK."""
    return 2 * max_connections + SLACK


def raise_soft_limit(max_connections: int) -> tuple[int, int, str | None]:
    """Raise the soft RLIMIT_NOFILE to the hard one.  Returns (soft, hard, warning or None)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _nr_open()
    if soft == resource.RLIM_INFINITY or soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass   # keep what we have; the warning below says whether it is enough
    warning = None
    want = needed(max_connections)
    if soft != resource.RLIM_INFINITY and soft < want:
        warning = (f"the file descriptor limit ({soft}, hard limit {hard if hard != resource.RLIM_INFINITY else 'unlimited'}) "
                   f"is below 2 x limits.max_connections + {SLACK} = {want}: streams beyond about "
                   f"{max(0, (soft - SLACK) // 2)} will be refused with resource-constraint; raise LimitNOFILE "
                   f"(systemd) or `ulimit -Hn`, or lower limits.max_connections")
    return soft, hard, warning


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return _NR_OPEN_DEFAULT


def out_of_resources(exc: BaseException) -> bool:
    """Whether `exc` (or, for trio.open_tcp_stream's "all attempts failed", any of the errors
    it was raised from) is EMFILE/ENFILE/ENOBUFS/ENOMEM."""
    seen = 0
    todo: list[BaseException] = [exc]
    while todo and seen < 32:
        e = todo.pop()
        seen += 1
        if isinstance(e, OSError) and e.errno in RESOURCE_ERRNOS:
            return True
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        if e.__cause__ is not None:
            todo.append(e.__cause__)
    return False


__all__ = ["RESOURCE_ERRNOS", "SLACK", "needed", "out_of_resources", "raise_soft_limit"]
