"""Inbound XEP-0468 WebSocket S2S (proxy/websocket.py) with a real WebSocket peer.

The peer is trio-websocket's own client over the standard library's `ssl` (not the proxy's
pyOpenSSL code path), presenting the test PKI's client certificate, over wss on loopback.
What it receives is parsed with `xml.etree.ElementTree`, message by message, as RFC 7395
§3.3.3 requires every message to be parsable on its own.  The backend is the recording
`FakeBackend` of test_inbound_openssl.py; DNS evidence is the policy file's static TLSA.
"""
from __future__ import annotations

import dataclasses
import logging
import ssl
import xml.etree.ElementTree as ET
from contextlib import asynccontextmanager

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket

from proxy.metrics import Metrics
from proxy.streamerrors import StreamError
from proxy.websocket import CLOSE_ELEMENT, NS_FRAMING_SERVER, WebSocketFraming, open_element, parse_message, qualify
from proxy.xmlstream import NS_DIALBACK, NS_STREAM_ERRORS, NS_STREAMS, StreamOpened, XmlStreamParser
from test_inbound_openssl import (
    LOCAL, PEER, TIMEOUT, FakeBackend, decisions, make_config, running_proxy, tlsa_311, world,  # noqa: F401
)

NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
OPEN = (f"<open xmlns='{NS_FRAMING_SERVER}' xmlns:db='jabber:server:dialback' "
        f"to='{LOCAL}' from='{PEER}' version='1.0'/>")
OPEN_NO_DB = f"<open xmlns='{NS_FRAMING_SERVER}' to='{LOCAL}' from='{PEER}' version='1.0'/>"
DB_RESULT = f"<db:result xmlns:db='jabber:server:dialback' from='{PEER}' to='{LOCAL}'>k3y</db:result>"
MESSAGE = (f"<message xmlns='jabber:server' from='juliet@{PEER}/balcony' to='romeo@{LOCAL}' id='m1'>"
           "<body>wherefore \u2713</body></message>")
CLOSE = f"<close xmlns='{NS_FRAMING_SERVER}'/>"
# What the backend must see for OPEN: an ordinary RFC 6120 S2S stream header.
BACKEND_HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                  b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
                  b"from='a.example' to='b.example' version='1.0'>")


def dane_policy(identity) -> str:
    return f'require = "dane"\ntlsa = ["{tlsa_311(identity.issued.cert)}"]\n'


def ws_config(world, backend, tmp_path, **kwargs):
    config = make_config(world, f"127.0.0.1:{backend.port}", tmp_path, **kwargs)
    return dataclasses.replace(config, inbound=dataclasses.replace(config.inbound, websocket_listen=["127.0.0.1:0"]))


def client_ssl(world, identity=None) -> ssl.SSLContext:
    """The peer's TLS: the standard library's, verifying the proxy against the test CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(world.dir / "root.pem")
    ctx.check_hostname = False    # we dial 127.0.0.1; which certificate is served is not the point here
    ctx.set_alpn_protocols(["http/1.1"])
    if identity is not None:
        ctx.load_cert_chain(identity.cert, identity.key)
    return ctx


class WsPeer:
    """The remote server: a trio-websocket client connection plus what it received."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.received: list[str] = []

    async def send(self, message: str | bytes) -> None:
        await self.ws.send_message(message)

    async def next(self, timeout: float = TIMEOUT) -> ET.Element:
        with trio.fail_after(timeout):
            text = await self.ws.get_message()
        self.received.append(text)
        return ET.fromstring(text)      # RFC 7395 §3.3.3: each message stands alone

    async def until_closed(self, timeout: float = TIMEOUT) -> list[ET.Element]:
        """Every message up to the WebSocket's close, parsed."""
        out = []
        with trio.fail_after(timeout):
            while True:
                try:
                    text = await self.ws.get_message()
                except ConnectionClosed:
                    return out
                self.received.append(text)
                out.append(ET.fromstring(text))

    async def negotiate(self, open_message: str = OPEN) -> tuple[ET.Element, ET.Element]:
        await self.send(open_message)
        opened, features = await self.next(), await self.next()
        return opened, features


