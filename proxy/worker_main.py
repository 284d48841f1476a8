"""The entry point of a worker process (`python -m proxy.worker_main`, DESIGN §8).

It reads the set-up the supervisor (proxy/workers.py) left in the environment and the dialback
secret it writes on stdin (proxy/worker_process.py says what each is), then runs the ordinary
`proxy.runner.run_proxy` on the handed sockets, reporting to the supervisor over the control
channel, until it drains.  A module of its own so that nothing the runner imports imports the
runner back.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

import trio

from proxy.logsetup import set_process_fields
from proxy.reload import StateLoadError
from proxy.runner import run_proxy
from proxy.worker_process import ENV_SETUP, ORPHAN_EXIT_SECONDS, ControlChannel, WorkerSetup

log = logging.getLogger("xmpp_dane_proxy.worker")


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
    channel = ControlChannel(setup.control_fd)
    async with trio.open_nursery() as nursery:
        await nursery.start(_stop_when_supervisor_goes)
        await run_proxy(setup.config_path, notifier=channel, worker=setup, dialback_secret=dialback_secret)
        nursery.cancel_scope.cancel()
    channel.close()


def main() -> int:
    """Entry point of a worker process; exit 1 when the files on disk do not load."""
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
