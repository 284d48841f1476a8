"""Outbound XEP-0468 WebSocket S2S (proxy/websocket_outbound.py): discovery and relay.

The peer domain is real DNS (tests/dnsenv.py: nsd + validating unbound, a fresh name in the
signed zone).  It publishes a host-meta document (XEP-0156) on a small HTTPS server built on
the standard library's `ssl`, and its WebSocket endpoint is trio-websocket's own server
(`serve_websocket`, stdlib `ssl`), not the proxy's code: it records every message it gets,
parsed with ElementTree.  The backend is the raw XML stand-in of test_outbound.py.
"""
from __future__ import annotations

import json
import ssl
import xml.etree.ElementTree as ET
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio
from trio_websocket import ConnectionClosed, serve_websocket

from pki import TestCA, self_signed
from policy.tlsa import record_for
from proxy.websocket import NS_FRAMING_SERVER
from proxy.websocket_outbound import LINK_REL, discoverer_for, parse_host_meta_json, parse_host_meta_xrd
from test_outbound import LOCAL, ask_for_peer, backend_stream, make_context, proxy_running
from xmppclient import NS_DIALBACK, XmppError

TIMEOUT = 10.0
HOME_CA = TestCA("Home CA")          # issues the backend's (local) certificate
PEER_CA = TestCA("WS Peer CA")       # issues the peer's web server certificates
NS_STREAMS = "http://etherx.jabber.org/streams"


# ================================================================================ host-meta parsing

def test_host_meta_json_keeps_wss_links_of_the_s2s_relation():
    doc = json.dumps({"links": [
        {"rel": "urn:xmpp:alt-connections:websocket", "href": "wss://c2s.example/ws"},   # c2s (XEP-0156)
        {"rel": LINK_REL, "href": "wss://s2s.example/xmpp-websocket"},
        {"rel": LINK_REL, "href": "ws://plain.example/ws"},                             # XEP-0468: wss only
        {"rel": LINK_REL, "href": "wss://s2s.example/xmpp-websocket"},                   # duplicate
    ]}).encode()
    assert parse_host_meta_json(doc) == ("wss://s2s.example/xmpp-websocket",)
    with pytest.raises(ValueError):
        parse_host_meta_json(b"<XRD/>")


def test_host_meta_xrd_and_no_dtd():
    doc = (f"<?xml version='1.0'?><XRD xmlns='http://docs.oasis-open.org/ns/xri/xrd-1.0'>"
           f"<Link rel='{LINK_REL}' href='wss://s2s.example:8443/ws'/>"
           f"<Link rel='urn:xmpp:alt-connections:xbosh' href='https://s2s.example/bosh'/></XRD>").encode()
    assert parse_host_meta_xrd(doc) == ("wss://s2s.example:8443/ws",)
    with pytest.raises(ValueError):
        parse_host_meta_xrd(b"<!DOCTYPE x [<!ENTITY a 'b'>]><XRD>&a;</XRD>")


# ================================================================================ the peer's servers

def server_ssl(issued, tmp_path, name: str, *, client_ca: TestCA | None = None) -> ssl.SSLContext:
    cert, key = issued.write(tmp_path, name)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    if client_ca is not None:
        # Ask for the proxy's client certificate (the local domain's), verify it if sent.
        ca_path = tmp_path / f"{name}-client-ca.pem"
        client_ca.write_root(ca_path)
        ctx.load_verify_locations(ca_path)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


@dataclass
class HostMeta:
    port: int = 0
    requests: list[bytes] = field(default_factory=list)


