"""Outbound proxy (DESIGN §3.2): backend → proxy → peer, against real DNSSEC and real TLS.

The peers here are raw stand-ins (`StandInPeer`): trio TLS servers built with proxy/tls.py
on 127.0.0.x loopback addresses that speak just enough XMPP (STARTTLS or Direct TLS, a
stream header, features, a dialback answer) and record every byte they receive after the
TLS handshake — which is how "not a byte of the backend's stream reaches a rejected peer" is
asserted.  The backend is a raw-XML stand-in too (tests/xmppclient.XmppStream), so the exact
stream error the proxy sends is visible.  DNS is tests/dnsenv.py (nsd + validating unbound:
secure, insecure and bogus zones).  Prosody on both ends is in test_outbound_prosody.py.

The sans-IO pieces (`StartTlsNegotiation`, address ordering) are tested in memory first;
`OutboundSession` in tests/test_outbound_session.py.

`StandInPeer`, `proxy_running` and `backend_stream` are imported by test_check.py and
test_outbound_prosody.py.
"""
from __future__ import annotations

import base64
import contextlib
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from OpenSSL import SSL

from pki import TestCA, self_signed
from policy.pkix import TrustStore
from policy.policyfile import PolicySet
from proxy.connect import (
    NegotiationError, StartTlsNegotiation, TlsContexts, describe_stream_error, open_tcp, order_addresses,
)
from proxy.logsetup import DECISION_LOGGER, LogfmtFormatter
from proxy.outbound import OutboundContext, OutboundProxy
from proxy.s2s_auth import element_text
from proxy.tls import TlsStream, server_context
from proxy.xmlstream import Element, XmlStreamParser
from xmppclient import NS_DIALBACK, NS_SERVER, XmppError, XmppStream, stream_header

NS_STREAMS = "http://etherx.jabber.org/streams"
NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
LOCAL = "home.example"          # the backend's domain (no DNS needed: the proxy dials out)
TIMEOUT = 10.0

_addr_counter = iter(range(10, 250))


def fresh_loopback() -> str:
    """A 127.0.0.x address no other stand-in of this test run listens on."""
    return f"127.0.0.{next(_addr_counter)}"


# =============================================================================== stand-ins


@dataclass
class PeerConnectionRecord:
    """What one connection to a stand-in peer carried."""

    pre_tls: bytearray = field(default_factory=bytearray)     # plaintext before TLS
    post_tls: bytearray = field(default_factory=bytearray)    # application data after the handshake
    handshake_done: bool = False
    sni: str | None = None
    alpn: str | None = None
    client_chain: list = field(default_factory=list)
    ended: trio.Event = field(default_factory=trio.Event)


