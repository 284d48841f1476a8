"""Processes the benchmark starts (pinned to a core, always stopped) and what /proc says
about them: resident memory, CPU time, per-core busy time.
"""
from __future__ import annotations

import os
import resource
import select
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
POLL_INTERVAL = 0.01   # between checks of a condition we wait for (bounded by a deadline)


class ProcError(RuntimeError):
    """A benchmark process failed to start or answer; the message says which and why."""


def _pin(core: int | frozenset[int]):
    cores = {core} if isinstance(core, int) else set(core)

    def pin() -> None:
        # Same effect as `taskset -c CORES`: the process and every thread (and child process)
        # it creates run there.
        os.sched_setaffinity(0, cores)
    return pin


class Proc:
    """A child process in its own process group, pinned to `core` (or a set of cores), stderr to `log`."""

    def __init__(self, name: str, argv: list[str], *, core: int | frozenset[int], log: Path, cwd: Path | None = None,
                 stops_at_eof: bool = True) -> None:
        self.name = name
        self.stops_at_eof = stops_at_eof
        self.argv = argv
        self.log = log
        with open(log, "wb") as err:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=cwd,
                start_new_session=True, preexec_fn=_pin(core),
            )
        self.pid = self.popen.pid
        self._out = b""     # stdout read but not yet returned as lines

    def read_line(self, prefix: str, timeout: float = 20.0) -> str:
        """The next stdout line starting with `prefix` (other lines are skipped)."""
        deadline = time.monotonic() + timeout
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        while True:
            while b"\n" in self._out:
                line, self._out = self._out.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith(prefix):
                    return text.strip()
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProcError(f"{self.name}: no '{prefix}' line within {timeout} s; see {self.log}")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            data = os.read(fd, 65536)    # unbuffered: select() must see what is still unread
            if not data:
                raise ProcError(f"{self.name} exited ({self.popen.poll()}) before printing '{prefix}'; "
                                f"see {self.log}:\n{self.tail()}")
            self._out += data

    def send_line(self, text: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(text.encode() + b"\n")
        self.popen.stdin.flush()

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 5.0) -> None:
        """Stop the process: close its stdin (the sink and the proxy runner stop at EOF),
        then SIGTERM, then SIGKILL, each after `grace` seconds; signals go to its process
        group (its own: start_new_session), so nothing it started survives."""
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            try:
                self.popen.stdin.close()
            except OSError:
                pass
        signals = [signal.SIGTERM, signal.SIGKILL]
        if not self.stops_at_eof:
            self._signal(signals.pop(0))
        while self.popen.poll() is None:
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                if not signals:
                    raise ProcError(f"{self.name} (pid {self.pid}) survives SIGKILL") from None
                self._signal(signals.pop(0))
        self._signal(signal.SIGKILL)     # anything left in its group (none of ours fork)
        if self.popen.stdout is not None and not self.popen.stdout.closed:
            self.popen.stdout.close()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    # ------------------------------------------------------------------ /proc

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))


def rss_kib(pid: int) -> int:
    """Resident set size (VmRSS) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ProcError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (also exited ones) included."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS   # utime, stime


def core_busy() -> dict[int, tuple[int, int]]:
    """Per core: (busy jiffies, total jiffies) from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *values = line.split()
            v = [int(x) for x in values]
            idle = v[3] + (v[4] if len(v) > 4 else 0)      # idle + iowait
            total = sum(v[:8])                               # guest time is already in user
            out[int(name[3:])] = (total - idle, total)
    return out


def task_cpu_ns(pid: int) -> dict[int, int]:
    """Per thread of `pid`: nanoseconds on a CPU (/proc/PID/task/TID/schedstat, first field)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass    # the thread ended while we looked
    return out


@dataclass
class Window:
    """CPU accounting over one measurement: the server process, the load side (this process
    and `load_pids`) and how busy each core was.

    The server's CPU time comes from the per-thread nanosecond counters when they account for
    all of it (stunnel's per-connection threads end with their connection, taking their
    counters with them); otherwise from /proc/PID/stat, which keeps ended threads' time but
    counts in 10 ms ticks (`precise` says which).
    """

    pid: int
    load_pids: tuple[int, ...] = ()
    cpu: float = 0.0            # server process CPU seconds used in the window
    load_cpu: float = 0.0       # load side CPU seconds (this process + load_pids)
    busy: dict | None = None    # core -> busy fraction in the window
    precise: bool = False

    def _load(self) -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        return own.ru_utime + own.ru_stime + sum(cpu_seconds(p) for p in self.load_pids)

    def __enter__(self) -> "Window":
        self._tasks0 = task_cpu_ns(self.pid)
        self._cpu0 = cpu_seconds(self.pid)
        self._load0 = self._load()
        self._cores0 = core_busy()
        return self

    def __exit__(self, *exc) -> None:
        cores1 = core_busy()
        tasks1 = task_cpu_ns(self.pid)
        ticks = cpu_seconds(self.pid) - self._cpu0
        self.load_cpu = self._load() - self._load0
        precise = sum(ns - self._tasks0.get(tid, 0) for tid, ns in tasks1.items()) / 1e9
        # Threads that started and ended inside the window are missing from the per-thread
        # sum but not from the ticks: trust the sum only where both agree within the ticks'
        # resolution (two ticks, plus 5 % for the boundaries).
        if set(self._tasks0) <= set(tasks1) and abs(precise - ticks) <= 2 / CLOCK_TICKS + 0.05 * ticks:
            self.precise = True
            self.cpu = precise
        else:
            self.cpu = ticks
        self.busy = {}
        for core, (b1, t1) in cores1.items():
            b0, t0 = self._cores0.get(core, (0, 0))
            self.busy[core] = (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def bound(self, server_core: int, load_core: int, threshold: float = 0.95) -> str:
        """Which side limited the rate in this window."""
        busy = self.busy or {}
        if busy.get(server_core, 0.0) >= threshold:
            return "server-bound"
        if busy.get(load_core, 0.0) >= threshold:
            return "load-bound"
        return "latency-bound"


def background_busy(seconds: float = 1.0) -> dict[int, float]:
    """How busy each core is while the benchmark itself does nothing (other users of the
    machine, e.g. a test run, make every figure noisier)."""
    before = core_busy()
    time.sleep(seconds)     # the measurement interval itself, not a synchronisation
    after = core_busy()
    return {core: (after[core][0] - b) / max(1, after[core][1] - t) for core, (b, t) in before.items()}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_listening(host: str, port: int, proc: Proc, timeout: float = 20.0) -> None:
    """Poll until something accepts TCP connections on host:port (or the process died)."""
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise ProcError(f"{proc.name} exited ({proc.popen.returncode}); see {proc.log}:\n{proc.tail()}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise ProcError(f"{proc.name} does not listen on {host}:{port} after {timeout} s; see {proc.log}")
            time.sleep(POLL_INTERVAL)   # polling the condition above, bounded by the deadline