@asynccontextmanager
async def ws_peer(world, port: int, identity=None, *, subprotocols=("xmpp",)):
    async with open_websocket("127.0.0.1", port, "/xmpp-websocket", use_ssl=client_ssl(world, identity),
                              subprotocols=list(subprotocols)) as ws:
        yield WsPeer(ws)


def stream_error(elements: list[ET.Element]) -> tuple[str, str]:
    for el in elements:
        if el.tag == f"{{{NS_STREAMS}}}error":
            cond = [c.tag.split("}")[1] for c in el if c.tag != f"{{{NS_STREAM_ERRORS}}}text"]
            text = el.find(f"{{{NS_STREAM_ERRORS}}}text")
            return cond[0], (text.text if text is not None else "")
    raise AssertionError(f"no stream error in {[ET.tostring(e) for e in elements]}")


# ================================================================================ accepted, rejected

def test_accepted_peer_reaches_the_backend_as_an_ordinary_s2s_stream(world, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="xmpp_dane_proxy")
    metrics = Metrics(process_metrics=False)

    async def main():
        async with FakeBackend().running() as backend:
            config = ws_config(world, backend, tmp_path, policies={PEER: dane_policy(world.peer_self)})
            async with running_proxy(config, metrics=metrics) as listening:
                async with ws_peer(world, listening.websocket[0][1], world.peer_self) as peer:
                    assert peer.ws.subprotocol == "xmpp"
                    opened, features = await peer.negotiate()
                    # RFC 7395 §3.3.2 with XEP-0468's namespace; the backend's stream id and
                    # from reach the peer (dialback keys are bound to the id).
                    assert opened.tag == f"{{{NS_FRAMING_SERVER}}}open"
                    assert opened.get("id") == "backend-stream-1" and opened.get("from") == LOCAL
                    assert opened.get("version") == "1.0"
                    # The backend's features, parsed standalone: namespaces carried along,
                    # STARTTLS (TLS is the WebSocket's), SASL and bidi withheld.
                    assert features.tag == f"{{{NS_STREAMS}}}features"
                    assert [c.tag for c in features] == ["{urn:xmpp:features:dialback}dialback"]
                    await peer.send(DB_RESULT)
                    valid = await peer.next()
                    assert valid.tag == f"{{{NS_DIALBACK}}}result" and valid.get("type") == "valid"
                    await peer.send(MESSAGE)
                    await backend.wait_for(lambda: MESSAGE.encode() in backend.connections[0].received)
                    await peer.send(CLOSE)
                    closing = await peer.until_closed()
                    assert [e.tag for e in closing] == [f"{{{NS_FRAMING_SERVER}}}close"]
                await backend.wait_for(lambda: backend.connections[0].closed)
        received = bytes(backend.connections[0].received)
        # The header, the accepted db:result and the stanza, each as the peer sent it.
        assert received == BACKEND_HEADER + DB_RESULT.encode() + MESSAGE.encode() + b"</stream:stream>"
        (line,) = decisions(caplog)
        assert "direction=inbound" in line and "domain=a.example verdict=accept prooftype=dane-ee" in line
        tls = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "websocket"]
        assert tls and tls[0].fields["alpn"] == "http/1.1" and tls[0].fields["client_cert"] is True
        assert tls[0].fields["path"] == "/xmpp-websocket"
        text = metrics.exposition()[0].decode()
        assert 'connections_total{direction="inbound",outcome="ok"} 1' in text

    trio.run(main)


