"""The inbound proxy (proxy/inbound.py, proxy/server.py) with `openssl s_client` as the peer.

`openssl s_client -starttls xmpp-server` (and plain `s_client -alpn xmpp-server` for Direct
TLS) is the remote server; a small trio TCP server stands in for the plaintext backend and
records every byte it receives.  DNS evidence is injected: a policy file's static `tlsa` is
secure evidence (DESIGN §2.4), no `tlsa` means no TLSA.

Also home of the helpers the bad-input tests share: `FakeBackend`, `running_proxy`, `Peer`.
"""
from __future__ import annotations

import base64
import dataclasses
import functools
import html
import logging
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives import serialization

from pki import TestCA, self_signed
from policy.tlsa import record_for
from policy.evidence import DnsStatus, Evidence
from proxy.logsetup import LogfmtFormatter
from proxy.config import (
    Config, DnsConfig, DomainConfig, InboundConfig, LimitsConfig, OutboundConfig, PolicyConfig,
)
from proxy.server import Listening, serve
from proxy.tls import TlsStream, client_context
from proxy.xmlstream import (
    NS_DIALBACK, NS_STANZA_ERRORS, NS_STREAM_ERRORS, NS_STREAMS, NS_TLS, Element, StreamClosed,
    StreamOpened, XmlStreamParser,
)
from test_tls import OpenSSLProcess, client_cert_args, write_identity

TIMEOUT = 15.0
LOCAL = "b.example"       # the domain our backend serves
OTHER_LOCAL = "c.example"
PEER = "a.example"        # the remote server


def tlsa_311(cert) -> str:
    return str(record_for(cert))


async def static_evidence(domain: str, policy) -> Evidence:
    """Injected DNS evidence: static TLSA from the policy file counts as secure (DESIGN §2.4)."""
    if policy.tlsa:
        return Evidence(domain, tlsa=tuple(policy.tlsa), tlsa_status=DnsStatus.SECURE,
                        statuses={f"TLSA _5269._tcp.{domain} (policy file)": DnsStatus.SECURE})
    return Evidence(domain)


# ------------------------------------------------------------------------------ the backend stand-in

@dataclass
class BackendConnection:
    received: bytearray = field(default_factory=bytearray)
    events: list = field(default_factory=list)
    closed: bool = False


class FakeBackend:
    """A plaintext XMPP server on loopback, just enough for the proxy: answers the stream
    header with its own header and features (including `<starttls/>`, which the proxy must
    strip), confirms every `<db:result>` with type='valid' (as a backend whose dialback
    succeeded would), and records every byte."""

    FEATURES = (b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
                b"<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>EXTERNAL</mechanism></mechanisms>"
                b"<dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>"
                b"<bidi xmlns='urn:xmpp:features:bidi'/></stream:features>")

    def __init__(self, *, confirm_dialback: bool = True) -> None:
        self.confirm_dialback = confirm_dialback
        self.connections: list[BackendConnection] = []
        self.port = 0
        self._changed = trio.Event()
        self.streams: list[trio.SocketStream] = []

    @asynccontextmanager
    async def running(self):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(trio.serve_listeners, self._serve, listeners))
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = BackendConnection()
        self.connections.append(conn)
        self.streams.append(stream)
        parser = XmlStreamParser()
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    break
                conn.received += data
                for event in parser.feed(data):
                    conn.events.append(event)
                    if isinstance(event, StreamOpened):
                        await stream.send_all(
                            b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                            b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
                            b"id='backend-stream-1' from='" + (event.to or "").encode() + b"' version='1.0'>"
                            + self.FEATURES)
                    elif isinstance(event, Element) and event.is_(NS_DIALBACK, "result") and self.confirm_dialback:
                        await stream.send_all(
                            f"<db:result from='{event.attrs['to']}' to='{event.attrs['from']}' type='valid'/>".encode())
                    elif isinstance(event, StreamClosed):
                        await stream.send_all(b"</stream:stream>")
                self._notify()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            conn.closed = True
            self._notify()
            await stream.aclose()

    async def wait_for(self, condition, timeout: float = TIMEOUT):
        """Wait until `condition()` is true (re-checked whenever the backend sees something)."""
        with trio.move_on_after(timeout):
            while not (result := condition()):
                await self._changed.wait()
            return result
        raise AssertionError("backend condition not met; received: "
                             + repr([bytes(c.received) for c in self.connections]))

    def elements(self, index: int = 0) -> list[Element]:
        return [e for e in self.connections[index].events if isinstance(e, Element)]


