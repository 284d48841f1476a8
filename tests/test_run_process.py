"""`xmpp-dane-proxy run` as a real process: systemd notify and socket activation, SIGHUP reload,
SIGTERM drain, metrics — the operator's view (DESIGN §5, §6).

The proxy runs as `python -m proxy run -c FILE` in a subprocess.  A scripted peer (our TLS
client side, presenting test-PKI certificates) talks to it; a recording plaintext backend
stands in for Prosody.  DNS evidence is static (policy files' `tlsa`, treated as secure), and
`dns.nameservers` points at an address nobody answers on, so nothing here needs a resolver.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

import processlog

from policy.tlsa import record_for
from proxy.xmlstream import NS_DIALBACK, NS_STREAM_ERRORS, NS_STREAMS, Element, StreamClosed
from test_inbound_openssl import LOCAL, PEER, FakeBackend, Peer, world  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp: Path, world, backend_port: int, *, listen_port: int, metrics_port: int,
                 workers: int = 1, limits: dict[str, float] | None = None) -> Path:
    """The real-process tests' config: one local domain, the test CA, a dead resolver (policy
    files carry static evidence), `workers = 1` unless asked; `limits` becomes `[limits]`."""
    (tmp / "policy.d").mkdir(exist_ok=True)
    limits_table = "".join(f"{key} = {value}\n" for key, value in (limits or {}).items())
    path = tmp / "config.toml"
    path.write_text(f"""
[server]
workers = {workers}

[inbound]
listen = ["127.0.0.1:{listen_port}"]
backend = "127.0.0.1:{backend_port}"

[outbound]
listen = []

[[domain]]
name = "{LOCAL}"
cert = "{world.local.cert}"
key = "{world.local.key}"

[dns]
nameservers = ["127.0.0.1:{free_port()}"]
timeout = 1.0

[policy]
dir = "policy.d"
ca_file = "{world.dir / 'root.pem'}"

[limits]
{limits_table}
[metrics]
listen = "127.0.0.1:{metrics_port}"
""")
    return path


def dane_policy(world, *, require: str = "dane") -> str:
    from cryptography import x509
    leaf = x509.load_pem_x509_certificate(Path(world.peer_self.cert).read_bytes())
    return f'require = "{require}"\ntlsa = ["{record_for(leaf)}"]\nsrv = ["0 0 5269 xmpp.{PEER}."]\n'


class ProxyProcess:
    """The proxy in a subprocess; its log (stderr) is collected line by line."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv, self.env = argv, env
        self.lines: list[str] = []
        self._changed = trio.Event()

    async def start(self, nursery: trio.Nursery, **popen) -> None:
        """Start it; `popen`: more arguments for the process (e.g. `preexec_fn`)."""
        self.proc = await trio.lowlevel.open_process(
            self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, **popen)
        nursery.start_soon(self._read)
        processlog.register(" ".join(self.argv), lambda: self.lines)

    async def _read(self) -> None:
        buf = b""
        async for chunk in self.proc.stderr:
            buf += chunk
            *complete, buf = buf.split(b"\n")
            self.lines += [c.decode(errors="replace") for c in complete]
            self._changed.set()
            self._changed = trio.Event()
        self._changed.set()

    async def wait_log(self, pattern: str, *, after: int = 0) -> str:
        """The first log line (from index `after` on) matching `pattern`."""
        rx = re.compile(pattern)
        with trio.move_on_after(TIMEOUT):
            while True:
                for line in self.lines[after:]:
                    if rx.search(line):
                        return line
                if self.proc.returncode is not None and self.proc.stderr is None:
                    break
                await self._changed.wait()
        raise AssertionError(f"no log line matches {pattern!r}:\n" + "\n".join(self.lines))

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    async def exit_code(self) -> int:
        with trio.fail_after(TIMEOUT):
            return await self.proc.wait()

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


def proxy_argv(config: Path) -> list[str]:
    return [sys.executable, "-m", "proxy", "run", "-c", str(config)]


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


async def authenticate(port: int, identity, *, message: str | None = None) -> tuple[Peer, Element]:
    """A peer that negotiates, asserts PEER by dialback and returns the dialback answer."""
    peer = await Peer.connect(port)
    await peer.negotiate(identity)
    await peer.send(f"<db:result from='{PEER}' to='{LOCAL}'>key</db:result>")
    answer = await peer.expect(Element)
    assert answer.is_(NS_DIALBACK, "result"), answer
    if message is not None:
        await peer.send(message)
    return peer, answer


def backend_saw(backend: FakeBackend, needle: bytes):
    return lambda: any(needle in bytes(c.received) for c in backend.connections)