def test_rejected_by_policy_gets_a_dialback_error_and_the_backend_sees_nothing_but_the_header(world, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="xmpp_dane_proxy")

    async def main():
        async with FakeBackend().running() as backend:
            config = ws_config(world, backend, tmp_path, policies={PEER: dane_policy(world.peer_self)})
            async with running_proxy(config) as listening:
                # The stranger's key is not the one in a.example's TLSA record.
                async with ws_peer(world, listening.websocket[0][1], world.stranger) as peer:
                    await peer.negotiate()
                    await peer.send(DB_RESULT)
                    error = await peer.next()
                    # XEP-0220 §2.4: the peer declared xmlns:db on <open/>, so a dialback error.
                    assert error.tag == f"{{{NS_DIALBACK}}}result" and error.get("type") == "error"
                    assert error.find("{*}error/{urn:ietf:params:xml:ns:xmpp-stanzas}not-authorized") is not None
                    await peer.send(MESSAGE)      # not authenticated: invalid-from, stream closed
                    condition, text = stream_error(await peer.until_closed())
                    assert condition == "invalid-from" and "before any domain was authenticated" in text
                await backend.wait_for(lambda: backend.connections[0].closed)
        events = backend.connections[0].events
        assert isinstance(events[0], StreamOpened) and events[0].to == LOCAL
        assert b"db:result" not in backend.connections[0].received and b"<message" not in backend.connections[0].received
        (line,) = decisions(caplog)
        assert "verdict=reject" in line and "domain=a.example" in line

    trio.run(main)


def test_rejected_without_dialback_errors_and_without_client_certificate_is_not_authorized(world, tmp_path):
    async def main():
        async with FakeBackend().running() as backend:
            config = ws_config(world, backend, tmp_path)   # default policy: dane-or-pkix
            async with running_proxy(config) as listening:
                async with ws_peer(world, listening.websocket[0][1], None) as peer:
                    await peer.negotiate(OPEN_NO_DB)
                    await peer.send(DB_RESULT)
                    elements = await peer.until_closed()
                    condition, text = stream_error(elements)
                    assert condition == "not-authorized" and text.startswith("a.example not authenticated")
                    assert elements[-1].tag == f"{{{NS_FRAMING_SERVER}}}close"
        assert b"db:result" not in backend.connections[0].received

    trio.run(main)


def test_websocket_without_the_xmpp_subprotocol_is_refused(world, tmp_path):
    async def main():
        async with FakeBackend().running() as backend:
            config = ws_config(world, backend, tmp_path)
            async with running_proxy(config) as listening:
                with pytest.raises(ConnectionRejected) as info:
                    async with ws_peer(world, listening.websocket[0][1], world.peer, subprotocols=("chat",)):
                        pass
        assert info.value.status_code == 400 and b"subprotocol 'xmpp' required" in info.value.body
        assert backend.connections == []

    trio.run(main)


def test_over_max_connections_a_wss_peer_is_closed_without_xml(world, tmp_path):
    """Past limits.max_connections the wss port closes at once: a TLS client must not be
    sent a plaintext XML stream error."""
    async def main():
        async with FakeBackend().running() as backend:
            config = ws_config(world, backend, tmp_path, max_connections=1)
            async with running_proxy(config) as listening:
                holder = await trio.open_tcp_stream("127.0.0.1", listening.inbound[0][1])
                await holder.send_all(b"<?xml version='1.0'?>")   # keeps the one slot busy
                with trio.fail_after(10):
                    while listening.server.active < 1:
                        await trio.sleep(0.01)
                refused = await trio.open_tcp_stream("127.0.0.1", listening.websocket[0][1])
                with trio.fail_after(10):
                    received = b""
                    while chunk := await refused.receive_some(4096):
                        received += chunk
                assert received == b"" and listening.server.refused == 1
                await holder.aclose()

    trio.run(main)


# ================================================================================ bad framing

BAD_FRAMING = [
    # RFC 7395 §3.3.3: a message is one complete element.
    ("two-elements", f"<presence xmlns='jabber:server' from='{PEER}' to='{LOCAL}'/><presence xmlns='jabber:server'/>",
     "not-well-formed", "exactly one complete XML element"),
    ("fragment", f"<message xmlns='jabber:server' from='{PEER}' to='{LOCAL}'>", "not-well-formed",
     "exactly one complete XML element"),
    ("text", "hello", "not-well-formed", "exactly one complete XML element"),
    ("stream-header", "<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' "
                      f"to='{LOCAL}' version='1.0'>", "bad-format", "<stream:stream> header in a WebSocket message"),
    ("binary", b"<presence xmlns='jabber:server'/>", "bad-format", "text messages only"),
    ("unqualified", f"<message from='{PEER}' to='{LOCAL}'/>", "invalid-namespace", "in no namespace"),
    ("comment", "<presence xmlns='jabber:server'><!-- x --></presence>", "restricted-xml", "comment"),
    ("second-open", OPEN, "bad-format", "a second <open/>"),
]