class StandInPeer:
    """A peer XMPP server for one domain: STARTTLS (optionally not offering it) or Direct TLS
    on its own loopback address.  After TLS it answers the (relayed) stream header with its
    own header and features (offering STARTTLS again and bidi, to see them stripped), answers
    `<db:result>` with type='valid', echoes nothing else, and closes when the stream closes.
    Every connection is recorded in `connections`.

    `verify_key(from, key, stream id)`: judge a dialback key as the authoritative server of
    `from` would (valid only if it says so).  `external`: offer SASL EXTERNAL and answer
    `<auth/>` with "success" (then the stream restarts, RFC 6120 §6.4.6) or "failure".
    """

    def __init__(self, domain: str, issued, tmp: Path, *, direct_tls: bool = False,
                 offer_starttls: bool = True, max_tls: int | None = None, address: str | None = None,
                 verify_key=None, external: str | None = None) -> None:
        self.domain = domain
        self.direct_tls = direct_tls
        self.offer_starttls = offer_starttls
        self.verify_key = verify_key
        self.external = external
        self.auths: list[bytes] = []
        self.address = address or fresh_loopback()
        name = f"peer-{self.address}"
        cert, key = issued.write(tmp, name)
        self.ctx = server_context(cert, key)
        if max_tls is not None:
            self.ctx.set_max_proto_version(max_tls)
        self.port = 0
        self.connections: list[PeerConnectionRecord] = []
        self.received_stanzas: list[Element] = []

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.address)
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._handle, listeners, task_status=task_status)

    async def _handle(self, tcp: trio.SocketStream) -> None:
        rec = PeerConnectionRecord()
        self.connections.append(rec)
        try:
            with trio.move_on_after(TIMEOUT):
                await self._conversation(tcp, rec)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            rec.ended.set()
            await trio.aclose_forcefully(tcp)

    async def _conversation(self, tcp: trio.SocketStream, rec: PeerConnectionRecord) -> None:
        prefix = b""
        if not self.direct_tls:
            parser = XmlStreamParser(stop_after=lambda el: el.is_(NS_TLS, "starttls"))
            while parser.state == "open":
                data = await tcp.receive_some(65536)
                if not data:
                    return
                rec.pre_tls += data
                for event in parser.feed(data):
                    if getattr(event, "raw", b"").startswith(b"<stream:stream"):
                        offer = f"<starttls xmlns='{NS_TLS}'><required/></starttls>" if self.offer_starttls else ""
                        await tcp.send_all(
                            stream_header(ns=NS_SERVER, dialback=True, from_=self.domain, id="pre-tls")
                            + f"<stream:features>{offer}<dialback xmlns='urn:xmpp:features:dialback'/>"
                              f"</stream:features>".encode())
            await tcp.send_all(f"<proceed xmlns='{NS_TLS}'/>".encode())
            prefix = parser.trailing
        tls = TlsStream(tcp, self.ctx, server_side=True, prefix=prefix)
        await tls.do_handshake()
        rec.handshake_done = True
        rec.sni, rec.alpn = tls.server_name, tls.alpn
        rec.client_chain = tls.peer_chain()
        def restarts(el) -> bool:
            return el.is_(NS_SASL, "auth") and self.external == "success"

        parser = XmlStreamParser(stop_after=restarts)
        streams = 0
        while True:
            data = await tls.receive_some(65536)
            if not data:
                return
            rec.post_tls += data
            events = parser.feed(data)
            if parser.state == "stopped":   # after <auth/>: the next header is a new stream
                trailing = parser.trailing
                parser = XmlStreamParser(stop_after=restarts)
                if trailing:
                    events += parser.feed(trailing)
            for event in events:
                raw = getattr(event, "raw", None)
                if raw is not None and raw.startswith(b"<stream:stream"):
                    streams += 1
                    mechanisms = (f"<mechanisms xmlns='{NS_SASL}'><mechanism>EXTERNAL</mechanism></mechanisms>"
                                  if self.external and streams == 1 else "")
                    await tls.send_all(
                        stream_header(ns=NS_SERVER, dialback=True, from_=self.domain, id=f"peer-stream-{streams}")
                        + f"<stream:features><starttls xmlns='{NS_TLS}'/>{mechanisms}"
                          f"<bidi xmlns='urn:xmpp:features:bidi'/>"
                          f"<dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>"
                          f"</stream:features>".encode())
                elif isinstance(event, Element):
                    self.received_stanzas.append(event)
                    if event.is_(NS_SASL, "auth"):
                        self.auths.append(event.raw)
                        await tls.send_all(f"<{self.external} xmlns='{NS_SASL}'/>".encode())
                    elif event.is_(NS_DIALBACK, "result"):
                        frm = event.attrs.get("from")
                        ok = self.verify_key is None or self.verify_key(frm, element_text(event),
                                                                        f"peer-stream-{streams}")
                        await tls.send_all(f"<db:result from='{self.domain}' to='{frm}' "
                                           f"type='{'valid' if ok else 'invalid'}'/>".encode())
                elif type(event).__name__ == "StreamClosed":
                    await tls.send_all(b"</stream:stream>")
                    await tls.aclose()
                    return

    def ended_connections(self) -> list[PeerConnectionRecord]:
        return [c for c in self.connections if c.ended.is_set()]


@contextlib.asynccontextmanager
async def proxy_running(context: OutboundContext):
    """An OutboundProxy listening on 127.0.0.1:<free port>; yields (proxy, port)."""
    proxy = OutboundProxy(context=context)
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, proxy, listeners)
        try:
            yield proxy, port
        finally:
            nursery.cancel_scope.cancel()