# ------------------------------------------------------------------------------ the proxy under test

@dataclass
class World:
    dir: Path
    ca: TestCA
    local: object
    other_local: object
    peer: object           # a.example, issued by the test CA (PKIX-valid)
    peer_self: object      # a.example, self-signed (for DANE-EE)
    stranger: object       # a.example, wrong key for the TLSA record


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    d = tmp_path_factory.mktemp("inbound")
    ca = TestCA()
    inter = ca.intermediate()
    ca.write_root(d / "root.pem")
    return World(
        dir=d, ca=ca,
        local=write_identity(inter.issue(dns=[LOCAL]), d, "local"),
        other_local=write_identity(inter.issue(dns=[OTHER_LOCAL]), d, "other"),
        peer=write_identity(inter.issue(dns=[PEER], xmpp=[PEER]), d, "peer"),
        peer_self=write_identity(self_signed([PEER]), d, "peer-self"),
        stranger=write_identity(self_signed([PEER]), d, "stranger"),
    )


def make_config(world: World, backend: str, tmp_path: Path, *, policies: dict[str, str] | None = None,
                handshake_timeout: float = 10.0, max_stanza_bytes: int = 262144,
                max_connections: int = 100, max_unauthenticated: int = 0, idle_timeout: float = 0.0) -> Config:
    policy_dir = tmp_path / "policy.d"
    policy_dir.mkdir(exist_ok=True)
    for name, text in (policies or {}).items():
        (policy_dir / f"{name}.toml").write_text(text)
    return Config(
        inbound=InboundConfig(listen=["127.0.0.1:0"], backend=backend),
        outbound=OutboundConfig(listen=[]),
        domains=[DomainConfig(LOCAL, str(world.local.cert), str(world.local.key)),
                 DomainConfig(OTHER_LOCAL, str(world.other_local.cert), str(world.other_local.key))],
        policy=PolicyConfig(dir=str(policy_dir), ca_file=str(world.dir / "root.pem")),
        limits=LimitsConfig(max_stanza_bytes=max_stanza_bytes, handshake_timeout=handshake_timeout,
                            max_connections=max_connections, max_unauthenticated=max_unauthenticated,
                            idle_timeout=idle_timeout),
    )


@asynccontextmanager
async def running_proxy(config: Config, evidence_for=static_evidence, metrics=None):
    async with trio.open_nursery() as nursery:
        listening: Listening = await nursery.start(
            functools.partial(serve, config, evidence_for=evidence_for, metrics=metrics))
        try:
            yield listening
        finally:
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------ a scripted peer (Python)