@pytest.mark.parametrize("name,message,condition,text", BAD_FRAMING, ids=[c[0] for c in BAD_FRAMING])
def test_bad_framing_is_a_stream_error(world, tmp_path, name, message, condition, text):
    async def main():
        async with FakeBackend().running() as backend:
            config = ws_config(world, backend, tmp_path, policies={PEER: dane_policy(world.peer_self)})
            async with running_proxy(config) as listening:
                async with ws_peer(world, listening.websocket[0][1], world.peer_self) as peer:
                    await peer.negotiate()
                    await peer.send(message)
                    elements = await peer.until_closed()
            got = stream_error(elements)
            assert got[0] == condition and text in got[1], got
            assert elements[-1].tag == f"{{{NS_FRAMING_SERVER}}}close"   # RFC 7395 §3.6
            await backend.wait_for(lambda: backend.connections[0].closed)
        received = bytes(backend.connections[0].received)
        assert received == BACKEND_HEADER + b"</stream:stream>"   # nothing of the bad message

    trio.run(main)


def test_first_message_must_be_open_and_the_error_follows_our_open(world, tmp_path):
    async def main():
        async with FakeBackend().running() as backend:
            config = ws_config(world, backend, tmp_path)
            async with running_proxy(config) as listening:
                async with ws_peer(world, listening.websocket[0][1], world.peer) as peer:
                    await peer.send("<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' "
                                    f"to='{LOCAL}' from='{PEER}' version='1.0'>")
                    elements = await peer.until_closed()
        # RFC 7395 §3.4 / RFC 6120 §4.9.1.1: a header (<open/>) first, then the error, then <close/>.
        assert [e.tag.split("}")[1] for e in elements] == ["open", "error", "close"]
        assert stream_error(elements)[0] == "bad-format"
        assert backend.connections == []     # no backend connection for a stream that never opened

    trio.run(main)


def test_c2s_framing_namespace_is_invalid_namespace(world, tmp_path):
    async def main():
        async with FakeBackend().running() as backend:
            config = ws_config(world, backend, tmp_path)
            async with running_proxy(config) as listening:
                async with ws_peer(world, listening.websocket[0][1], world.peer) as peer:
                    await peer.send(f"<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='{LOCAL}' version='1.0'/>")
                    condition, text = stream_error(await peer.until_closed())
        assert condition == "invalid-namespace" and "server-to-server" in text

    trio.run(main)


# ================================================================================ size limits

def test_oversized_message_is_policy_violation_and_far_oversized_closes_with_1009(world, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="xmpp_dane_proxy")
    limit = 4096
    metrics = Metrics(process_metrics=False)

    def big(n: int) -> str:
        return f"<message xmlns='jabber:server' from='{PEER}' to='{LOCAL}'><body>{'x' * n}</body></message>"

    async def main():
        async with FakeBackend().running() as backend:
            config = ws_config(world, backend, tmp_path, max_stanza_bytes=limit,
                               policies={PEER: dane_policy(world.peer_self)})
            async with running_proxy(config, metrics=metrics) as listening:
                port = listening.websocket[0][1]
                async with ws_peer(world, port, world.peer_self) as peer:
                    await peer.negotiate()
                    message = big(limit)          # just over the limit (the body alone is at it)
                    await peer.send(message)
                    condition, text = stream_error(await peer.until_closed())
                    assert condition == "policy-violation"
                    assert text == f"message of {len(message)} bytes exceeds the limit of {limit} bytes"
                # Over trio-websocket's hard bound (2 x the limit): the WebSocket layer closes
                # with 1009 at once; the message is never held whole.
                async with ws_peer(world, port, world.peer_self) as peer:
                    await peer.negotiate()
                    await peer.send(big(3 * limit))
                    with trio.fail_after(TIMEOUT):
                        with pytest.raises(ConnectionClosed) as closed:
                            while True:
                                await peer.ws.get_message()
                    assert closed.value.reason.code == 1009
                await backend.wait_for(lambda: len(backend.connections) == 2 and all(c.closed for c in backend.connections))
        for conn in backend.connections:
            assert b"<message" not in conn.received
        text = metrics.exposition()[0].decode()
        assert 'connections_total{direction="inbound",outcome="policy-violation"} 2' in text

    trio.run(main)


