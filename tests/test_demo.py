"""The first-run demo (scripts/demo.py, what `bash scripts/start` runs without a config).

Run as a person would: a child process whose output is read until the "Try this next" banner,
then Ctrl-C (SIGINT).  The demo must have shown the proxy's real decision lines — DANE-EE
accept for the peer whose TLSA matches, a reject without PKIX fallback for the one whose TLSA
names another key — with the matching peer's message delivered to the backend and the other's
not; and after Ctrl-C every process it started must be gone and its directory removed.
"""
from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

from proxyenv import REPO, parse_logfmt

# The demo itself needs a few seconds; a loaded CI machine (8 helpers on 2 cores) more.
BANNER_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0


def read_until(proc: subprocess.Popen, marker: str, timeout: float) -> str:
    """Everything `proc` printed up to and including the line containing `marker`."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    out = b""
    deadline = time.monotonic() + timeout
    while marker.encode() not in out:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {marker!r} within {timeout} s; output so far:\n{out.decode(errors='replace')}")
        if sel.select(left):
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"demo exited ({proc.wait()}) before {marker!r}:\n{out.decode(errors='replace')}")
            out += chunk
    # The rest of the banner follows within the same few writes; read it with a short deadline.
    end = time.monotonic() + 5
    while b"configuration:" not in out.split(marker.encode(), 1)[1] and time.monotonic() < end:
        if sel.select(end - time.monotonic()):
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
    return out.decode(errors="replace")


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{entry.name}: {cmdline}")
    return found


def test_demo_shows_accept_and_reject_then_cleans_up_on_ctrl_c():
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "demo.py")], cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out = read_until(proc, "Try this next", BANNER_TIMEOUT)
        workdir = re.search(r"files in (\S+?)\)", out).group(1)
        assert Path(workdir).is_dir()
        assert processes_mentioning(workdir), "the world should be running while the banner shows"

        decisions = {}
        for line in re.findall(r"^\s+decision: (.*)$", out, re.M):
            fields = parse_logfmt(line)
            decisions[fields["domain"]] = fields
        good, bad = decisions["dane-ok.secure.test"], decisions["dane-mismatch.secure.test"]
        assert (good["event"], good["direction"], good["verdict"], good["prooftype"]) == \
            ("decision", "inbound", "accept", "dane-ee"), good
        assert good["record"].startswith("3 1 1 "), good
        assert (bad["verdict"], bad["prooftype"], bad["record"]) == ("reject", "-", "-"), bad
        assert "no usable TLSA record matches" in bad["reason"] and "no fallback to PKIX" in bad["reason"], bad

        backend = re.findall(r"^\s+backend:\s+(.*)$", out, re.M)
        assert len(backend) == 2, out
        assert backend[0] == "delivered: alice@home.secure.test received 'hello from dane-ok.secure.test'", out
        assert backend[1].startswith("NOT delivered: the backend was sent the stream header only"), out
        assert "UNEXPECTED" not in out

        # The banner's commands point at the running world.
        ns = re.search(r"--nameserver (127\.0\.0\.1:\d+)", out).group(1)
        assert re.search(r"openssl s_client -starttls xmpp-server -connect 127\.0\.0\.1:\d+ -xmpphost "
                         r"home\.secure\.test", out), out
        metrics = re.search(r"curl -s (http://127\.0\.0\.1:\d+/metrics)", out).group(1)
        assert ns and metrics
        assert ":5269 " not in out   # the demo never needs the well-known port
        # The banner's inbound check explains the reject with the chain that peer presented.
        command = re.search(r"^\s+(\S+xmpp-dane-proxy check dane-mismatch\.secure\.test --inbound .*)$", out, re.M).group(1)
        check = subprocess.run(command.split(), cwd=REPO, capture_output=True, text=True, timeout=60)
        assert check.returncode == 1, check.stdout + check.stderr
        assert "no usable TLSA record matches" in check.stdout, check.stdout

        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=STOP_TIMEOUT)
        assert proc.returncode == 0, rest
        assert "stopped" in rest.decode()
        assert not Path(workdir).exists()
        assert processes_mentioning(workdir) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_demo_once_exits_zero_after_the_banner():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--once"], cwd=REPO,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=BANNER_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verdict=accept" in result.stdout and "verdict=reject" in result.stdout
    assert "Try this next:" in result.stdout
    workdir = re.search(r"files in (\S+?)\)", result.stdout).group(1)
    assert not Path(workdir).exists() and processes_mentioning(workdir) == []