class Peer:
    """A remote server driven from the test: plaintext TCP, then our own TLS client side."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.parser = XmlStreamParser()
        self.events: list = []
        self.received = b""
        self.eof = False
        self.last_header = b""

    @classmethod
    async def connect(cls, port: int) -> "Peer":
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, data: bytes | str) -> None:
        await self.stream.send_all(data.encode() if isinstance(data, str) else data)

    async def next_event(self, timeout: float = TIMEOUT):
        with trio.fail_after(timeout):
            while not self.events:
                if self.eof:
                    raise EOFError(f"connection closed; received {self.received!r}")
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    self.eof = True
                    continue
                self.received += data
                self.events += self.parser.feed(data)
        return self.events.pop(0)

    async def expect(self, kind, timeout: float = TIMEOUT):
        event = await self.next_event(timeout)
        assert isinstance(event, kind), (event, self.received)
        return event

    async def until_closed(self, timeout: float = TIMEOUT) -> bytes:
        """Read to EOF; return everything received on this connection."""
        with trio.fail_after(timeout):
            while not self.eof:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    self.eof = True
                self.received += data
                self.events += self.parser.feed(data)
        return self.received

    async def open_stream(self, to: str = LOCAL, *, from_: str | None = PEER, dialback_ns: bool = True,
                          version: str | None = "1.0") -> StreamOpened:
        attrs = f" to='{to}'" + (f" from='{from_}'" if from_ else "") + (f" version='{version}'" if version else "")
        db = " xmlns:db='jabber:server:dialback'" if dialback_ns else ""
        self.last_header = (f"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                            f"xmlns:stream='http://etherx.jabber.org/streams'{db}{attrs}>").encode()
        await self.send(self.last_header)
        return await self.expect(StreamOpened)

    async def starttls(self, identity=None, *, server_name: str | None = LOCAL) -> TlsStream:
        features = await self.expect(Element)
        assert features.is_(NS_STREAMS, "features") and features.find(NS_TLS, "starttls") is not None
        await self.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        proceed = await self.expect(Element)
        assert proceed.is_(NS_TLS, "proceed")
        return await self._tls(identity, server_name)

    async def _tls(self, identity, server_name, alpn=()) -> TlsStream:
        ctx = client_context(cert_file=identity.cert, key_file=identity.key, alpn=alpn) if identity else \
            client_context(alpn=alpn)
        tls = TlsStream(self.stream, ctx, server_side=False, server_hostname=server_name)
        with trio.fail_after(TIMEOUT):
            await tls.do_handshake()
        self.stream = tls
        self.parser = XmlStreamParser()   # RFC 6120 §5.4.3.3: stream restart
        self.events, self.received = [], b""
        return tls

    async def direct_tls(self, identity=None, *, server_name: str | None = LOCAL) -> TlsStream:
        return await self._tls(identity, server_name, alpn=[b"xmpp-server"])

    async def negotiate(self, identity, *, dialback_ns: bool = True) -> tuple[StreamOpened, Element]:
        """Header, STARTTLS, restarted header; returns the backend's header and features."""
        await self.open_stream()
        await self.starttls(identity)
        header = await self.open_stream(dialback_ns=dialback_ns)
        features = await self.expect(Element)
        return header, features

    async def aclose(self) -> None:
        with trio.move_on_after(2):
            await self.stream.aclose()


def stream_error_of(events_or_bytes) -> tuple[str, str]:
    """(condition, text) of the <stream:error> in what a peer received."""
    data = events_or_bytes
    if isinstance(data, (bytes, bytearray)):
        at = bytes(data).find(b"<stream:error")
        assert at >= 0, f"no stream error in {data!r}"
        data = XmlStreamParser().feed(b"<stream:stream xmlns='jabber:server' "
                                      b"xmlns:stream='http://etherx.jabber.org/streams'>" + bytes(data[at:]))
    events = data
    for e in events:
        if isinstance(e, Element) and e.is_(NS_STREAMS, "error"):
            cond = [c.name for c in e.children if c.ns == NS_STREAM_ERRORS and c.name != "text"]
            text = re.search(rb"<text[^>]*>(.*?)</text>", e.raw, re.S)
            return cond[0], (html.unescape(text.group(1).decode()) if text else "")
    raise AssertionError(f"no stream error in {data!r}")


def db_result(sender: str = PEER, target: str = LOCAL, key: str = "k3y") -> bytes:
    return f"<db:result from='{sender}' to='{target}'>{key}</db:result>".encode()


_FORMAT = LogfmtFormatter(timestamps=False)


def log_lines(caplog, event: str | None = None) -> list[str]:
    """The proxy's log records as the operator sees them (logfmt), optionally one event only."""
    lines = [_FORMAT.format(r) for r in caplog.records if r.name.startswith("xmpp_dane_proxy")]
    return [line for line in lines if event is None or f" event={event} " in f" {line} "]


def decisions(caplog) -> list[str]:
    return log_lines(caplog, "decision")


# ================================================================================ tests with s_client

def starttls_client(port: int, *extra: str, host: str = LOCAL) -> list[str]:
    return ["s_client", "-connect", f"127.0.0.1:{port}", "-starttls", "xmpp-server", "-xmpphost", host,
            "-brief", *extra]


RESTART = (f"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' "
           f"xmlns:db='jabber:server:dialback' from='{PEER}' to='{LOCAL}' version='1.0'>")


