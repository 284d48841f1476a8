"""The systemd notify protocol (sd_notify(3)), spoken directly: no libsystemd needed.

A service of `Type=notify` tells systemd how it is doing by sending newline-separated
`KEY=VALUE` assignments as one datagram to the AF_UNIX socket named in `$NOTIFY_SOCKET`
(a path, or `@name` for the abstract namespace).  We send:

- `READY=1` once listening (systemd then reports the unit as started),
- `RELOADING=1` with `MONOTONIC_USEC=` at the start of a reload and `READY=1` at its end
  (systemd >= 253 requires MONOTONIC_USEC for `Type=notify-reload`; older ones ignore it),
- `STOPPING=1` when draining on SIGTERM,
- `STATUS=...` a one-line state shown by `systemctl status`,
- `WATCHDOG=1` keep-alives when the unit sets `WatchdogSec=` (`$WATCHDOG_USEC`).

Without `$NOTIFY_SOCKET` (run by hand, in tests, under another supervisor) every call is a
no-op, so callers never need to ask whether they run under systemd.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Mapping

import trio

log = logging.getLogger("xmpp_dane_proxy.sdnotify")


class Notifier:
    """Sends notify messages to systemd; every method is a no-op when not under systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = _watchdog_usec(env)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """True when `$NOTIFY_SOCKET` names a socket we can talk to."""
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send `KEY=VALUE` lines as one datagram; True if it was sent.

        Never blocks and never raises for I/O errors: a full or vanished notify socket must
        not stall or crash the proxy (sd_notify(3) likewise only reports failure).  Loss is
        logged.  A malformed assignment (a programming error) is a ValueError.
        """
        if self.address is None:
            return False
        for a in assignments:
            if "\n" in a or "=" not in a:
                raise ValueError(f"notify assignment {a!r} must be one KEY=VALUE line")
        message = "\n".join(assignments).encode("utf-8")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Non-blocking: if systemd's queue is full the message is dropped, not awaited;
                # a blocking send here would freeze the whole trio event loop.
                self._sock.setblocking(False)
            self._sock.sendto(message, self.address)
        except OSError as exc:
            level = logging.DEBUG if exc.errno == errno.EAGAIN else logging.WARNING
            log.log(level, "sd_notify to %r failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup or reload finished: the service is serving."""
        return self.send("READY=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        """A reload begins; `ready()` must follow when it is over (successful or not)."""
        # systemd.service(5), Type=notify-reload: RELOADING=1 must carry MONOTONIC_USEC, the
        # CLOCK_MONOTONIC time at which the reload started, so systemd can tell this reload
        # apart from an earlier one.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown begins (draining)."""
        return self.send("STOPPING=1", *_status(status))

    def status(self, text: str) -> bool:
        """Free-form one-line status for `systemctl status`."""
        return self.send(*_status(text))

    def watchdog(self) -> bool:
        """One watchdog keep-alive."""
        return self.send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between keep-alives (half of WatchdogSec=), or None if no watchdog is armed."""
        if self.address is None or self._watchdog_usec is None:
            return None
        # sd_watchdog_enabled(3) recommends pinging at half the timeout, so one late wake-up
        # (a slow handshake burst, a GC pause) never costs a restart.
        return self._watchdog_usec / 2 / 1_000_000

    async def watchdog_task(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send WATCHDOG=1 at half the watchdog interval until cancelled; returns at once if unarmed.

        Run it in the proxy's main nursery: the pings come from the event loop itself, so a
        loop that is stuck (a blocking call, a busy loop) stops pinging and systemd restarts
        the service — which is the point of the watchdog.
        """
        interval = self.watchdog_interval()
        task_status.started()
        if interval is None:
            return
        while True:
            self.watchdog()
            await trio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    # STATUS is one line; an error text with a newline would end the message early.
    return ("STATUS=" + " ".join(text.split()),)


def _socket_address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        # Abstract namespace: sd_notify(3) maps a leading '@' to the leading NUL byte.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # systemd >= 254 may also hand out "vsock:CID:PORT" (for VMs); we do not speak vsock.
    log.warning("NOTIFY_SOCKET=%r is neither a path nor @abstract; systemd notifications disabled", value)
    return None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    # sd_watchdog_enabled(3): WATCHDOG_USEC is the timeout in microseconds; when WATCHDOG_PID
    # is set the watchdog is meant for that process only (a child inheriting the environment
    # must not ping on the parent's behalf).
    raw = env.get("WATCHDOG_USEC", "")
    if not raw.isdigit() or int(raw) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    return int(raw)
