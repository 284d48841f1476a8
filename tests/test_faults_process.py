"""Faults around a running `xmpp-dane-proxy run` (issue 15): what peers see, what is counted.

The proxy is a real process (`python -m proxy run`); peers are scripted TLS clients
(tests/test_inbound_openssl.Peer) presenting test-PKI certificates accepted by DANE-EE from a
policy file's static TLSA; the backend is `ScriptedBackend` below, a plaintext XMPP server
that can be down, hung, restarted gracefully (RFC 6120 §4.4) or crashed (connections reset).
Every stanza carries an id; a test counts, per stanza, whether the backend read it or its
sender got an error back — none may be lost silently.  After each scenario the proxy's
`connections_total` by outcome, `connections_open` and its `stream-closed` lines are checked.
"""
from __future__ import annotations

import os
import re
import resource
import signal
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from proxy.xmlstream import (
    NS_DIALBACK, NS_STANZA_ERRORS, NS_STREAM_ERRORS, NS_STREAMS, Element, StreamClosed, StreamOpened,
    XmlStreamParser,
)
from proxyenv import parse_logfmt
from test_inbound_openssl import LOCAL, PEER, RESTART, Peer, starttls_client, world  # noqa: F401  (fixture)
from test_tls import OpenSSLProcess, client_cert_args
from test_run_process import ProxyProcess, base_env, dane_policy, free_port, metric, proxy_argv, scrape
from test_run_process import write_config as run_process_config

TIMEOUT = 20.0
STREAMS = 50


def write_config(tmp: Path, world, backend_port: int, *, listen_port: int, metrics_port: int,  # noqa: F811
                 handshake_timeout: float = 10.0, max_connections: int = 1000, idle_timeout: float = 0.0) -> Path:
    """`test_run_process.write_config` with these tests' limits and the peer's DANE policy."""
    path = run_process_config(tmp, world, backend_port, listen_port=listen_port, metrics_port=metrics_port,
                              limits={"handshake_timeout": handshake_timeout, "max_connections": max_connections,
                                      "idle_timeout": idle_timeout})
    (tmp / "policy.d" / f"{PEER}.toml").write_text(dane_policy(world))
    return path


# ------------------------------------------------------------------------------ the backend

@dataclass
class BackendConn:
    stream: trio.SocketStream
    ids: list[str] = field(default_factory=list)       # message ids read, in order
    got_close: bool = False                             # the proxy's </stream:stream> arrived
    sent_close: bool = False
    after_close: int = 0                                # messages read after the backend closed