def test_starttls_with_client_certificate_pkix_accept_and_relay(world, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="xmpp_dane_proxy")
    message = b"<message from='juliet@a.example/balcony' to='romeo@b.example' id='m1'><body>wherefore \xe2\x9c\x93</body></message>"

    async def main():
        async with FakeBackend().running() as backend:
            config = make_config(world, f"127.0.0.1:{backend.port}", tmp_path)
            async with running_proxy(config) as listening:
                port = listening.inbound[0][1]
                async with OpenSSLProcess.run(*starttls_client(port, *client_cert_args(world.peer))) as peer:
                    await peer.wait_for(rb"Peer certificate: CN\s*=\s*b\.example")
                    await peer.send(RESTART.encode())
                    await peer.wait_for(rb"id='backend-stream-1'")
                    await peer.wait_for(rb"</stream:features>")
                    await peer.send(db_result())
                    await peer.wait_for(rb"type='valid'")
                    await peer.send(message)
                    await backend.wait_for(lambda: message in backend.connections[0].received)
                    await peer.send(b"</stream:stream>")
                    await backend.wait_for(lambda: backend.connections[0].closed)
                    await peer.exit_code()
        received = bytes(backend.connections[0].received)
        # The backend got the restarted header, the accepted db:result and the stanza, byte-exact.
        assert received == b"<?xml version='1.0'?>" + RESTART.encode() + db_result() + message + b"</stream:stream>"
        out = peer.output
        # The peer saw the backend's features without <starttls/> and without bidi.
        features = re.search(rb"<stream:features>.*?</stream:features>", out, re.S).group(0)
        assert b"starttls" not in features and b"bidi" not in features and b"mechanisms" not in features
        assert b"<dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>" in features
        (line,) = decisions(caplog)
        assert "event=decision direction=inbound" in line and "domain=a.example verdict=accept prooftype=pkix" in line
        assert re.search(r"peer=127\.0\.0\.1:\d+", line)

    trio.run(main)


def test_direct_tls_with_alpn_sni_and_dane_ee(world, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="xmpp_dane_proxy")
    policy = f'require = "dane"\ntlsa = ["{tlsa_311(world.peer_self.issued.cert)}"]\n'

    async def main():
        async with FakeBackend().running() as backend:
            config = make_config(world, f"127.0.0.1:{backend.port}", tmp_path, policies={PEER: policy})
            async with running_proxy(config) as listening:
                port = listening.inbound[0][1]
                async with OpenSSLProcess.run(
                    "s_client", "-connect", f"127.0.0.1:{port}", "-alpn", "xmpp-server", "-servername", OTHER_LOCAL,
                    "-brief", *client_cert_args(world.peer_self),
                ) as peer:
                    await peer.wait_for(rb"Peer certificate: CN\s*=\s*c\.example")   # SNI chose the certificate
                    await peer.send(RESTART.replace(LOCAL, OTHER_LOCAL).encode())
                    await peer.wait_for(rb"</stream:features>")
                    await peer.send(db_result(target=OTHER_LOCAL))
                    await peer.wait_for(rb"type='valid'")
        assert db_result(target=OTHER_LOCAL) in backend.connections[0].received
        (line,) = decisions(caplog)
        assert "verdict=accept prooftype=dane-ee" in line and f'record="{tlsa_311(world.peer_self.issued.cert)}"' in line
        tls_lines = log_lines(caplog, "tls")
        assert "alpn=xmpp-server" in tls_lines[0] and "direct_tls=True" in tls_lines[0] and "sni=c.example" in tls_lines[0]

    trio.run(main)


def test_starttls_certificate_is_chosen_by_the_stream_to(world, tmp_path):
    async def main():
        async with FakeBackend().running() as backend:
            config = make_config(world, f"127.0.0.1:{backend.port}", tmp_path)
            async with running_proxy(config) as listening:
                port = listening.inbound[0][1]
                for host in (OTHER_LOCAL, LOCAL):
                    async with OpenSSLProcess.run(*starttls_client(port, "-noservername", host=host)) as peer:
                        await peer.wait_for(rb"Peer certificate: CN\s*=\s*" + re.escape(host.encode()) + rb"\b")

    trio.run(main)


