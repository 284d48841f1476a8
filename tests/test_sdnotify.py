"""proxy.sdnotify against a real AF_UNIX datagram socket standing in for systemd."""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time

import pytest
import trio

from proxy.sdnotify import Notifier


@pytest.fixture
def systemd_socket():
    """A bound datagram socket like systemd's notify socket; yields (path, socket)."""
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer than that.
    d = tempfile.mkdtemp(prefix="sdn", dir="/tmp")
    path = os.path.join(d, "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    try:
        yield path, s
    finally:
        s.close()
        shutil.rmtree(d)


def recv(s: socket.socket) -> list[str]:
    return s.recv(4096).decode().split("\n")


def test_ready_status_stopping_exact_datagrams(systemd_socket):
    path, s = systemd_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("serving 2 domains")
    assert recv(s) == ["READY=1", "STATUS=serving 2 domains"]
    assert n.status("draining\n3 streams")       # newlines cannot end the message early
    assert recv(s) == ["STATUS=draining 3 streams"]
    assert n.stopping()
    assert recv(s) == ["STOPPING=1"]
    assert n.watchdog()
    assert recv(s) == ["WATCHDOG=1"]
    n.close()


def test_reloading_carries_monotonic_usec(systemd_socket):
    path, s = systemd_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading("reloading configuration")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = recv(s)
    assert lines[0] == "RELOADING=1"
    assert lines[1].startswith("MONOTONIC_USEC=")
    assert before <= int(lines[1].split("=", 1)[1]) <= after
    assert lines[2] == "STATUS=reloading configuration"
    n.close()


def test_abstract_namespace_socket():
    name = f"xdp-test-{os.getpid()}-{time.monotonic_ns()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(b"\0" + name.encode())
    s.settimeout(5)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert recv(s) == ["READY=1"]
        n.close()
    finally:
        s.close()


def test_noop_without_notify_socket():
    n = Notifier({})
    assert not n.enabled
    assert n.ready() is False
    assert n.watchdog_interval() is None
    # The watchdog task returns at once instead of looping.
    trio.run(n.watchdog_task)


def test_vanished_socket_is_reported_not_raised(systemd_socket, caplog):
    path, s = systemd_socket
    n = Notifier({"NOTIFY_SOCKET": path + ".gone"})
    assert n.ready() is False
    assert "sd_notify" in caplog.text
    n.close()


def test_watchdog_interval_and_pid_check(systemd_socket):
    path, _ = systemd_socket
    assert Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"}).watchdog_interval() == 15.0
    mine = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval() == 1.0
    # WATCHDOG_PID names another process: the watchdog is not ours to feed.
    other = dict(mine, WATCHDOG_PID=str(os.getpid() + 1))
    assert Notifier(other).watchdog_interval() is None
    assert Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "0"}).watchdog_interval() is None


def test_watchdog_task_pings_at_half_interval(systemd_socket):
    path, s = systemd_socket
    s.setblocking(False)
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})   # 0.1 s → ping every 0.05 s
    arrivals: list[float] = []

    async def main():
        tsock = trio.socket.from_stdlib_socket(s)
        async with trio.open_nursery() as nursery:
            await nursery.start(n.watchdog_task)
            with trio.fail_after(5):
                while len(arrivals) < 4:
                    assert await tsock.recv(100) == b"WATCHDOG=1"
                    arrivals.append(trio.current_time())
            nursery.cancel_scope.cancel()

    trio.run(main)
    # trio.sleep never wakes early: three gaps of >= 0.05 s between four pings (less a little
    # for the first datagram being picked up a scheduler tick later than the last).
    assert arrivals[-1] - arrivals[0] >= 3 * 0.05 * 0.8
    n.close()