class ScriptedBackend:
    """A plaintext S2S backend on a fixed loopback port that can be started, stopped, hung,
    closed gracefully or crashed.  Confirms every dialback request; records message ids."""

    HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
              b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
              b"id='backend-1' from='" + LOCAL.encode() + b"' version='1.0'><stream:features/>")

    def __init__(self, port: int) -> None:
        self.port = port
        self.hung = False
        self.conns: list[BackendConn] = []
        self.accepted = 0
        self._scope: trio.CancelScope | None = None
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, condition, what: str = "backend condition"):
        with trio.move_on_after(TIMEOUT):
            while not (result := condition()):
                await self._changed.wait()
            return result
        raise AssertionError(f"{what() if callable(what) else what} not reached")

    async def start(self, nursery: trio.Nursery) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")

        async def serve(task_status=trio.TASK_STATUS_IGNORED):
            with trio.CancelScope() as scope:
                self._scope = scope
                task_status.started()
                await trio.serve_listeners(self._serve, listeners)
        await nursery.start(serve)

    def stop(self) -> None:
        """Stop listening (connections already open stay)."""
        assert self._scope is not None
        self._scope.cancel()

    async def _serve(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        self._notify()
        if self.hung:
            await trio.sleep_forever()
        conn = BackendConn(stream)
        self.conns.append(conn)
        parser = XmlStreamParser()
        try:
            while data := await stream.receive_some(65536):
                for event in parser.feed(data):
                    if isinstance(event, StreamOpened):
                        await stream.send_all(self.HEADER)
                    elif isinstance(event, Element) and event.is_(NS_DIALBACK, "result"):
                        await stream.send_all(
                            f"<db:result from='{event.attrs['to']}' to='{event.attrs['from']}' type='valid'/>".encode())
                    elif isinstance(event, Element) and event.name == "message":
                        conn.ids.append(event.attrs.get("id", ""))
                        conn.after_close += conn.sent_close
                    elif isinstance(event, StreamClosed):
                        conn.got_close = True
                        if not conn.sent_close:
                            conn.sent_close = True
                            await stream.send_all(b"</stream:stream>")
                        return
                self._notify()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._notify()
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def close_gracefully(self) -> None:
        """RFC 6120 §4.4 from the backend's side: `</stream:stream>` on every connection, then
        keep reading until the other side closes too (what a restarting server does)."""
        for conn in self.conns:
            if not conn.sent_close:
                conn.sent_close = True
                await conn.stream.send_all(b"</stream:stream>")

    def crash(self) -> None:
        """Every connection reset at once (SO_LINGER 0): what a killed backend leaves behind."""
        for conn in self.conns:
            sock = conn.stream.socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

    def ids(self) -> set[str]:
        return {i for c in self.conns for i in c.ids}


# ------------------------------------------------------------------------------ peers

def message(peer_no: int, n: int) -> str:
    return (f"<message from='{PEER}' to='user@{LOCAL}' id='p{peer_no}-{n}' type='chat'>"
            f"<body>{peer_no}/{n}</body></message>")


async def open_peer(port: int, world) -> Peer:  # noqa: F811
    peer = await Peer.connect(port)
    await peer.negotiate(world.peer_self)
    await peer.send(f"<db:result from='{PEER}' to='{LOCAL}'>key</db:result>")
    answer = await peer.expect(Element)
    assert answer.is_(NS_DIALBACK, "result") and answer.attrs.get("type") == "valid", peer.received
    return peer


@dataclass
class Talker:
    """One peer that sends messages and reads what comes back, behaving like a server: when
    the proxy ends the stream it stops sending and closes its own (RFC 6120 §4.4)."""

    no: int
    peer: Peer
    sent: list[str] = field(default_factory=list)
    bounced: dict[str, str] = field(default_factory=dict)     # id -> stanza error condition
    stream_error: str | None = None
    closed_by_proxy: bool = False
    eof: bool = False
    lock: trio.Lock = field(default_factory=trio.Lock)
    done: trio.Event = field(default_factory=trio.Event)
    pending_on_close: int = 0    # messages still to send when the proxy's close arrives

    async def send_message(self) -> bool:
        async with self.lock:
            if self.closed_by_proxy or self.eof:
                return False
            n = len(self.sent)
            try:
                await self.peer.send(message(self.no, n))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
            self.sent.append(f"p{self.no}-{n}")
            return True

    async def read(self) -> None:
        try:
            while True:
                try:
                    event = await self.peer.next_event(timeout=TIMEOUT)
                except EOFError:
                    self.eof = True
                    return
                if isinstance(event, Element) and event.attrs.get("type") == "error" and event.name == "message":
                    # (The parser keeps no children of stanzas: they are routed unread.)
                    m = re.search(rb"<([a-z-]+) xmlns=['\"]" + re.escape(NS_STANZA_ERRORS.encode()) + rb"['\"]/>",
                                  event.raw)
                    self.bounced[event.attrs.get("id", "")] = m.group(1).decode() if m else "?"
                elif isinstance(event, Element) and event.is_(NS_STREAMS, "error"):
                    self.stream_error = next(c.name for c in event.children if c.ns == NS_STREAM_ERRORS)
                elif isinstance(event, StreamClosed):
                    async with self.lock:
                        self.closed_by_proxy = True
                        try:
                            # RFC 6120 §4.4: the other side finishes sending what it has,
                            # then closes its own stream.
                            for _ in range(self.pending_on_close):
                                n = len(self.sent)
                                await self.peer.send(message(self.no, n))
                                self.sent.append(f"p{self.no}-{n}")
                            await self.peer.send(b"</stream:stream>")
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
        finally:
            self.done.set()


def stanza_account(talkers: list[Talker], delivered: set[str]) -> tuple[int, int, list[str]]:
    """(delivered, returned with an error, lost silently) over every stanza sent."""
    lost, n_delivered, n_bounced = [], 0, 0
    for t in talkers:
        for i in t.sent:
            if i in delivered:
                n_delivered += 1
            elif i in t.bounced:
                n_bounced += 1
            else:
                lost.append(i)
    return n_delivered, n_bounced, lost


def stream_closed(proxy: ProxyProcess) -> list[dict[str, str]]:
    return [f for f in map(parse_logfmt, proxy.lines) if f.get("event") == "stream-closed"]


async def outcomes(metrics_port: int) -> tuple[dict[str, float], float]:
    text = await scrape(metrics_port)
    counts = {}
    for line in text.splitlines():
        m = re.match(r'xmpp_dane_proxy_connections_total\{direction="inbound",outcome="([^"]+)"\} (\S+)', line)
        if m and float(m.group(2)):
            counts[m.group(1)] = float(m.group(2))
    return counts, metric(text, "xmpp_dane_proxy_connections_open", direction="inbound")


async def until(condition, what: str, timeout: float = TIMEOUT):
    """Poll a condition on state another process changes (the proxy's log, its metrics)."""
    with trio.move_on_after(timeout):
        while not (result := await condition()):
            await trio.sleep(0.05)
        return result
    raise AssertionError(f"{what} not reached")


@pytest.fixture
def ports():
    return {"listen": free_port(), "metrics": free_port(), "backend": free_port()}


def run_scenario(world, tmp_path, ports, scenario, **config):  # noqa: F811
    async def main():
        backend = ScriptedBackend(ports["backend"])
        async with trio.open_nursery() as nursery:
            cfg = write_config(tmp_path, world, ports["backend"], listen_port=ports["listen"],
                               metrics_port=ports["metrics"], **config)
            proxy = ProxyProcess(proxy_argv(cfg), base_env())
            await proxy.start(nursery)
            try:
                await proxy.wait_log(r"event=ready")
                await scenario(proxy, backend, nursery)
            finally:
                proxy.kill()
                nursery.cancel_scope.cancel()
    trio.run(main)


# ------------------------------------------------------------------------------ scenarios

def test_backend_down_then_up(world, tmp_path, ports):  # noqa: F811
    """No backend: the peer gets remote-connection-failed naming the refusal.  Backend up:
    the next peer is relayed.  Counted and logged as exactly that."""
    async def scenario(proxy, backend, nursery):
        peer = await Peer.connect(ports["listen"])
        await peer.open_stream()
        await peer.starttls(world.peer_self)
        await peer.open_stream()
        error = await peer.expect(Element)
        assert error.find(NS_STREAM_ERRORS, "remote-connection-failed") is not None
        assert b"unreachable: " in peer.received and b"Connection refused" in peer.received, peer.received
        await peer.until_closed()

        await backend.start(nursery)
        talker_peer = await open_peer(ports["listen"], world)
        await talker_peer.send(message(0, 0))
        await backend.wait_for(lambda: "p0-0" in backend.ids())
        await talker_peer.send(b"</stream:stream>")
        await talker_peer.expect(StreamClosed)
        await talker_peer.until_closed()

        counts, open_now = await until(
            lambda: _settled(ports["metrics"], 2), "both connections counted")
        assert counts == {"remote-connection-failed": 1, "ok": 1}, counts
        assert open_now == 0
        lines = stream_closed(proxy)
        assert [l["outcome"] for l in lines] == ["remote-connection-failed", "ok"], lines
        assert "unreachable" in lines[0]["reason"]
        assert backend.conns[0].got_close
    run_scenario(world, tmp_path, ports, scenario)


async def _settled(metrics_port: int, total: int):
    counts, open_now = await outcomes(metrics_port)
    return (counts, open_now) if sum(counts.values()) >= total and open_now == 0 else None


def test_hung_backend_gets_the_peer_an_error_within_handshake_timeout(world, tmp_path, ports):  # noqa: F811
    """A backend that accepts and never answers: the peer gets remote-connection-failed once
    handshake_timeout has passed since it connected, not silence."""
    async def scenario(proxy, backend, nursery):
        backend.hung = True
        await backend.start(nursery)
        peer = await Peer.connect(ports["listen"])
        started = trio.current_time()
        await peer.open_stream()
        await peer.starttls(world.peer_self)
        with trio.fail_after(2.0 + 5.0):       # handshake_timeout, plus a loaded machine's margin
            await peer.open_stream()
            error = await peer.expect(Element)
            await peer.until_closed()
        assert trio.current_time() - started >= 1.9   # the deadline counts from the proxy's accept
        assert error.find(NS_STREAM_ERRORS, "remote-connection-failed") is not None, peer.received
        assert b"sent no stream header within 2 s" in peer.received
        assert backend.accepted == 1
        counts, open_now = await until(lambda: _settled(ports["metrics"], 1), "connection counted")
        assert counts == {"remote-connection-failed": 1} and open_now == 0
        [line] = stream_closed(proxy)
        assert line["outcome"] == "remote-connection-failed" and "no stream header" in line["reason"]
    run_scenario(world, tmp_path, ports, scenario, handshake_timeout=2.0)


async def _talkers(port: int, world, nursery, count: int = STREAMS) -> list[Talker]:  # noqa: F811
    talkers: list[Talker] = []

    async def one(i):
        talkers.append(Talker(i, await open_peer(port, world)))

    async with trio.open_nursery() as n:
        for i in range(count):
            n.start_soon(one, i)
    for t in talkers:
        nursery.start_soon(t.read)
    return talkers


def test_backend_graceful_restart_under_load_loses_nothing(world, tmp_path, ports):  # noqa: F811
    """50 streams sending continuously; the backend ends every stream (RFC 6120 §4.4) and
    keeps reading.  Every peer gets the close, stops and closes; every stanza it sent reached
    the backend, and every backend stream got its closing tag."""
    async def scenario(proxy, backend, nursery):
        await backend.start(nursery)
        talkers = await _talkers(ports["listen"], world, nursery)
        for t in talkers:
            t.pending_on_close = 3     # under way when the close reaches the peer
        restarted = trio.Event()

        async def keep_sending(t: Talker):
            while await t.send_message():
                if restarted.is_set() and len(t.sent) > 400:
                    break
                await trio.sleep(0.003)   # pacing, not synchronisation

        async with trio.open_nursery() as n:
            for t in talkers:
                n.start_soon(keep_sending, t)
            await backend.wait_for(lambda: len(backend.ids()) >= STREAMS * 5, "traffic flowing")
            await backend.close_gracefully()
            restarted.set()
        for t in talkers:
            with trio.fail_after(TIMEOUT):
                await t.done.wait()
        await backend.wait_for(lambda: all(c.got_close for c in backend.conns),
                               lambda: f"every backend stream closed: {[c.got_close for c in backend.conns]}\n"
                               + "\n".join(proxy.lines[-20:]))
        delivered, bounced, lost = stanza_account(talkers, backend.ids())
        assert lost == [] and bounced == 0, lost[:10]
        assert delivered > STREAMS * 5
        # The stanzas each peer sent after the backend's close reached the backend.
        assert sum(c.after_close for c in backend.conns) >= STREAMS * 3
        assert all(t.closed_by_proxy and t.stream_error is None for t in talkers)
        counts, open_now = await until(lambda: _settled(ports["metrics"], STREAMS), "every stream counted")
        assert counts == {"ok": STREAMS} and open_now == 0, counts
        lines = stream_closed(proxy)
        assert len(lines) == STREAMS and all(l["outcome"] == "ok" for l in lines)
        assert all("the backend closed the stream, then the peer" in l["reason"] for l in lines), lines[:3]
    run_scenario(world, tmp_path, ports, scenario)


def test_backend_crash_under_load_answers_every_undelivered_stanza(world, tmp_path, ports):  # noqa: F811
    """50 streams; the backend's connections are reset while peers keep sending.  Stanzas
    the backend read are delivered; every stanza sent after the reset comes back to its
    sender as service-unavailable; then the stream ends with remote-connection-failed."""
    async def scenario(proxy, backend, nursery):
        await backend.start(nursery)
        talkers = await _talkers(ports["listen"], world, nursery)
        for t in talkers:
            for _ in range(5):
                assert await t.send_message()
        await backend.wait_for(lambda: len(backend.ids()) == STREAMS * 5, "first stanzas delivered")
        backend.crash()

        async def after_crash(t: Talker):
            for _ in range(5):       # under way while the proxy learns of the crash
                if not await t.send_message():
                    break

        async with trio.open_nursery() as n:
            for t in talkers:
                n.start_soon(after_crash, t)
        for t in talkers:
            with trio.fail_after(TIMEOUT):
                await t.done.wait()
        delivered, bounced, lost = stanza_account(talkers, backend.ids())
        assert lost == [], lost[:10]
        assert delivered == STREAMS * 5 and bounced == STREAMS * 5, (delivered, bounced)
        assert all(set(t.bounced.values()) == {"service-unavailable"} for t in talkers)
        assert {t.stream_error for t in talkers} == {"remote-connection-failed"}
        counts, open_now = await until(lambda: _settled(ports["metrics"], STREAMS), "every stream counted")
        assert counts == {"remote-connection-failed": STREAMS} and open_now == 0, counts
        lines = stream_closed(proxy)
        assert len(lines) == STREAMS
        assert all(l["outcome"] == "remote-connection-failed" and l["returned"] == "5" for l in lines), lines[:3]
    run_scenario(world, tmp_path, ports, scenario)


def test_sigterm_with_peers_that_never_close(world, tmp_path, ports):  # noqa: F811
    """SIGTERM: peers get system-shutdown and never answer.  After the drain bound the proxy
    exits 0; each stream is counted system-shutdown, and the backend got `</stream:stream>`
    on every one."""
    async def scenario(proxy, backend, nursery):
        await backend.start(nursery)
        peers = [await open_peer(ports["listen"], world) for _ in range(5)]
        await backend.wait_for(lambda: len(backend.conns) == 5)
        proxy.signal(signal.SIGTERM)
        for peer in peers:
            error = await peer.expect(Element)
            assert error.find(NS_STREAM_ERRORS, "system-shutdown") is not None
            await peer.expect(StreamClosed)
        with trio.fail_after(30):
            assert await proxy.exit_code() == 0
        assert all(c.got_close for c in backend.conns), "\n".join(proxy.lines[-12:])
        lines = stream_closed(proxy)
        assert len(lines) == 5 and all(l["outcome"] == "system-shutdown" for l in lines), lines
        assert all("did not close its stream in time" in l["reason"] for l in lines)
        [stopped] = [parse_logfmt(l) for l in proxy.lines if "event=stopped" in l]
        assert stopped.get("outcome_system_shutdown") == "5" and "outcome_internal_error" not in stopped
    run_scenario(world, tmp_path, ports, scenario)


def test_tcp_keepalive_on_peer_and_backend_sockets(world, tmp_path, ports):  # noqa: F811
    """A peer that vanishes without FIN is found by TCP keepalive: both of a stream's
    sockets carry the keepalive timer (ss shows it), with proxy.keepalive's idle time."""
    from proxy.keepalive import KEEPALIVE_IDLE

    async def scenario(proxy, backend, nursery):
        await backend.start(nursery)
        peer = await open_peer(ports["listen"], world)
        await backend.wait_for(lambda: backend.conns)
        listen, back = f"127.0.0.1:{ports['listen']}", f"127.0.0.1:{ports['backend']}"

        async def sockets():
            out = (await trio.run_process(["ss", "-tnoH", "state", "established"],
                                          capture_stdout=True)).stdout.decode()
            # The proxy's end of the peer connection (local = the listen port) and of the
            # backend one (remote = the backend port).  A socket with unacknowledged data
            # shows its retransmission timer instead: look again until both are idle.
            mine = [l for l in out.splitlines() if l.split()[2] == listen or l.split()[3] == back]
            return mine if len(mine) == 2 and all("keepalive" in l for l in mine) else None

        for line in await until(sockets, "both sockets idle with a keepalive timer"):
            m = re.search(r"timer:\(keepalive,(?:(\d+)min)?(\d+)sec", line)
            assert m, line
            seconds = int(m.group(1) or 0) * 60 + int(m.group(2))
            assert KEEPALIVE_IDLE - 60 <= seconds <= KEEPALIVE_IDLE, line
        await peer.aclose()
    run_scenario(world, tmp_path, ports, scenario)


def test_out_of_file_descriptors_is_resource_constraint(world, tmp_path, ports):  # noqa: F811
    """Started with soft RLIMIT_NOFILE 64 and hard 128: the proxy raises the soft limit to
    128 and warns that 2 x max_connections + slack is more.  With every descriptor but one
    taken, a peer that needs a backend connection gets resource-constraint (not "backend
    unreachable"), counted as such."""
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 128))

    async def main():
        backend = ScriptedBackend(ports["backend"])
        async with trio.open_nursery() as nursery:
            await backend.start(nursery)
            cfg = write_config(tmp_path, world, ports["backend"], listen_port=ports["listen"],
                               metrics_port=ports["metrics"], handshake_timeout=60.0)
            proxy = ProxyProcess(proxy_argv(cfg), base_env())
            await proxy.start(nursery, preexec_fn=limit)
            held: list[trio.SocketStream] = []
            try:
                fields = parse_logfmt(await proxy.wait_log(r"event=fd-limit"))
                assert fields["soft"] == "128" and fields["hard"] == "128", fields
                assert "below 2 x limits.max_connections" in fields.get("warning", ""), fields
                await proxy.wait_log(r"event=ready")
                # The own-TLSA check at start runs after ready; against this config's dead
                # resolver its DNS sockets stay open for dns.timeout.  Count descriptors
                # only once it has logged its verdict and closed them.
                await proxy.wait_log(r"event=own-tlsa")
                fd_dir = Path(f"/proc/{proxy.proc.pid}/fd")
                base = len(os.listdir(fd_dir))
                # Idle TCP connections, one descriptor each in the proxy, until one is left.
                while base + len(held) < 127:
                    held.append(await trio.open_tcp_stream("127.0.0.1", ports["listen"]))
                    want = base + len(held)

                    async def accepted(want=want):
                        return len(os.listdir(fd_dir)) >= want
                    await until(accepted, "connection accepted")
                peer = await Peer.connect(ports["listen"])   # takes the last descriptor
                await peer.open_stream()
                await peer.starttls(world.peer_self)
                await peer.open_stream()
                error = await peer.expect(Element)
                assert error.find(NS_STREAM_ERRORS, "resource-constraint") is not None, peer.received
                assert b"Too many open files" in peer.received
                line = await proxy.wait_log(r"event=stream-closed .*outcome=resource-constraint")
                assert "unreachable" not in line
                for s in held:
                    await s.aclose()
                counts, _ = await outcomes(ports["metrics"])
                assert counts.get("resource-constraint") == 1, counts
            finally:
                proxy.kill()
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_peer_that_vanishes_is_released_by_idle_timeout(world, tmp_path, ports):  # noqa: F811
    """A peer that stops sending anything without closing — here an `openssl s_client` that
    is SIGSTOPped: its kernel still acknowledges, as for a peer whose host hangs — is released
    after limits.idle_timeout with connection-timeout; the backend gets `</stream:stream>`.
    (A peer whose packets vanish altogether is TCP keepalive's, tested above.)"""
    async def scenario(proxy, backend, nursery):
        await backend.start(nursery)
        args = starttls_client(ports["listen"], *client_cert_args(world.peer_self))
        async with OpenSSLProcess.run(*args) as peer:
            await peer.wait_for(rb"Verification|CONNECTION ESTABLISHED|Protocol version")
            await peer.send(RESTART.encode())
            await peer.wait_for(rb"id='backend-1'")
            await peer.send(f"<db:result from='{PEER}' to='{LOCAL}'>key</db:result>".encode())
            await peer.wait_for(rb"type='valid'")
            peer.proc.send_signal(signal.SIGSTOP)
            try:
                line = await proxy.wait_log(r"event=stream-closed .*outcome=connection-timeout")
                assert "idle_timeout" in line
                await backend.wait_for(lambda: backend.conns and backend.conns[0].got_close,
                                       "the backend's stream closed")
            finally:
                peer.proc.send_signal(signal.SIGCONT)
            # What the stopped peer finds when it wakes up: the reason, and the end.
            await peer.wait_for(rb"connection-timeout.*</stream:stream>")
        counts, open_now = await until(lambda: _settled(ports["metrics"], 1), "connection counted")
        assert counts == {"connection-timeout": 1} and open_now == 0, counts
    run_scenario(world, tmp_path, ports, scenario, idle_timeout=2.0)