async def backend_stream(port: int, peer_domain: str, local: str = LOCAL, transcript=None) -> XmppStream:
    """A raw backend: connects to the proxy and opens a stream from `local` to `peer_domain`."""
    xs = await XmppStream.connect("127.0.0.1", port, label="backend", transcript=transcript)
    await xs.send(stream_header(ns=NS_SERVER, dialback=True, from_=local, to=peer_domain))
    return xs


def make_context(dns_env, tmp: Path, *, policies: dict[str, str] | None = None, ca_file: Path | None = None,
                 local_cert=None, local: str = LOCAL, timeout: float = 5.0) -> OutboundContext:
    """OutboundContext against the test resolver; `policies` = {file name: TOML text};
    `local` is the backend's domain, presenting `local_cert` (default: a fresh one)."""
    policy_dir = tmp / "policy.d"
    policy_dir.mkdir(exist_ok=True)
    for name, text in (policies or {}).items():
        (policy_dir / name).write_text(text)
    local_cert = local_cert or TestCA("Home CA").issue([local], xmpp=[local])
    cert, key = local_cert.write(tmp, "local")
    return OutboundContext(
        resolver=dns_env.resolver(), policies=PolicySet.load(policy_dir),
        trust=TrustStore.load(str(ca_file) if ca_file else None),
        contexts=TlsContexts({local: (cert, key)}), handshake_timeout=timeout, close_timeout=2.0,
    )