# ================================================================================ the translation, in memory

def test_framing_translates_both_ways_without_io():
    framing = WebSocketFraming(max_message_bytes=1000)
    header = framing.from_peer(OPEN)
    assert header == BACKEND_HEADER
    (event,) = XmlStreamParser().feed(header)
    assert isinstance(event, StreamOpened) and event.namespaces[None] == "jabber:server"
    assert framing.from_peer("  " + MESSAGE + "\n") == MESSAGE.encode()       # whitespace around is not relayed
    assert framing.from_peer("<?xml version='1.0'?>" + DB_RESULT) == DB_RESULT.encode()
    assert framing.from_peer(CLOSE) == b"</stream:stream>"

    out = framing.to_peer(b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                          b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
                          b"id='i1' from='b.example' to='a.example' version='1.0' xml:lang='en'>"
                          b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'/></stream:features>"
                          b"<db:result from='b.example' to='a.ex")
    assert out[0] == (f"<open xmlns='{NS_FRAMING_SERVER}' xmlns:db='jabber:server:dialback' from='b.example' "
                      "to='a.example' id='i1' version='1.0' xml:lang='en'/>")
    assert ET.fromstring(out[1]).tag == f"{{{NS_STREAMS}}}features"
    out = framing.to_peer(b"ample' type='valid'/>   <message from='x@b.example' to='y@a.example'/></stream:stream>")
    assert ET.fromstring(out[0]).tag == f"{{{NS_DIALBACK}}}result"
    assert ET.fromstring(out[1]).tag == "{jabber:server}message"     # the stream's default namespace, now explicit
    assert out[2] == CLOSE_ELEMENT and len(out) == 3                  # whitespace keepalives are dropped


def test_qualify_adds_only_missing_declarations():
    ns = {None: "jabber:server", "stream": NS_STREAMS}
    assert qualify(b"<message to='a'/>", ns) == (
        b"<message xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' to='a'/>")
    own = b"<x xmlns='urn:x' a='xmlns:stream=\"no\"'>t</x>"
    assert qualify(own, ns) == b"<x xmlns:stream='http://etherx.jabber.org/streams' xmlns='urn:x' a='xmlns:stream=\"no\"'>t</x>"
    ET.fromstring(qualify(own, ns))


@pytest.mark.parametrize("data,condition", [
    (b"", "not-well-formed"),
    (b"<a xmlns='x'/><b/>", "not-well-formed"),
    (b"<!DOCTYPE a [<!ENTITY e 'x'>]><a>&e;</a>", "restricted-xml"),
    (b"<a>&unknown;</a>", "restricted-xml"),
    (b"<db:result/>", "bad-namespace-prefix"),
    (b"<?xml version='1.0' encoding='ISO-8859-1'?><a/>", "unsupported-encoding"),
    (b"<a xmlns='x'>" + b"y" * 100 + b"</a>", "policy-violation"),
])
def test_parse_message_rejects(data, condition):
    with pytest.raises(StreamError) as info:
        parse_message(data, max_bytes=64)
    assert info.value.condition == condition


def test_open_element_round_trips_the_header_attributes():
    (header,) = XmlStreamParser().feed(b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' "
                                       b"from='b&amp;.example' to='a.example' id='x'>")
    opened = ET.fromstring(open_element(header))
    assert opened.attrib == {"from": "b&.example", "to": "a.example", "id": "x"}