@asynccontextmanager
async def host_meta_server(ctx: ssl.SSLContext, document: dict | None):
    """`https://127.0.0.1:PORT/.well-known/host-meta.json`: `document`, or 404 if None."""
    meta = HostMeta()

    async def handle(stream: trio.SSLStream) -> None:
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
            meta.requests.append(data.split(b"\r\n", 1)[0])
            if document is not None and data.startswith(b"GET /.well-known/host-meta.json "):
                body = json.dumps(document).encode()
                head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            else:
                body, head = b"not here\n", b"HTTP/1.1 404 Not Found\r\n"
            await stream.send_all(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_ssl_over_tcp_listeners(0, ctx, host="127.0.0.1")
        meta.port = listeners[0].transport_listener.socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        try:
            yield meta
        finally:
            nursery.cancel_scope.cancel()


@dataclass
class WsPeer:
    """What the WebSocket endpoint saw: one list of parsed messages per accepted connection."""

    domain: str
    port: int = 0
    bad_message: str | None = None    # sent after our <open/> instead of the features
    requests: int = 0
    connections: list[list[ET.Element]] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, condition, timeout: float = TIMEOUT):
        with trio.fail_after(timeout):
            while not (result := condition()):
                await self.changed.wait()
            return result

    async def handler(self, request) -> None:
        self.requests += 1
        self._notify()
        if "xmpp" not in request.proposed_subprotocols:
            await request.reject(400)
            return
        ws = await request.accept(subprotocol="xmpp")
        seen: list[ET.Element] = []
        self.connections.append(seen)
        try:
            while True:
                el = ET.fromstring(await ws.get_message())   # RFC 7395 §3.3.3: standalone
                seen.append(el)
                self._notify()
                if el.tag == f"{{{NS_FRAMING_SERVER}}}open":
                    await ws.send_message(f"<open xmlns='{NS_FRAMING_SERVER}' xmlns:db='jabber:server:dialback' "
                                          f"from='{self.domain}' to='{el.get('from')}' id='ws-peer-1' version='1.0'/>")
                    if self.bad_message is not None:
                        await ws.send_message(self.bad_message)
                        continue
                    await ws.send_message(f"<stream:features xmlns:stream='{NS_STREAMS}'>"
                                          "<dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>"
                                          f"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:features>")
                elif el.tag == f"{{{NS_DIALBACK}}}result" and el.get("type") is None:
                    await ws.send_message(f"<db:result xmlns:db='{NS_DIALBACK}' from='{self.domain}' "
                                          f"to='{el.get('from')}' type='valid'/>")
                elif el.tag == f"{{{NS_FRAMING_SERVER}}}close":
                    await ws.send_message(f"<close xmlns='{NS_FRAMING_SERVER}'/>")
                    return
        except ConnectionClosed:
            pass


@asynccontextmanager
async def ws_peer_server(domain: str, ctx: ssl.SSLContext, *, bad_message: str | None = None):
    peer = WsPeer(domain, bad_message=bad_message)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_websocket, peer.handler, "127.0.0.1", 0, ctx))
        peer.port = server.port
        try:
            yield peer
        finally:
            nursery.cancel_scope.cancel()


@dataclass
class Setup:
    domain: str
    peer_cert: object
    web_cert: object


def publish_peer(dns_env, tmp_path) -> Setup:
    """A fresh secure peer domain D with `ws.D` for the endpoint; D and ws.D -> 127.0.0.1."""
    domain = dns_env.fresh(dns_env.secure, "ws")
    with dns_env.batch():
        dns_env.publish(None, domain, "A", "127.0.0.1")
        dns_env.publish(None, f"ws.{domain}", "A", "127.0.0.1")
    PEER_CA.write_root(tmp_path / "peer-root.pem")
    return Setup(domain, self_signed([domain]), PEER_CA.issue([domain]))


def configure(dns_env, tmp_path, setup: Setup, policy: str):
    ctx = make_context(dns_env, tmp_path, policies={f"{setup.domain}.toml": policy},
                       ca_file=tmp_path / "peer-root.pem", local_cert=HOME_CA.issue([LOCAL], xmpp=[LOCAL]))
    return ctx


# ================================================================================ relay