class DecisionLog:
    """Captures the decision logger's lines, formatted as in production (logfmt)."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()
        self.handler = logging.StreamHandler(self.buffer)
        self.handler.setFormatter(LogfmtFormatter(timestamps=False))
        self.logger = logging.getLogger(DECISION_LOGGER)

    def __enter__(self) -> "DecisionLog":
        self.logger.addHandler(self.handler)
        self._level = self.logger.level
        self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self._level)

    @property
    def lines(self) -> list[str]:
        return [l for l in self.buffer.getvalue().splitlines() if "event=decision" in l]


async def ask_for_peer(xs: XmppStream, peer_domain: str, local: str = LOCAL) -> None:
    """The backend's side of a stream the proxy answers itself (DESIGN §3.3): its header and
    dialback feature (no connection to the peer yet), then a `<db:result>` -- the question that
    makes the proxy connect to the peer."""
    header = await xs.expect_header()
    assert (header.get("from"), header.get("to")) == (peer_domain, local)
    features = await xs.expect_stanza()
    assert features.tag == f"{{{NS_STREAMS}}}features" and b"urn:xmpp:features:dialback" in features.raw
    await xs.send(f"<db:result from='{local}' to='{peer_domain}'>k3y</db:result>")


async def expect_stream_error(xs: XmppStream, condition: str, *, header: bool = True) -> str:
    """Read the proxy's answer: a header (unless already read), then `<stream:error>` with
    `condition`; its text."""
    if header:
        await xs.expect_header()
    with pytest.raises(XmppError) as info:
        await xs.expect_stanza()
    raw = str(info.value)
    assert f"<{condition} " in raw, raw
    m = re.search(r"<text[^>]*>(.*?)</text>", raw, re.S)
    assert m, raw
    return m.group(1)


# =============================================================================== sans-IO


def test_addresses_ordered_ipv6_first_families_alternating():
    assert order_addresses(["127.0.0.2", "127.0.0.3", "::1", "not-an-ip"]) == ["::1", "127.0.0.2", "127.0.0.3"]
    assert order_addresses([]) == []


def test_starttls_is_sent_even_when_not_offered():
    n = StartTlsNegotiation(domain="peer.test", local_domain=LOCAL)
    assert b"to='peer.test'" in n.opening() and f"from='{LOCAL}'".encode() in n.opening()
    reply = n.receive(stream_header(ns=NS_SERVER, dialback=True, id="x")
                      + b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'/></stream:features>")
    assert reply == f"<starttls xmlns='{NS_TLS}'/>".encode()
    assert n.starttls_offered is False and not n.done
    n.receive(f"<proceed xmlns='{NS_TLS}'/>".encode())
    assert n.done


def test_starttls_failure_and_stream_errors_are_reasons():
    n = StartTlsNegotiation(domain="peer.test", local_domain=LOCAL)
    n.receive(stream_header(ns=NS_SERVER, id="x") + b"<stream:features/>")
    with pytest.raises(NegotiationError, match="with <failure/> .it does not offer STARTTLS"):
        n.receive(f"<failure xmlns='{NS_TLS}'/>".encode())
    n = StartTlsNegotiation(domain="peer.test", local_domain=LOCAL)
    with pytest.raises(NegotiationError, match="stream error before TLS: host-unknown: no such host"):
        n.receive(stream_header(ns=NS_SERVER, id="x") + b"<stream:error><host-unknown xmlns="
                  b"'urn:ietf:params:xml:ns:xmpp-streams'/><text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>"
                  b"no such host</text></stream:error>")
    n = StartTlsNegotiation(domain="peer.test", local_domain=LOCAL)
    with pytest.raises(NegotiationError, match="data after <proceed/>"):
        n.receive(stream_header(ns=NS_SERVER, id="x") + b"<stream:features/>"
                  + f"<proceed xmlns='{NS_TLS}'/>".encode() + b"\x16\x03\x01")


# The session itself (answering the backend, authenticating to the peer) is tested in memory in
# tests/test_outbound_session.py.


def test_describe_stream_error_reads_condition_and_text():
    p = XmlStreamParser()
    p.feed(stream_header(ns=NS_SERVER, id="x"))
    (el,) = p.feed(b"<stream:error><policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
                   b"<text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>a &amp; b</text></stream:error>")
    assert describe_stream_error(el) == "policy-violation: a & b"


# =============================================================================== happy eyeballs


def test_happy_eyeballs_skips_a_dead_address():
    async def main():
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.3")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, lambda s: s.aclose(), listeners)
            # 127.0.0.2 has nothing on that port: refused at once, the next address wins.
            stream, ip = await open_tcp(["127.0.0.2", "127.0.0.3"], port)
            assert ip == "127.0.0.3"
            await stream.aclose()
            with pytest.raises(Exception, match="127.0.0.2:.*refused"):
                await open_tcp(["127.0.0.2"], port)
            nursery.cancel_scope.cancel()

    trio.run(main)


# =============================================================================== end to end


CA = TestCA("Peer Root CA")
INTERMEDIATE = CA.intermediate("Peer Issuing CA")


def _publish(dns_env, peer: StandInPeer, *usages: str, target: str | None = "xmpp", tlsa_cert=None,
             zone=None, **kw) -> None:
    host = f"{target}.{peer.domain}" if target else None
    cert = tlsa_cert if tlsa_cert is not None else peer_cert_of(peer)
    dns_env.publish_xmpp(peer.domain, host, peer.port, peer.address, cert, *usages, direct_tls=peer.direct_tls, **kw)


_issued: dict[str, object] = {}


def peer_cert_of(peer: StandInPeer):
    return _issued[peer.domain].cert


def issue_peer(domain: str, ca: TestCA = INTERMEDIATE):
    issued = ca.issue([domain], xmpp=[domain])
    _issued[domain] = issued
    return issued


async def _deliver_through(port: int, peer: StandInPeer, transcript: list) -> None:
    """Backend side of a good stream: header, dialback, a message, close."""
    xs = await backend_stream(port, peer.domain, transcript=transcript)
    connections = len(peer.connections)
    header = await xs.expect_header()
    # The proxy answers the backend's stream itself (DESIGN §3.3): its own id, its own
    # features (dialback only), and no connection to the peer until a question needs one.
    assert header.get("id") not in (None, "", "pre-tls", "peer-stream-1") and header.get("from") == peer.domain
    features = await xs.expect_stanza()
    assert b"starttls" not in features.raw and b"bidi" not in features.raw and b"mechanisms" not in features.raw
    assert b"urn:xmpp:features:dialback" in features.raw
    assert len(peer.connections) == connections
    await xs.send(f"<db:result from='{LOCAL}' to='{peer.domain}'>k3y</db:result>")
    result = await xs.expect_stanza()
    assert (result.tag, result.get("type")) == (f"{{{NS_DIALBACK}}}result", "valid")
    await xs.send(f"<message from='a@{LOCAL}' to='b@{peer.domain}' type='chat'><body>over the proxy</body></message>")
    await xs.send(b"</stream:stream>")
    with trio.fail_after(TIMEOUT):
        while not xs.eof:
            try:
                await xs.next_event()
            except XmppError:
                break
    await xs.aclose(close_stream=False)


def test_starttls_peer_with_matching_dane_ee_gets_the_backend_stream(dns_env, tmp_path):
    domain = dns_env.fresh(dns_env.secure, "ee")
    peer = StandInPeer(domain, issue_peer(domain), tmp_path)
    transcript: list = []

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(peer.serve)
            _publish(dns_env, peer, "3 1 1")
            with DecisionLog() as decisions:
                async with proxy_running(make_context(dns_env, tmp_path)) as (_, port):
                    await _deliver_through(port, peer, transcript)
                    with trio.fail_after(TIMEOUT):
                        await peer.connections[0].ended.wait()
            nursery.cancel_scope.cancel()
        return decisions.lines

    lines = trio.run(main)
    (rec,) = peer.connections
    # Before TLS: only our own header and <starttls/>.  After: the backend's header first.
    assert b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>" in rec.pre_tls
    assert b"k3y" not in rec.pre_tls and b"over the proxy" not in rec.pre_tls
    # After TLS: the proxy's own stream from L, its own dialback key (the stand-in offers no
    # EXTERNAL) -- the backend's key never leaves the proxy -- then the backend's stanza.
    assert rec.post_tls.startswith(b"<?xml") and f"from='{LOCAL}'".encode() in rec.post_tls
    assert b"k3y" not in rec.post_tls
    (db,) = [e for e in peer.received_stanzas if e.is_(NS_DIALBACK, "result")]
    assert db.attrs["from"] == LOCAL and len(element_text(db)) == 64
    assert b"over the proxy" in rec.post_tls and rec.post_tls.endswith(b"</stream:stream>")
    assert rec.sni == domain and rec.alpn is None
    # Our client certificate is the local domain's.
    assert rec.client_chain and LOCAL in str(rec.client_chain[0].subject)
    (line,) = lines
    assert line.startswith("level=info logger=xmpp_dane_proxy.decision event=decision direction=outbound "
                           f"peer={peer.address}:{peer.port} domain={domain} verdict=accept prooftype=dane-ee record=\"3 1 1 ")
    assert 'reason="' in line and f"target=xmpp.{domain}:{peer.port}" in line and "mode=starttls" in line


def test_direct_tls_peer_gets_alpn_and_sni_and_dane_ta(dns_env, tmp_path):
    domain = dns_env.fresh(dns_env.secure, "dta")
    peer = StandInPeer(domain, issue_peer(domain), tmp_path, direct_tls=True)

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(peer.serve)
            _publish(dns_env, peer, "2 0 1", tlsa_cert=INTERMEDIATE.cert)
            with DecisionLog() as decisions:
                async with proxy_running(make_context(dns_env, tmp_path)) as (_, port):
                    await _deliver_through(port, peer, [])
            nursery.cancel_scope.cancel()
        return decisions.lines

    lines = trio.run(main)
    (rec,) = peer.connections
    assert rec.pre_tls == b"" and rec.sni == domain and rec.alpn == "xmpp-server"
    assert rec.post_tls.startswith(b"<?xml") and b"k3y" not in rec.post_tls
    assert "verdict=accept prooftype=dane-ta" in lines[0] and "mode=direct-tls" in lines[0]


@pytest.mark.parametrize("external", ["success", "failure"])
def test_peer_offering_external_gets_it_with_the_local_certificate(dns_env, tmp_path, external):
    # DESIGN §3.3: EXTERNAL for the stream's `from` (the certificate the proxy presented);
    # success restarts the stream, failure falls back to the proxy's own dialback key.
    domain = dns_env.fresh(dns_env.secure, "ext")
    peer = StandInPeer(domain, issue_peer(domain), tmp_path, external=external)

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(peer.serve)
            _publish(dns_env, peer, "3 1 1")
            async with proxy_running(make_context(dns_env, tmp_path)) as (_, port):
                await _deliver_through(port, peer, [])
            nursery.cancel_scope.cancel()

    trio.run(main)
    (rec,) = peer.connections
    (auth,) = peer.auths
    assert b"mechanism='EXTERNAL'" in auth and base64.b64encode(LOCAL.encode()) in auth
    dialback = [e for e in peer.received_stanzas if e.is_(NS_DIALBACK, "result")]
    if external == "success":
        assert rec.post_tls.count(b"<stream:stream") == 2 and dialback == []
    else:
        assert rec.post_tls.count(b"<stream:stream") == 1 and len(dialback) == 1
    assert b"k3y" not in rec.post_tls and b"over the proxy" in rec.post_tls


@pytest.mark.parametrize("keys_of", ["this-proxy", "another-proxy"])
def test_dialback_fallback_key_is_the_one_the_proxys_inbound_side_recognises(dns_env, tmp_path, keys_of):
    """The peer checks the proxy's dialback key as L's authoritative server would -- the
    proxy's inbound side, with the proxy's DialbackKeys (XEP-0185: receiving = D, originating =
    L, D's stream id).  A key checked against another secret is refused: the backend gets
    `not-authorized` with the peer's answer, and its stanza never reaches the peer."""
    from proxy.dialback_keys import DialbackKeys

    domain = dns_env.fresh(dns_env.secure, "dbk")
    context = make_context(dns_env, tmp_path)
    authority = context.dialback_keys if keys_of == "this-proxy" else DialbackKeys()
    peer = StandInPeer(domain, issue_peer(domain), tmp_path, verify_key=lambda frm, key, stream_id: authority.is_ours(
        receiving=domain, originating=frm, stream_id=stream_id, key=key))

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(peer.serve)
            _publish(dns_env, peer, "3 1 1")
            async with proxy_running(context) as (_, port):
                if keys_of == "this-proxy":
                    await _deliver_through(port, peer, [])
                    text = None
                else:
                    xs = await backend_stream(port, domain)
                    await ask_for_peer(xs, domain)
                    text = await expect_stream_error(xs, "not-authorized", header=False)
                    await xs.aclose()
                with trio.fail_after(TIMEOUT):
                    await peer.connections[0].ended.wait()
            nursery.cancel_scope.cancel()
        return text

    text = trio.run(main)
    (rec,) = peer.connections
    if keys_of == "this-proxy":
        assert b"over the proxy" in rec.post_tls
    else:
        assert f"{domain} answered &lt;db:result type='invalid'&gt; for {LOCAL}" in text or \
            f"{domain} answered <db:result type='invalid'> for {LOCAL}" in text, text
        assert rec.post_tls.endswith(b"</stream:stream>") and b"<message" not in rec.post_tls


@pytest.mark.parametrize("case", ["mismatch", "bogus-tlsa", "block", "tls-too-old"])
def test_rejected_peer_gets_nothing_and_backend_gets_the_reason(dns_env, tmp_path, case):
    domain = dns_env.fresh(dns_env.secure, case.split("-")[0])
    peer = StandInPeer(domain, issue_peer(domain), tmp_path,
                       max_tls=SSL.TLS1_2_VERSION if case == "tls-too-old" else None)
    policies = {}
    if case == "block":
        policies[f"{domain}.toml"] = 'require = "block"\n'
    if case == "tls-too-old":
        policies[f"{domain}.toml"] = 'tls_min_version = "1.3"\n'

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(peer.serve)
            if case == "mismatch":
                _publish(dns_env, peer, "3 1 1", tlsa_cert=self_signed([domain]).cert)
            else:
                _publish(dns_env, peer, "3 1 1")
            if case == "bogus-tlsa":
                dns_env.publish(None, f"_{peer.port}._tcp.xmpp.{domain}", "TLSA",
                                f"3 1 1 {'ab' * 32}", broken_signature=True)
            with DecisionLog() as decisions:
                async with proxy_running(make_context(dns_env, tmp_path, policies=policies)) as (_, port):
                    xs = await backend_stream(port, domain)
                    await ask_for_peer(xs, domain)
                    text = await expect_stream_error(xs, "remote-connection-failed", header=False)
                    await xs.aclose()
                    if peer.connections:
                        with trio.fail_after(TIMEOUT):
                            await peer.connections[0].ended.wait()
            nursery.cancel_scope.cancel()
        return text, decisions.lines

    text, lines = trio.run(main)
    # Not a byte of the backend's stream reached the peer after the handshake.
    for rec in peer.connections:
        assert rec.post_tls == b"", rec.post_tls
        assert b"k3y" not in rec.pre_tls
    assert text.startswith(f"no server of {domain} was accepted" if case != "block" else f"{domain} is blocked")
    expected = {
        "mismatch": ("no usable TLSA record matches", "no fallback to PKIX"),
        "bogus-tlsa": ("is bogus", "failing closed"),
        "block": ("blocked by policy",),
        "tls-too-old": ("TLS handshake failed",),
    }[case]
    for part in expected:
        assert part in text, text
    if case in ("bogus-tlsa", "block"):
        assert peer.connections == []       # refused without connecting at all
    if case == "mismatch":
        assert peer.connections[0].handshake_done
    if case == "tls-too-old":
        assert lines == []                  # no verdict without a handshake
    else:
        (line,) = lines
        assert "verdict=reject prooftype=- record=-" in line and f"domain={domain}" in line


def test_second_target_used_when_first_is_rejected(dns_env, tmp_path):
    domain = dns_env.fresh(dns_env.secure, "two")
    good_cert = issue_peer(domain)
    impostor = StandInPeer(domain, self_signed([domain]), tmp_path)
    good = StandInPeer(domain, good_cert, tmp_path, direct_tls=True)

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(impostor.serve)
            await nursery.start(good.serve)
            with dns_env.batch():
                # Priority 0: the impostor (its key is not the TLSA's); priority 10: the real one.
                dns_env.publish_xmpp(domain, f"a.{domain}", impostor.port, impostor.address, None, priority=0)
                dns_env.publish_xmpp(domain, f"b.{domain}", good.port, good.address, None, priority=10,
                                     direct_tls=True)
                for host, port in ((f"a.{domain}", impostor.port), (f"b.{domain}", good.port)):
                    dns_env.publish(None, f"_{port}._tcp.{host}", "TLSA", str(_tlsa(good_cert.cert)))
            with DecisionLog() as decisions:
                async with proxy_running(make_context(dns_env, tmp_path)) as (_, port):
                    await _deliver_through(port, good, [])
                    with trio.fail_after(TIMEOUT):
                        await impostor.connections[0].ended.wait()
            nursery.cancel_scope.cancel()
        return decisions.lines

    lines = trio.run(main)
    assert impostor.connections[0].handshake_done and impostor.connections[0].post_tls == b""
    assert b"over the proxy" in good.connections[0].post_tls
    assert [("verdict=reject" in l, f"target=a.{domain}" in l) for l in lines][0] == (True, True)
    assert "verdict=accept" in lines[1] and f"target=b.{domain}" in lines[1]


def _tlsa(cert):
    from policy.tlsa import record_for
    return record_for(cert, 3, 1, 1)


def test_pkix_accepts_with_insecure_srv_and_no_tlsa(dns_env, tmp_path):
    domain = dns_env.fresh(dns_env.insecure, "pkix")
    peer = StandInPeer(domain, issue_peer(domain), tmp_path)
    ca_file = CA.write_root(tmp_path / "root.pem")

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(peer.serve)
            dns_env.publish_xmpp(domain, f"xmpp.{domain}", peer.port, peer.address, None)
            with DecisionLog() as decisions:
                async with proxy_running(make_context(dns_env, tmp_path, ca_file=ca_file)) as (_, port):
                    await _deliver_through(port, peer, [])
                # Without the test root the same peer is refused (PKIX cannot validate).
                async with proxy_running(make_context(dns_env, tmp_path)) as (_, port):
                    xs = await backend_stream(port, domain)
                    await ask_for_peer(xs, domain)
                    text = await expect_stream_error(xs, "remote-connection-failed", header=False)
                    await xs.aclose()
            nursery.cancel_scope.cancel()
        return decisions.lines, text

    lines, text = trio.run(main)
    assert "verdict=accept prooftype=pkix" in lines[0]
    assert "verdict=reject" in lines[1] and "PKIX" in text
    assert peer.connections[1].post_tls == b""


def test_unreachable_targets_are_named_in_the_error(dns_env, tmp_path):
    domain = dns_env.fresh(dns_env.secure, "down")
    dead = fresh_loopback()

    async def main():
        with dns_env.batch():
            dns_env.publish_xmpp(domain, f"x.{domain}", 9, dead, None)
            dns_env.publish_xmpp(domain, f"y.{domain}", 9, dead, None, priority=5, direct_tls=True)
        async with proxy_running(make_context(dns_env, tmp_path)) as (_, port):
            xs = await backend_stream(port, domain)
            await ask_for_peer(xs, domain)
            text = await expect_stream_error(xs, "remote-connection-failed", header=False)
            await xs.aclose()
        return text

    text = trio.run(main)
    assert f"x.{domain}:9 (starttls): failed: cannot connect: {dead}:9: Connection refused" in text
    assert f"y.{domain}:9 (direct-tls): failed: cannot connect" in text


def test_bogus_srv_fails_closed(dns_env, tmp_path):
    domain = dns_env.fresh(dns_env.bogus, "srv")

    async def main():
        with DecisionLog() as decisions:
            async with proxy_running(make_context(dns_env, tmp_path)) as (_, port):
                xs = await backend_stream(port, domain)
                await ask_for_peer(xs, domain)
                text = await expect_stream_error(xs, "remote-connection-failed", header=False)
                await xs.aclose()
        return text, decisions.lines

    text, lines = trio.run(main)
    assert "DNSSEC evidence failed" in text and "bogus" in text
    assert "verdict=reject" in lines[0] and "peer=-" in lines[0]


def test_unknown_local_domain_is_host_unknown(dns_env, tmp_path):
    async def main():
        async with proxy_running(make_context(dns_env, tmp_path)) as (_, port):
            xs = await backend_stream(port, "peer.secure.test", local="stranger.example")
            text = await expect_stream_error(xs, "host-unknown")
            await xs.aclose()
        return text

    assert "stranger.example is not a [[domain]] of this proxy" in trio.run(main)


def test_domain_without_service_is_refused_without_connecting(dns_env, tmp_path):
    domain = dns_env.fresh(dns_env.secure, "nosrv")
    dns_env.publish(None, f"_xmpp-server._tcp.{domain}", "SRV", "0 0 0 .")

    async def main():
        with DecisionLog() as decisions:
            async with proxy_running(make_context(dns_env, tmp_path)) as (_, port):
                xs = await backend_stream(port, domain)
                await ask_for_peer(xs, domain)
                text = await expect_stream_error(xs, "remote-connection-failed", header=False)
                await xs.aclose()
        return text, decisions.lines

    text, lines = trio.run(main)
    assert text == f"{domain}: it publishes no XMPP server-to-server service (SRV target '.')"
    assert "verdict=reject" in lines[0] and "peer=-" in lines[0]


def test_proxy_shutdown_ends_a_relayed_stream(dns_env, tmp_path):
    domain = dns_env.fresh(dns_env.secure, "stop")
    peer = StandInPeer(domain, issue_peer(domain), tmp_path)

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(peer.serve)
            _publish(dns_env, peer, "3 1 1")
            async with proxy_running(make_context(dns_env, tmp_path)) as (proxy, port):
                xs = await backend_stream(port, domain)
                await ask_for_peer(xs, domain)
                assert (await xs.expect_stanza()).get("type") == "valid"     # the peer is connected
                proxy.shutdown()
                text = None
                with pytest.raises(XmppError) as info:
                    await xs.expect_stanza()
                text = str(info.value)
                await xs.aclose()
                with trio.fail_after(TIMEOUT):
                    await peer.connections[0].ended.wait()
            nursery.cancel_scope.cancel()
        return text

    text = trio.run(main)
    assert "<system-shutdown " in text and "the proxy is shutting down" in text
    assert peer.connections[0].post_tls.endswith(b"</stream:stream>")
