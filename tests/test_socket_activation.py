"""proxy.socket_activation with real inherited listening sockets in a real child process.

The child is started the way systemd starts a socket-activated service: the listening sockets
are moved to fds 3, 4, ... and LISTEN_FDS / LISTEN_PID / LISTEN_FDNAMES describe them.  A tiny
launcher plays systemd's part (it must set LISTEN_PID to the pid of the process that will use
the sockets, which only that process knows, so it sets up the fds and exec()s); a second test
lets systemd's own `systemd-socket-activate` do it.  The child runs `listen_fds()`, then
accepts a connection on its inbound socket and writes a JSON report over it.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.socket_activation import SocketActivationError, parse_listen_env

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, os, trio
from proxy.socket_activation import listen_fds, describe
VARS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
groups = listen_fds()
report = {
    "pid": os.getpid(),
    "groups": {role: [describe(s) for s in socks] for role, socks in groups.items()},
    "env_after": {v: os.environ.get(v) for v in VARS},
    "inheritable": [s.fileno() for socks in groups.values() for s in socks if os.get_inheritable(s.fileno())],
}
async def main():
    if "inbound" not in groups:
        print(json.dumps(report), flush=True)      # nothing to accept on: report on stdout
        return
    listener = trio.SocketListener(groups["inbound"][0])
    stream = await listener.accept()
    await stream.send_all(json.dumps(report).encode() + b"\n")
    await stream.aclose()
trio.run(main)
"""

# systemd's part: move the inherited sockets to 3, 4, ..., describe them, exec the service.
LAUNCHER = r"""
import os, sys
srcs = [int(x) for x in sys.argv[1].split(",")]
names, pid_mode = sys.argv[2], sys.argv[3]
parked = [os.dup2(fd, 200 + i) for i, fd in enumerate(srcs)]   # out of the way of 3..n first
for fd in srcs:
    os.close(fd)
for i, fd in enumerate(parked):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_FDS"] = str(len(srcs))
os.environ["LISTEN_PID"] = str(os.getpid() if pid_mode == "self" else os.getpid() + 1)
if names != "-":
    os.environ["LISTEN_FDNAMES"] = names
os.execv(sys.executable, [sys.executable, "-c", sys.argv[4]])
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for v in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(v, None)
    return env


def _listener(family=socket.AF_INET, host="127.0.0.1") -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(16)
    return s


def _read_report(port: int, family=socket.AF_INET, host="127.0.0.1", proc=None) -> dict:
    deadline = time.monotonic() + 15
    while True:
        try:
            with socket.create_connection((host, port), timeout=10) as c:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = c.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            if data:
                return json.loads(data)
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"child exited {proc.returncode}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError("no report from the socket-activated child")
        time.sleep(0.05)   # polling a condition with a deadline, not standing in for sync


def _spawn(socks: list[socket.socket], names: str, pid_mode: str = "self") -> subprocess.Popen:
    fds = [s.fileno() for s in socks]
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, ",".join(map(str, fds)), names, pid_mode, CHILD],
        pass_fds=fds, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_named_sockets_grouped_and_environment_unset():
    inbound4, inbound6 = _listener(), _listener(socket.AF_INET6, "::1")
    outbound, metrics = _listener(), _listener()
    ports = {s: s.getsockname()[1] for s in (inbound4, inbound6, outbound, metrics)}
    proc = _spawn([inbound4, outbound, inbound6, metrics], "inbound:outbound:inbound:metrics")
    try:
        for s in ports:
            s.close()       # the child owns them now, as the service does under systemd
        report = _read_report(ports[inbound4], proc=proc)
        assert proc.wait(timeout=15) == 0, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    assert report["groups"] == {
        "inbound": [f"127.0.0.1:{ports[inbound4]}", f"[::1]:{ports[inbound6]}"],
        "outbound": [f"127.0.0.1:{ports[outbound]}"],
        "metrics": [f"127.0.0.1:{ports[metrics]}"],
    }
    assert report["env_after"] == {"LISTEN_FDS": None, "LISTEN_PID": None, "LISTEN_FDNAMES": None}
    assert report["inheritable"] == []      # FD_CLOEXEC set, as sd_listen_fds does


def test_unnamed_socket_is_inbound():
    s = _listener()
    port = s.getsockname()[1]
    proc = _spawn([s], "-")              # no LISTEN_FDNAMES at all
    try:
        s.close()
        report = _read_report(port, proc=proc)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        proc.wait()
    assert report["groups"] == {"inbound": [f"127.0.0.1:{port}"]}


def test_listen_pid_of_another_process_is_ignored_and_unset():
    s = _listener()
    proc = _spawn([s], "inbound", pid_mode="other")
    try:
        s.close()
        out, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["groups"] == {}
    assert report["env_after"] == {"LISTEN_FDS": None, "LISTEN_PID": None, "LISTEN_FDNAMES": None}


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate not installed (Debian package systemd)")
def test_real_systemd_socket_activate():
    # systemd's own tool binds the sockets, sets LISTEN_* and execs the child on the first
    # connection; it needs the port numbers up front, so find free ones by binding port 0.
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    proc = subprocess.Popen(
        ["systemd-socket-activate", f"--listen=127.0.0.1:{ports[0]}", f"--listen=127.0.0.1:{ports[1]}",
         "--fdname=inbound:outbound", sys.executable, "-c", CHILD],
        env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        report = _read_report(ports[0], proc=proc)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        proc.wait()
    assert report["groups"] == {"inbound": [f"127.0.0.1:{ports[0]}"], "outbound": [f"127.0.0.1:{ports[1]}"]}
    assert report["env_after"] == {"LISTEN_FDS": None, "LISTEN_PID": None, "LISTEN_FDNAMES": None}


# --- the environment parser alone ------------------------------------------------------------

def test_parse_names_and_defaults():
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "4",
           "LISTEN_FDNAMES": "xmpp-dane-proxy.socket:outbound:unknown:metrics"}
    assert parse_listen_env(env, pid=42) == [(3, "inbound"), (4, "outbound"), (5, "inbound"), (6, "metrics")]
    assert parse_listen_env({"LISTEN_PID": "42", "LISTEN_FDS": "1"}, pid=42) == [(3, "inbound")]
    assert parse_listen_env({}, pid=42) == []
    assert parse_listen_env({"LISTEN_FDS": "2"}, pid=42) == []          # no LISTEN_PID: not ours


def test_parse_rejects_inconsistent_environment():
    with pytest.raises(SocketActivationError, match="2 names for LISTEN_FDS=1"):
        parse_listen_env({"LISTEN_PID": "7", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "inbound:outbound"}, pid=7)
    with pytest.raises(SocketActivationError, match="named 'inbund'.*inbound, outbound, metrics"):
        parse_listen_env({"LISTEN_PID": "7", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "inbund"}, pid=7)
    with pytest.raises(SocketActivationError, match="not a number"):
        parse_listen_env({"LISTEN_PID": "7", "LISTEN_FDS": "x"}, pid=7)
