"""One worker process of `[server] workers = N` (N > 1): what the child and the supervisor
share (DESIGN §8): the worker's set-up and its control channel.  The worker's entry point is
proxy/worker_main.py.

The supervisor (proxy/workers.py) starts each worker as `python -m proxy.worker_main` with

- the listening sockets already bound (its own SO_REUSEPORT copy of every address, or the
  socket-activated descriptors all workers share), passed as inherited descriptors;
- `$XMPP_DANE_PROXY_WORKER`, a JSON object naming the config file, the worker's number, the
  descriptors by role and the control descriptor;
- `$PROMETHEUS_MULTIPROC_DIR`, the run's metrics directory: the worker's counters live in
  memory-mapped files there, which the supervisor sums for `/metrics`;
- stdin a pipe from the supervisor: end of file means the supervisor is gone, and the worker
  drains and exits rather than serve on unsupervised.

The worker then runs the ordinary `proxy.runner.run_proxy` (its own trio loop, TLS contexts
and DNS cache; the cache is shared through the local resolver), with two differences: it never
binds, and its "systemd" is the supervisor.  `ControlChannel` speaks the sd_notify assignments
(READY=1, RELOADING=1, STOPPING=1, STATUS=, WATCHDOG=1) as lines on the control pipe, so
`run_proxy` and `reload_on_sighup` report start-up, reloads and drain to the supervisor exactly
as they report them to systemd when there is no supervisor.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
from dataclasses import dataclass, field

import trio

from proxy.sdnotify import Notifier

log = logging.getLogger("xmpp_dane_proxy.worker")

ENV_SETUP = "XMPP_DANE_PROXY_WORKER"
# A worker tells the supervisor it is alive this often once it serves; the supervisor kills
# one that stays silent for proxy.workers.HANG_SECONDS (a stuck event loop relays nothing).
HEARTBEAT_SECONDS = 2.0
# The longest control line: a STATUS= line and a few assignments (one pipe write of at most
# PIPE_BUF = 4096 bytes is atomic, so lines of concurrent writers never interleave).
MAX_CONTROL_LINE = 4000
# After the supervisor went away: the drain's own bound (proxy.runner.DRAIN_SECONDS) plus
# slack, then exit regardless.
ORPHAN_EXIT_SECONDS = 20.0


@dataclass(frozen=True)
class WorkerSetup:
    """What the supervisor hands a worker; `sockets` are filled in by `from_environ`."""

    config_path: str
    index: int                                   # 1..N, the `worker=` of every log line
    control_fd: int
    fds: dict[str, list[int]]                    # role ("inbound", "outbound", "websocket") -> fds
    sockets: dict[str, list[trio.socket.SocketType]] = field(default_factory=dict, compare=False)

    def to_environ(self) -> str:
        return json.dumps({"config": self.config_path, "index": self.index, "control_fd": self.control_fd,
                           "fds": self.fds})

    @classmethod
    def from_environ(cls, value: str) -> "WorkerSetup":
        raw = json.loads(value)
        fds = {str(role): [int(fd) for fd in fd_list] for role, fd_list in raw["fds"].items()}
        sockets = {}
        for role, fd_list in fds.items():
            socks = []
            for fd in fd_list:
                sock = socket.socket(fileno=fd)
                sock.set_inheritable(False)    # nothing this worker might start gets a listener
                socks.append(trio.socket.from_stdlib_socket(sock))
            sockets[role] = socks
        return cls(str(raw["config"]), int(raw["index"]), int(raw["control_fd"]), fds, sockets)


class ControlChannel(Notifier):
    """sd_notify(3) assignments to the supervisor, one line each, over the control pipe."""

    def __init__(self, fd: int) -> None:
        super().__init__(environ={})
        self.fd = fd
        os.set_blocking(fd, False)

    @property
    def enabled(self) -> bool:
        return True

    def send(self, *assignments: str) -> bool:
        for a in assignments:
            if "\n" in a or "=" not in a:
                raise ValueError(f"notify assignment {a!r} must be one KEY=VALUE line")
        line = ("\t".join(assignments)[:MAX_CONTROL_LINE] + "\n").encode("utf-8", "replace")
        try:
            # Non-blocking, like Notifier.send: a supervisor that does not read must never
            # stall this worker's event loop; the line is then lost (and the supervisor
            # notices the missing heartbeats).
            os.write(self.fd, line)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EPIPE):
                log.warning("control pipe to the supervisor failed: %s", exc)
            return False
        return True

    def watchdog_interval(self) -> float | None:
        return HEARTBEAT_SECONDS

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