def test_websocket_peer_discovered_verified_and_relayed(dns_env, tmp_path):
    setup = publish_peer(dns_env, tmp_path)
    d = setup.domain
    policy = f'require = "dane"\ntlsa = ["{record_for(setup.peer_cert.cert)}"]\ntransports = ["websocket"]\n'
    message = f"<message from='romeo@{LOCAL}' to='juliet@{d}' id='m1'><body>hi \u2713</body></message>"

    async def main():
        ctx = configure(dns_env, tmp_path, setup, policy)
        async with ws_peer_server(d, server_ssl(setup.peer_cert, tmp_path, "ws", client_ca=HOME_CA)) as peer:
            links = {"links": [{"rel": LINK_REL, "href": f"wss://ws.{d}:{peer.port}/xmpp-websocket"}]}
            async with host_meta_server(server_ssl(setup.web_cert, tmp_path, "web"), links) as meta:
                discoverer_for(ctx.resolver).https_port = meta.port
                async with proxy_running(ctx) as (_, port):
                    backend = await backend_stream(port, d)
                    # Answered by the proxy itself (DESIGN §3.3); the peer is reached for the
                    # backend's <db:result>, and the proxy authenticates L with its own key.
                    await ask_for_peer(backend, d)
                    valid = await backend.expect_stanza()
                    assert valid.tag == f"{{{NS_DIALBACK}}}result" and valid.element.get("type") == "valid"
                    await backend.send(message)
                    await peer.wait_for(lambda: len(peer.connections[0]) >= 3)
                    await backend.send(b"</stream:stream>")
                    await peer.wait_for(lambda: peer.connections[0][-1].tag == f"{{{NS_FRAMING_SERVER}}}close")
                    with pytest.raises(XmppError):          # the peer's <close/> ends the backend stream
                        await backend.expect_stanza()
        assert meta.requests == [b"GET /.well-known/host-meta.json HTTP/1.1"]
        opened, db, msg, close = peer.connections[0]
        assert opened.tag == f"{{{NS_FRAMING_SERVER}}}open" and opened.get("to") == d and opened.get("from") == LOCAL
        assert db.tag == f"{{{NS_DIALBACK}}}result" and db.get("from") == LOCAL
        assert db.text != "k3y" and len(db.text) == 64          # the proxy's key, not the backend's
        # The backend's stanza relied on its stream's default namespace; standalone it says so.
        assert msg.tag == "{jabber:server}message" and msg.find("{jabber:server}body").text == "hi \u2713"

    trio.run(main)


def test_rejected_websocket_endpoint_gets_no_request_and_backend_gets_the_reason(dns_env, tmp_path):
    setup = publish_peer(dns_env, tmp_path)
    d = setup.domain
    wrong = self_signed([d])
    policy = f'require = "dane"\ntlsa = ["{record_for(wrong.cert)}"]\ntransports = ["tcp", "websocket"]\n'

    async def main():
        ctx = configure(dns_env, tmp_path, setup, policy)
        async with ws_peer_server(d, server_ssl(setup.peer_cert, tmp_path, "ws")) as peer:
            links = {"links": [{"rel": LINK_REL, "href": f"wss://ws.{d}:{peer.port}/xmpp-websocket"}]}
            async with host_meta_server(server_ssl(setup.web_cert, tmp_path, "web"), links) as meta:
                discoverer_for(ctx.resolver).https_port = meta.port
                async with proxy_running(ctx) as (_, port):
                    backend = await backend_stream(port, d)
                    await ask_for_peer(backend, d)
                    with pytest.raises(XmppError) as info:
                        await backend.expect_stanza()
        text = str(info.value)
        assert "remote-connection-failed" in text
        assert f"wss://ws.{d}:{peer.port}/xmpp-websocket (websocket)" in text and "rejected" in text
        assert peer.requests == 0          # TLS only: not even the HTTP upgrade reached it

    trio.run(main)


