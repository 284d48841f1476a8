"""What the real-server test harnesses share: a server process in its own process group, its
log and stdout files, stopping it for sure, and a factory fixture that stops every server it
started (tests/prosodyenv.py, tests/ejabberdenv.py).

A subclass sets `process` (a `subprocess.Popen` started with `start_new_session=True`),
`workdir`, `_own_workdir`, `keep_workdir`, `config_path`, `log_path`, `stdout_path`, and the
class attributes `NAME` (for messages), `ERROR` (the exception it raises) and `STOP_TIMEOUT`.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

S = TypeVar("S", bound="ServerProcess")


class ServerProcess:
    NAME = "server"
    ERROR: type[Exception] = RuntimeError
    STOP_TIMEOUT = 5.0

    process: subprocess.Popen | None
    workdir: Path
    _own_workdir: bool
    keep_workdir: bool
    config_path: Path
    log_path: Path
    stdout_path: Path

    def start(self: S) -> S:
        raise NotImplementedError

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after STOP_TIMEOUT; remove a temp workdir.

        Safe to call twice and after a failed start."""
        proc, self.process = self.process, None
        if proc is not None:
            for sig, wait in ((signal.SIGTERM, self.STOP_TIMEOUT), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            # Helpers the server started in its group (erl's inet_gethost, memsup): reap them.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._own_workdir and not self.keep_workdir and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def __enter__(self: S) -> S:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        """Everything the server has logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stdout_text(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str | re.Pattern, timeout: float = 10.0) -> re.Match:
        """Poll the log until `pattern` (a regex) matches; raise with the log tail if not."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_text())
            if match:
                return match
            if time.monotonic() > deadline:
                raise self.ERROR(f"{regex.pattern!r} not in {self.NAME}'s log after {timeout}s\n" + self._diagnostics())
            time.sleep(0.02)  # poll interval; the condition is re-checked

    def _diagnostics(self, lines: int = 40) -> str:
        tail = "\n".join(self.log_text().splitlines()[-lines:])
        out = "\n".join(self.stdout_text().splitlines()[-lines:])
        return f"--- {self.config_path}\n--- stdout/stderr:\n{out}\n--- log tail ({self.log_path}):\n{tail}"


def server_factory(cls: type[S], base: Path, prefix: str) -> Iterator[Callable[..., S]]:
    """A generator for a pytest fixture: `make(hosts, **kwargs)` starts a `cls` in
    `base/<prefix><n>`; every server it started is stopped at teardown, newest first."""
    servers: list[S] = []

    def make(hosts: Sequence, **kwargs) -> S:
        kwargs.setdefault("workdir", base / f"{prefix}{len(servers)}")
        server = cls(hosts, **kwargs)
        servers.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in reversed(servers):
            server.stop()