def test_tls_1_1_is_refused_and_the_proxy_keeps_serving(world, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="xmpp_dane_proxy")

    async def main():
        async with FakeBackend().running() as backend:
            config = make_config(world, f"127.0.0.1:{backend.port}", tmp_path)
            async with running_proxy(config) as listening:
                port = listening.inbound[0][1]
                async with OpenSSLProcess.run(*starttls_client(port, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")) as old:
                    assert await old.exit_code() != 0
                # The same listener still serves a modern peer.
                async with OpenSSLProcess.run(*starttls_client(port, "-tls1_2")) as modern:
                    await modern.wait_for(rb"Protocol version: TLSv1\.2")
        assert re.search(rb"alert protocol version|unsupported protocol|no protocols available", old.output), old.output
        closed = log_lines(caplog, "stream-closed")
        assert any("unsupported protocol" in line for line in closed), closed
        assert backend.connections == []   # nothing of either stream reached the backend

    trio.run(main)


def test_no_client_certificate_dialback_error_keeps_stream_and_backend_sees_only_the_header(world, tmp_path, caplog):
    """The peer declared jabber:server:dialback: it gets a dialback error (XEP-0220 §2.4),
    the stream stays up, and the backend never sees the db:result or the stanza."""
    caplog.set_level(logging.INFO, logger="xmpp_dane_proxy")

    async def main():
        async with FakeBackend().running() as backend:
            config = make_config(world, f"127.0.0.1:{backend.port}", tmp_path)
            async with running_proxy(config) as listening:
                port = listening.inbound[0][1]
                async with OpenSSLProcess.run(*starttls_client(port)) as peer:
                    await peer.wait_for(rb"CONNECTION ESTABLISHED")
                    await peer.send(RESTART.encode())
                    await peer.wait_for(rb"</stream:features>")
                    await peer.send(db_result())
                    error = (await peer.wait_for(rb"<db:result [^>]*type='error'>.*?</db:result>")).group(0)
                    # Still open: a stanza for the rejected pair is now a stream error.
                    await peer.send(b"<message from='x@a.example' to='y@b.example'><body>spoof</body></message>")
                    await peer.wait_for(rb"invalid-from")
                    await peer.exit_code()
        events = XmlStreamParser().feed(b"<s:stream xmlns='jabber:server' xmlns:s='http://etherx.jabber.org/streams'>" + error)
        result = events[1]
        assert result.attrs == {"from": LOCAL, "to": PEER, "type": "error"}
        err = result.find("jabber:server", "error")  # XEP-0220 §2.4: <error/> in jabber:server
        assert err.attrs["type"] == "cancel" and err.find(NS_STANZA_ERRORS, "not-authorized") is not None
        assert b"a.example not authenticated" in error
        assert bytes(backend.connections[0].received) == b"<?xml version='1.0'?>" + RESTART.encode() + b"</stream:stream>"
        (line,) = decisions(caplog)
        assert "verdict=reject" in line and "domain=a.example" in line

    trio.run(main)


def test_rejected_without_dialback_errors_gets_not_authorized_stream_error(world, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="xmpp_dane_proxy")
    policy = f'require = "dane"\ntlsa = ["{tlsa_311(world.peer_self.issued.cert)}"]\n'
    restart_no_db = RESTART.replace(" xmlns:db='jabber:server:dialback'", "")

    async def main():
        async with FakeBackend().running() as backend:
            config = make_config(world, f"127.0.0.1:{backend.port}", tmp_path, policies={PEER: policy})
            async with running_proxy(config) as listening:
                port = listening.inbound[0][1]
                async with OpenSSLProcess.run(*starttls_client(port, *client_cert_args(world.stranger))) as peer:
                    await peer.wait_for(rb"CONNECTION ESTABLISHED")
                    await peer.send(restart_no_db.encode())
                    await peer.wait_for(rb"</stream:features>")
                    await peer.send(b"<db:result xmlns:db='jabber:server:dialback' from='a.example' to='b.example'>k</db:result>")
                    await peer.wait_for(rb"</stream:stream>")
                    await peer.exit_code()
        condition, text = stream_error_of(peer.output)
        assert condition == "not-authorized" and "a.example not authenticated" in text and "no fallback" in text
        assert bytes(backend.connections[0].received) == b"<?xml version='1.0'?>" + restart_no_db.encode() + b"</stream:stream>"
        (line,) = decisions(caplog)
        assert "verdict=reject" in line

    trio.run(main)


def test_policy_tls_min_version_1_3_rejects_a_tls_1_2_peer(world, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="xmpp_dane_proxy")

    backend = trio.run(_dialback_refused, world, tmp_path, 'require = "pkix"\ntls_min_version = "1.3"\n',
                       ["-tls1_2", *client_cert_args(world.peer)], rb"Protocol version: TLSv1\.2")
    (line,) = decisions(caplog)
    assert "verdict=reject" in line and "TLS 1.2 negotiated but policy requires TLS >= 1.3" in line
    assert db_result() not in backend.connections[0].received


async def _dialback_refused(world, tmp_path, policy: str, client_args: list, established: bytes) -> "FakeBackend":
    """A peer with these `openssl s_client` arguments asserts PEER by dialback, under `policy`
    for PEER, and gets the error answer; the backend it was refused in front of."""
    async with FakeBackend().running() as backend:
        config = make_config(world, f"127.0.0.1:{backend.port}", tmp_path, policies={PEER: policy})
        async with running_proxy(config) as listening:
            port = listening.inbound[0][1]
            async with OpenSSLProcess.run(*starttls_client(port, *client_args)) as peer:
                await peer.wait_for(established)
                await peer.send(RESTART.encode())
                await peer.wait_for(rb"</stream:features>")
                await peer.send(db_result())
                await peer.wait_for(rb"type='error'")
    return backend


def test_a_client_certificate_openssl_takes_but_cryptography_cannot_read_is_rejected_with_why(world, tmp_path, caplog):
    # X.509 has versions 1-3 (RFC 5280 §4.1.2.1); OpenSSL still parses a "v4" certificate,
    # `cryptography` refuses it.  The verdict must be a reject naming the certificate, not
    # an internal error, and nothing the peer sends after may reach the backend.
    caplog.set_level(logging.INFO, logger="xmpp_dane_proxy")
    der = world.peer_self.issued.cert.public_bytes(serialization.Encoding.DER)
    v3 = bytes.fromhex("a003020102")            # [0] EXPLICIT INTEGER 2, i.e. version 3
    assert der.count(v3) == 1
    v4 = der.replace(v3, bytes.fromhex("a003020103"))
    leaf = tmp_path / "v4.pem"
    leaf.write_bytes(b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(v4) + b"-----END CERTIFICATE-----\n")
    tlsa = tlsa_311(world.peer_self.issued.cert)   # the key is unchanged: DANE would match

    backend = trio.run(_dialback_refused, world, tmp_path, f'require = "dane"\ntlsa = ["{tlsa}"]\n',
                       ["-cert", leaf, "-key", world.peer_self.key], rb"CONNECTION ESTABLISHED")
    (line,) = decisions(caplog)
    assert "verdict=reject" in line
    assert "the certificate at depth 0 cannot be read: 3 is not a valid X509 version" in line
    assert db_result() not in backend.connections[0].received
    assert "internal-error" not in caplog.text


def test_real_dns_evidence_dane_ee_accepts_and_bogus_rejects(world, tmp_path, dns_env, caplog):
    """No injected evidence: the production path (policy.peer_evidence.gather through the
    configured resolver) with nsd + a validating unbound on loopback."""
    caplog.set_level(logging.INFO, logger="xmpp_dane_proxy")
    good, bad = dns_env.fresh("secure.test"), dns_env.fresh("bogus.test")
    good_id = write_identity(self_signed([good]), tmp_path, "good")
    bad_id = write_identity(self_signed([bad]), tmp_path, "bad")
    dns_env.publish_xmpp(good, f"xmpp.{good}", 5269, "127.0.0.1", good_id.issued.cert)
    dns_env.publish_xmpp(bad, f"xmpp.{bad}", 5269, "127.0.0.1", bad_id.issued.cert)

    async def attempt(port: int, domain: str, identity) -> Element:
        peer = await Peer.connect(port)
        await peer.open_stream(from_=domain)
        await peer.starttls(identity)
        await peer.open_stream(from_=domain)
        await peer.expect(Element)                       # features
        await peer.send(db_result(sender=domain))
        answer = await peer.expect(Element)
        await peer.aclose()
        return answer

    async def main():
        async with FakeBackend().running() as backend:
            config = dataclasses.replace(
                make_config(world, f"127.0.0.1:{backend.port}", tmp_path),
                dns=DnsConfig(nameservers=[dns_env.resolver_address], timeout=3.0))
            async with running_proxy(config, evidence_for=None) as listening:
                port = listening.inbound[0][1]
                accepted = await attempt(port, good, good_id)
                rejected = await attempt(port, bad, bad_id)
        assert accepted.attrs.get("type") == "valid"
        assert rejected.attrs.get("type") == "error" and b"DNSSEC evidence failed" in rejected.raw
        lines = decisions(caplog)
        assert f"domain={good} verdict=accept prooftype=dane-ee" in lines[0]
        assert f"domain={bad} verdict=reject" in lines[1] and "bogus" in lines[1]

    trio.run(main)