async def scrape(port: int) -> str:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    with trio.fail_after(TIMEOUT):
        while chunk := await stream.receive_some(65536):
            data += chunk
    await stream.aclose()
    return data.decode()


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels} in scrape")


@dataclass
class Notify:
    sock: socket.socket

    def messages(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out

    async def wait_for(self, word: str) -> list[str]:
        seen: list[str] = []
        with trio.fail_after(TIMEOUT):
            while True:
                await trio.lowlevel.wait_readable(self.sock)
                seen += self.messages()
                if any(word in m.split("\n") for m in seen):
                    return seen


@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.setblocking(False)
    yield Notify(sock)
    sock.close()


def test_reload_drain_notify_and_metrics(world, tmp_path, notify_socket):  # noqa: F811
    """One proxy lifetime: READY=1; an accepted stream; SIGHUP with a broken policy (nothing
    changes, the location is logged); SIGHUP with `block` (the next verdict changes, and the
    open stream is judged again and closed: DESIGN §3.4); SIGHUP back to DANE, a new stream;
    metrics count all of it; SIGTERM mid-stream delivers what was received, says
    system-shutdown, STOPPING=1, exit 0."""
    listen_port, metrics_port = free_port(), free_port()
    policy_file = tmp_path / "policy.d" / f"{PEER}.toml"

    async def main():
        backend = FakeBackend()
        async with backend.running(), trio.open_nursery() as nursery:
            config = write_config(tmp_path, world, backend.port, listen_port=listen_port,
                                  metrics_port=metrics_port)
            policy_file.write_text(dane_policy(world))
            proxy = ProxyProcess(proxy_argv(config), base_env(NOTIFY_SOCKET=str(tmp_path / "notify.sock")))
            await proxy.start(nursery)
            try:
                assert "READY=1" in "\n".join(await notify_socket.wait_for("READY=1"))
                await proxy.wait_log(r"event=ready")

                # An accepted stream (DANE-EE by the static TLSA), with a first message.
                first, answer = await authenticate(listen_port, world.peer_self,
                                                   message=f"<message from='{PEER}' to='{LOCAL}'><body>one</body></message>")
                assert answer.attrs.get("type") == "valid", "\n".join(proxy.lines)
                await backend.wait_for(backend_saw(backend, b"<body>one</body>"))

                # SIGHUP with a broken policy: logged with file:line, the old policy stays.
                policy_file.write_text('require = "dane"\nrequire_typo = 1\n')
                mark = len(proxy.lines)
                proxy.signal(signal.SIGHUP)
                seen = await notify_socket.wait_for("READY=1")
                assert any("RELOADING=1" in m for m in seen)
                line = await proxy.wait_log(re.escape(f"{policy_file}:2: unknown key 'require_typo'"), after=mark)
                assert "reload" in line.lower()
                second, answer = await authenticate(listen_port, world.peer_self)
                assert answer.attrs.get("type") == "valid", "\n".join(proxy.lines)
                await second.aclose()

                # SIGHUP with `block`: the next verdict changes, and the open stream is judged
                # again against the new policy and closed (DESIGN §3.4).
                policy_file.write_text('require = "block"\n')
                mark = len(proxy.lines)
                proxy.signal(signal.SIGHUP)
                await notify_socket.wait_for("READY=1")
                await proxy.wait_log(r"reloaded", after=mark)
                third, answer = await authenticate(listen_port, world.peer_self)
                assert answer.attrs.get("type") == "error" and b"blocked" in third.received
                await third.aclose()
                await proxy.wait_log(r"event=decision .*verdict=reject .*blocked", after=mark)
                await proxy.wait_log(r'event=decision .*verdict=reject .*reason="re-verification: .*blocked', after=mark)
                error = await first.expect(Element)
                assert error.is_(NS_STREAMS, "error") and error.find(NS_STREAM_ERRORS, "policy-violation") is not None
                assert b"re-verification: " in error.raw
                await first.until_closed()
                await backend.wait_for(lambda: backend.connections[0].closed)
                assert bytes(backend.connections[0].received).endswith(b"</stream:stream>")
                # The rejected stream's dialback never reached the backend.
                assert sum(bytes(c.received).count(b"<db:result") for c in backend.connections) == 2

                # Back to DANE: a new stream is accepted (it carries the rest of the test).
                policy_file.write_text(dane_policy(world))
                mark = len(proxy.lines)
                proxy.signal(signal.SIGHUP)
                await notify_socket.wait_for("READY=1")
                await proxy.wait_log(r"reloaded", after=mark)
                first, answer = await authenticate(listen_port, world.peer_self,
                                                   message=f"<message from='{PEER}' to='{LOCAL}'><body>two</body></message>")
                assert answer.attrs.get("type") == "valid", "\n".join(proxy.lines)
                await backend.wait_for(backend_saw(backend, b"<body>two</body>"))

                text = await scrape(metrics_port)
                assert metric(text, "xmpp_dane_proxy_verdicts_total", direction="inbound",
                              verdict="accept", prooftype="dane-ee") == 3
                # The third stream's verdict and the re-verification of the first.
                assert metric(text, "xmpp_dane_proxy_verdicts_total", direction="inbound",
                              verdict="reject", reason="blocked") == 2
                assert metric(text, "xmpp_dane_proxy_reverifications_total", direction="inbound",
                              result="revoked") == 1
                assert metric(text, "xmpp_dane_proxy_config_reloads_total", result="failure") == 1
                # The start-up load counts as a successful load, then two more SIGHUPs.
                assert metric(text, "xmpp_dane_proxy_config_reloads_total", result="success") == 3

                # SIGTERM right after a stanza: the peer gets system-shutdown and the end of our
                # stream; what it sent before it saw that (the stanza in flight, and one more)
                # still reaches the backend (RFC 6120 §4.4); then the proxy exits 0.
                await first.send(f"<message from='{PEER}' to='{LOCAL}'><body>last words</body></message>")
                proxy.signal(signal.SIGTERM)
                assert any("STOPPING=1" in m for m in await notify_socket.wait_for("STOPPING=1"))
                error = await first.expect(Element)
                assert error.is_(NS_STREAMS, "error") and error.find(NS_STREAM_ERRORS, "system-shutdown") is not None
                await first.expect(StreamClosed)
                await first.send(f"<message from='{PEER}' to='{LOCAL}'><body>in flight</body></message></stream:stream>")
                await first.until_closed()
                assert await proxy.exit_code() == 0
                received = bytes(backend.connections[-1].received)
                assert received.endswith(b"<body>last words</body></message>"
                                         + f"<message from='{PEER}' to='{LOCAL}'><body>in flight</body></message>".encode()
                                         + b"</stream:stream>")
            finally:
                proxy.kill()

    trio.run(main)


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate missing (Debian package systemd; scripts/bootstrap installs it)")
def test_socket_activation_serves_the_handed_socket(world, tmp_path):  # noqa: F811
    """systemd's own `systemd-socket-activate` hands the proxy its listening socket
    (LISTEN_FDS, FileDescriptorName=inbound); the configured listen address stays unbound."""
    activated_port, configured_port = free_port(), free_port()

    async def main():
        backend = FakeBackend()
        async with backend.running(), trio.open_nursery() as nursery:
            config = write_config(tmp_path, world, backend.port, listen_port=configured_port,
                                  metrics_port=free_port())
            (tmp_path / "policy.d" / f"{PEER}.toml").write_text(dane_policy(world))
            argv = ["systemd-socket-activate", f"--listen=127.0.0.1:{activated_port}",
                    "--fdname=inbound", *proxy_argv(config)]
            proxy = ProxyProcess(argv, base_env())
            await proxy.start(nursery)
            try:
                await proxy.wait_log(r"Listening on")    # systemd-socket-activate's own line
                # The first connection makes systemd-socket-activate start the proxy.
                peer, answer = await authenticate(activated_port, world.peer_self)
                assert answer.attrs.get("type") == "valid", "\n".join(proxy.lines)
                line = await proxy.wait_log(r"event=ready")
                assert f"127.0.0.1:{activated_port}" in line
                with pytest.raises(OSError):
                    await trio.open_tcp_stream("127.0.0.1", configured_port)
                proxy.signal(signal.SIGTERM)
                error = await peer.expect(Element)
                assert error.find(NS_STREAM_ERRORS, "system-shutdown") is not None
                await peer.send(b"</stream:stream>")
                await peer.until_closed()
                assert await proxy.exit_code() == 0
            finally:
                proxy.kill()

    trio.run(main)


def test_bad_config_exits_1_with_locations(tmp_path):
    (tmp_path / "config.toml").write_text('[inbound]\nlisten = "not-a-list"\n[[domain]]\nname = "x.example"\n')
    out = subprocess.run(proxy_argv(tmp_path / "config.toml"), env=base_env(), capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 1
    assert f"{tmp_path / 'config.toml'}:2: inbound.listen must be a list" in out.stderr
    assert f"{tmp_path / 'config.toml'}:3: [[domain]] needs cert, key" in out.stderr