def test_without_websocket_in_transports_there_is_no_discovery(dns_env, tmp_path):
    setup = publish_peer(dns_env, tmp_path)
    d = setup.domain

    async def main():
        ctx = configure(dns_env, tmp_path, setup, 'require = "pkix"\n')   # transports default: tcp
        async with host_meta_server(server_ssl(setup.web_cert, tmp_path, "web"), {"links": []}) as meta:
            discoverer_for(ctx.resolver).https_port = meta.port
            async with proxy_running(ctx) as (_, port):
                backend = await backend_stream(port, d)
                await ask_for_peer(backend, d)
                with pytest.raises(XmppError) as info:
                    await backend.expect_stanza()
        assert "remote-connection-failed" in str(info.value)
        assert meta.requests == []

    trio.run(main)


def test_check_lists_and_judges_the_websocket_endpoints(dns_env, tmp_path):
    from proxy.check import check_domain

    setup = publish_peer(dns_env, tmp_path)
    d = setup.domain
    policy = f'require = "dane"\ntlsa = ["{record_for(setup.peer_cert.cert)}"]\ntransports = ["websocket"]\n'

    async def main():
        ctx = configure(dns_env, tmp_path, setup, policy)
        async with ws_peer_server(d, server_ssl(setup.peer_cert, tmp_path, "ws")) as peer:
            url = f"wss://ws.{d}:{peer.port}/xmpp-websocket"
            async with host_meta_server(server_ssl(setup.web_cert, tmp_path, "web"),
                                        {"links": [{"rel": LINK_REL, "href": url}]}) as meta:
                discoverer_for(ctx.resolver).https_port = meta.port
                result = await check_domain(d, resolver=ctx.resolver, policies=ctx.policies, trust=ctx.trust,
                                            contexts=ctx.contexts, client=LOCAL, timeout=5.0)
        return url, peer, result

    url, peer, result = trio.run(main)
    ws = [a for a in result.attempts if a.mode == "websocket"]
    assert len(ws) == 1 and ws[0].accepted and ws[0].verdict.prooftype == "dane-ee"
    assert peer.requests == 0                     # check only looks: no upgrade request
    text = result.render()
    assert "WebSocket (XEP-0468): used" in text and url in text
    # transports = ["websocket"]: the TCP target (D itself, no SRV) is not tried, so the
    # result is the proxy's: accepted.
    assert [a.mode for a in result.attempts] == ["websocket"] and result.accepted
    assert "TCP targets: not tried (policy transports = websocket)" in text
    assert result.as_json_obj()["websocket"]["endpoints"] == [url]


def test_bad_framing_from_the_websocket_peer_is_a_stream_error_both_ways(dns_env, tmp_path):
    setup = publish_peer(dns_env, tmp_path)
    d = setup.domain
    policy = f'require = "dane"\ntlsa = ["{record_for(setup.peer_cert.cert)}"]\ntransports = ["websocket"]\n'
    bad = "<presence xmlns='jabber:server'/><presence xmlns='jabber:server'/>"   # two elements, one message

    async def main():
        ctx = configure(dns_env, tmp_path, setup, policy)
        async with ws_peer_server(d, server_ssl(setup.peer_cert, tmp_path, "ws"), bad_message=bad) as peer:
            links = {"links": [{"rel": LINK_REL, "href": f"wss://ws.{d}:{peer.port}/xmpp-websocket"}]}
            async with host_meta_server(server_ssl(setup.web_cert, tmp_path, "web"), links) as meta:
                discoverer_for(ctx.resolver).https_port = meta.port
                async with proxy_running(ctx) as (_, port):
                    backend = await backend_stream(port, d)
                    await ask_for_peer(backend, d)
                    with pytest.raises(XmppError) as info:
                        await backend.expect_stanza()
                    await peer.wait_for(lambda: any(e.tag == f"{{{NS_STREAMS}}}error" for e in peer.connections[0]))
        text = str(info.value)
        assert "remote-connection-failed" in text and "broke the stream (not-well-formed" in text
        (error,) = [e for e in peer.connections[0] if e.tag == f"{{{NS_STREAMS}}}error"]
        assert error.find("{urn:ietf:params:xml:ns:xmpp-streams}not-well-formed") is not None

    trio.run(main)
