"""One worker process of `[server] workers = N` (N > 1): the child side (DESIGN §8).

The supervisor (proxy/workers.py) starts each worker as `python -m proxy.worker_process` with

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
import signal
import socket
import sys
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


async def _stop_when_supervisor_goes(task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Drain (as on SIGTERM) when stdin, the supervisor's pipe, reaches end of file."""
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    task_status.started()
    try:
        while await stdin.receive_some(256):
            pass
    except (trio.BrokenResourceError, OSError):
        pass
    log.warning("supervisor gone; draining and exiting")
    os.kill(os.getpid(), signal.SIGTERM)
    await trio.sleep(ORPHAN_EXIT_SECONDS)
    os._exit(1)


def _read_dialback_secret() -> bytes:
    """The supervisor's dialback secret (proxy/dialback_keys.py): the first line on stdin, read
    unbuffered so that nothing after it is taken from the pipe `_stop_when_supervisor_goes` watches."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(sys.stdin.fileno(), 1)
        if not chunk:
            raise SystemExit("worker: stdin closed before the supervisor sent the dialback secret")
        line += chunk
        if len(line) > 256:
            raise SystemExit("worker: the supervisor's first line is not a dialback secret")
    return bytes.fromhex(line.decode("ascii").strip())


async def run_worker(setup: WorkerSetup, dialback_secret: bytes | None = None) -> None:
    """`run_proxy` on the handed sockets, reporting to the supervisor; returns after the drain."""
    from proxy.runner import run_proxy

    channel = ControlChannel(setup.control_fd)
    async with trio.open_nursery() as nursery:
        await nursery.start(_stop_when_supervisor_goes)
        await run_proxy(setup.config_path, notifier=channel, worker=setup, dialback_secret=dialback_secret)
        nursery.cancel_scope.cancel()
    channel.close()


def main() -> int:
    """Entry point of a worker process; exit 1 when the files on disk do not load."""
    from proxy.logsetup import set_process_fields
    from proxy.reload import StateLoadError

    # Until run_proxy's signal receivers are installed, and again after they are gone (during
    # the drain), SIGTERM/SIGINT/SIGHUP must not kill the worker with Python's default action:
    # systemd (KillMode=control-group) or a terminal's Ctrl-C signal the whole group at once,
    # and the supervisor forwards the same signal a moment later.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    setup = WorkerSetup.from_environ(os.environ.pop(ENV_SETUP))
    secret = _read_dialback_secret()
    set_process_fields(worker=setup.index)
    # The supervisor loaded and checked these files first and logged their warnings and
    # reload results once; N workers repeating them would only be noise.  Errors still show.
    logging.getLogger("xmpp_dane_proxy.reload").setLevel(logging.ERROR)
    problems: list[str] = []
    try:
        trio.run(run_worker, setup, secret)
    except* StateLoadError as group:     # from inside run_worker's nursery: in a group
        problems = [line for exc in group.exceptions for line in getattr(exc, "messages", [str(exc)])]
    for line in problems:
        print(f"worker {setup.index}: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
