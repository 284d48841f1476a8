"""Listening sockets handed over by systemd socket activation (sd_listen_fds(3)).

systemd opens the sockets of `xmpp-dane-proxy.socket` (and `-outbound.socket`) itself, starts
the service with them as file descriptors 3, 4, ... and describes them in the environment:

- `LISTEN_FDS`     how many descriptors, starting at fd 3 (`SD_LISTEN_FDS_START`);
- `LISTEN_PID`     the process they are meant for (a child inheriting the environment must
                   not take them);
- `LISTEN_FDNAMES` colon-separated names, from each socket unit's `FileDescriptorName=`.

We sort them by name into `inbound`, `outbound` and `metrics`.  A socket without a name of its
own (`unknown`, or the socket unit's name, which is systemd's default) is taken as `inbound`:
the proxy's one essential listener.  Like `sd_listen_fds(unset_environment=1)` the variables
are removed once read, so nothing started later believes the sockets are its own.

Why bother: with activation the listening sockets belong to systemd and survive a restart or
upgrade of the proxy, so peers see no "connection refused" in between, and the port can be
below 1024 without the service holding CAP_NET_BIND_SERVICE.
"""
from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

import trio

SD_LISTEN_FDS_START = 3
ROLES = ("inbound", "outbound", "metrics")
# Names systemd gives a descriptor that its unit did not name: "unknown" (sd_listen_fds(3)),
# or the socket unit's own name when FileDescriptorName= is unset (systemd.socket(5)).
_UNNAMED = ("", "unknown")


class SocketActivationError(Exception):
    """The activation environment is inconsistent or a passed socket is unusable."""


def parse_listen_env(environ: MutableMapping[str, str], pid: int | None = None) -> list[tuple[int, str]]:
    """(fd, role) for each descriptor systemd passed to process `pid`; [] when none are ours.

    Pure: reads only the environment.  Raises SocketActivationError for an environment that
    is ours but malformed (a typo'd FileDescriptorName= must not silently become inbound).
    """
    pid = os.getpid() if pid is None else pid
    raw_pid = environ.get("LISTEN_PID", "")
    raw_fds = environ.get("LISTEN_FDS", "")
    if not raw_fds:
        return []
    # sd_listen_fds(3): LISTEN_PID must name this process, else the descriptors are not ours
    # (the variables leaked through an exec chain) and must be left alone.
    if not raw_pid.isdigit() or int(raw_pid) != pid:
        return []
    if not raw_fds.isdigit():
        raise SocketActivationError(f"LISTEN_FDS={raw_fds!r} is not a number")
    count = int(raw_fds)
    names_raw = environ.get("LISTEN_FDNAMES")
    names = names_raw.split(":") if names_raw is not None else ["unknown"] * count
    if len(names) != count:
        raise SocketActivationError(
            f"LISTEN_FDNAMES={names_raw!r} has {len(names)} names for LISTEN_FDS={count} descriptors")
    out = []
    for i, name in enumerate(names):
        fd = SD_LISTEN_FDS_START + i
        if name in _UNNAMED or name.endswith(".socket"):
            role = "inbound"
        elif name in ROLES:
            role = name
        else:
            raise SocketActivationError(
                f"socket-activated fd {fd} is named {name!r} (FileDescriptorName=); "
                f"use one of {', '.join(ROLES)}")
        out.append((fd, role))
    return out


def listen_fds(environ: MutableMapping[str, str] | None = None, *,
               unset_environment: bool = True) -> dict[str, list[trio.socket.SocketType]]:
    """The listening sockets systemd passed us, as trio sockets grouped by role.

    Returns {} when not socket-activated.  Every returned socket is a listening stream
    socket (ready for `trio.SocketListener`); anything else is a SocketActivationError,
    since accepting on a datagram or unbound descriptor would fail only later and obscurely.
    """
    env = os.environ if environ is None else environ
    try:
        entries = parse_listen_env(env)
    finally:
        if unset_environment:
            for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                env.pop(var, None)
    groups: dict[str, list[trio.socket.SocketType]] = {}
    for fd, role in entries:
        try:
            # fileno= makes Python ask the kernel for family, type and protocol.
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise SocketActivationError(f"socket-activated fd {fd} ({role}): {exc.strerror}") from None
        # sd_listen_fds(3) sets FD_CLOEXEC on the passed descriptors; Python's
        # socket(fileno=) does not, and nothing we might spawn should inherit a listener.
        sock.set_inheritable(False)
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            kind = "stream" if sock.type == socket.SOCK_STREAM else "datagram"
            sock.detach()
            raise SocketActivationError(
                f"socket-activated fd {fd} ({role}) is a {kind} socket that is not listening; "
                f"use ListenStream= in the socket unit")
        groups.setdefault(role, []).append(trio.socket.from_stdlib_socket(sock))
    return groups


def describe(sock: trio.socket.SocketType) -> str:
    """`host:port` (or the unix path) a socket is bound to, for logs."""
    name = sock.getsockname()
    if isinstance(name, tuple):
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"unix:{name.decode(errors='replace') if isinstance(name, bytes) else name}"
