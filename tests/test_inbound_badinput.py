"""The inbound proxy against bad input and misbehaving peers (DESIGN §3.3, §7).

Every case gets its stream error with a `<text>` reason, nothing unauthenticated reaches the
backend (asserted on the bytes the backend stand-in received), and the proxy keeps serving
other streams.  The peer is driven from Python (plain TCP, then proxy/tls.py's client side
with a test-PKI certificate); the tail of the file tests `InboundSession` in memory.
"""
from __future__ import annotations

import logging
import socket

import pytest
import trio

from proxy.inbound import proxy_protocol_v2
from proxy.inbound_session import (
    MAX_DIALBACK_REJECTIONS, CheckDialback, Close, ConnectBackend, InboundSession, Negotiated, PeerDone,
    SendToBackend, SendToPeer, StartTls, jid_domain,
)
from proxy.xmlstream import NS_DIALBACK, NS_STREAMS, Element, StreamClosed, StreamOpened, XmlStreamParser
from test_inbound_openssl import (
    LOCAL, PEER, FakeBackend, Peer, db_result, log_lines, make_config, running_proxy, stream_error_of,
    world,  # noqa: F401  (a fixture)
)

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

HEADER = ("<?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' "
          "xmlns:db='jabber:server:dialback' from='a.example' to='b.example' version='1.0'>")
MESSAGE = b"<message from='juliet@a.example/x' to='romeo@b.example'><body>hi</body></message>"


def restarted_header() -> bytes:
    return b"<?xml version='1.0'?>" + HEADER.replace("<?xml version='1.0'?>", "").encode()


async def assert_still_serving(port: int) -> None:
    """A fresh connection still gets the STARTTLS offer."""
    peer = await Peer.connect(port)
    await peer.open_stream()
    features = await peer.expect(Element)
    assert features.is_(NS_STREAMS, "features")
    await peer.aclose()


async def plaintext_exchange(port: int, data: bytes) -> bytes:
    """Send `data` on a fresh plaintext connection; return all the proxy sent until it closed."""
    peer = await Peer.connect(port)
    await peer.send(data)
    received = await peer.until_closed()
    await peer.aclose()
    return received


def run_with_proxy(world, tmp_path, body, *, backend_kwargs=None, **config_kwargs):
    async def main():
        async with FakeBackend(**(backend_kwargs or {})).running() as backend:
            config = make_config(world, f"127.0.0.1:{backend.port}", tmp_path, **config_kwargs)
            async with running_proxy(config) as listening:
                await body(listening.inbound[0][1], backend)

    trio.run(main)


# ================================================================================ malformed XML

@pytest.mark.parametrize("data,condition,words", [
    (HEADER + "<a></b>", "not-well-formed", "mismatched tag"),
    ("GET / HTTP/1.1\r\nHost: b.example\r\n\r\n", "not-well-formed", "syntax error"),
    ("\x00\x01garbage", "not-well-formed", "invalid token"),
    ("<?xml version='1.0'?><!DOCTYPE stream [<!ENTITY x 'y'>]>" + HEADER[21:], "restricted-xml", "DTD"),
    ("<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'><!ENTITY lol2 '&lol;&lol;&lol;'>]>"
     "<lolz>&lol2;</lolz>", "restricted-xml", "DTD"),
    (HEADER + "<!-- hi -->", "restricted-xml", "comment"),
    (HEADER + "<message>&ent;</message>", "restricted-xml", "entities"),
    (HEADER.replace("jabber:server", "jabber:client", 1), "invalid-namespace", "jabber:client"),
    (HEADER.replace("to='b.example'", "to='elsewhere.example'"), "host-unknown", "elsewhere.example"),
    (HEADER.replace(" to='b.example'", ""), "improper-addressing", "'to'"),
    (HEADER.replace(" version='1.0'>", ">"), "policy-violation", "version"),
    (HEADER + "<db:result from='a.example' to='b.example'>k</db:result>", "policy-violation", "STARTTLS is required"),
    (HEADER + "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><x>" + "A" * 5000, "policy-violation", "exceeds the limit"),
])
def test_bad_plaintext_input_gets_its_stream_error(world, tmp_path, data, condition, words):
    async def body(port, backend):
        with trio.fail_after(10):
            received = await plaintext_exchange(port, data.encode("latin-1"))
        events = XmlStreamParser().feed(received)
        # RFC 6120 §4.9.1.1: even an error about the header comes after our own header.
        assert isinstance(events[0], StreamOpened), received
        got, text = stream_error_of(events)
        assert (got, words in text) == (condition, True), (got, text)
        assert received.endswith(b"</stream:stream>")
        await assert_still_serving(port)
        assert backend.connections == []

    run_with_proxy(world, tmp_path, body, max_stanza_bytes=4096)


@pytest.mark.parametrize("stanza,condition,words", [
    (b"<message from='x@a.example' to='y@b.example'>&nbsp;</message>", "restricted-xml", "entities"),
    (b"<message from='x@a.example' to='y@b.example'><?php ?></message>", "restricted-xml", "processing instruction"),
    (b"<message from='x@a.example' to='y@b.example'></presence>", "not-well-formed", "mismatched tag"),
    (b"<message from='x@a.example' to='y@b.example'><body>" + b"x" * 5000 + b"</body></message>",
     "policy-violation", "exceeds the limit of 4096 bytes"),
])
def test_bad_input_after_authentication_reaches_nothing(world, tmp_path, stanza, condition, words):
    """An authenticated stream: the good stanza before is relayed, the bad one is not."""
    async def body(port, backend):
        peer = await Peer.connect(port)
        await peer.negotiate(world.peer)
        await peer.send(db_result())
        valid = await peer.expect(Element)
        assert valid.attrs.get("type") == "valid"
        await peer.send(MESSAGE)
        await backend.wait_for(lambda: MESSAGE in backend.connections[0].received)
        await peer.send(stanza)
        got, text = stream_error_of(await peer.until_closed())
        assert got == condition and words in text, (got, text)
        await backend.wait_for(lambda: backend.connections[0].closed)
        assert bytes(backend.connections[0].received) == peer.last_header + db_result() + MESSAGE + b"</stream:stream>"
        await assert_still_serving(port)

    run_with_proxy(world, tmp_path, body, max_stanza_bytes=4096)


def test_oversized_stanza_is_cut_off_while_arriving(world, tmp_path):
    """The proxy answers before the peer has finished sending a huge element."""
    async def body(port, backend):
        peer = await Peer.connect(port)
        await peer.negotiate(world.peer)
        await peer.send(b"<message from='x@a.example' to='y@b.example'><body>")
        sent = 0
        with trio.fail_after(10):
            while not peer.events:
                try:
                    await peer.send(b"A" * 4096)
                    sent += 4096
                except trio.BrokenResourceError:
                    break
                with trio.move_on_after(0.01):   # let the error arrive; bounded by fail_after
                    await peer.next_event()
        assert sent < 16 * 4096
        got, text = stream_error_of(await peer.until_closed())
        assert got == "policy-violation" and "limit of 4096" in text

    run_with_proxy(world, tmp_path, body, max_stanza_bytes=4096)


# ================================================================================ timing and TLS abuse

def test_silent_peer_gets_connection_timeout(world, tmp_path):
    async def body(port, backend):
        started = trio.current_time()
        peer = await Peer.connect(port)
        received = await peer.until_closed(timeout=10)
        elapsed = trio.current_time() - started
        got, text = stream_error_of(received)
        assert got == "connection-timeout" and "0.5 s" in text
        assert 0.5 <= elapsed < 5
        await assert_still_serving(port)

    run_with_proxy(world, tmp_path, body, handshake_timeout=0.5)


def test_peer_silent_after_proceed_is_dropped(world, tmp_path):
    async def body(port, backend):
        peer = await Peer.connect(port)
        await peer.open_stream()
        await peer.expect(Element)
        await peer.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        assert (await peer.expect(Element)).name == "proceed"
        received = await peer.until_closed(timeout=10)
        # Mid-TLS, no XML can be sent: the connection is simply closed.
        assert b"<stream:error" not in received

    run_with_proxy(world, tmp_path, body, handshake_timeout=0.5)


def test_garbage_instead_of_client_hello_after_proceed(world, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="xmpp_dane_proxy")

    async def body(port, backend):
        peer = await Peer.connect(port)
        await peer.open_stream()
        await peer.expect(Element)
        await peer.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        assert (await peer.expect(Element)).name == "proceed"
        await peer.send(b"HELO this is not TLS\r\n\r\n")
        got, text = stream_error_of(await peer.until_closed())
        assert got == "policy-violation" and "expected a TLS handshake after <proceed/>" in text
        await assert_still_serving(port)

    run_with_proxy(world, tmp_path, body)


@pytest.mark.parametrize("garbage", [
    b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00",   # a truncated ClientHello
    b"\x16" + bytes(range(200)),                              # a TLS record type, then noise
])
def test_garbage_direct_tls_is_closed_with_a_logged_reason(world, tmp_path, caplog, garbage):
    caplog.set_level(logging.INFO, logger="xmpp_dane_proxy")

    async def body(port, backend):
        peer = await Peer.connect(port)
        await peer.send(garbage)
        received = await peer.until_closed()
        assert b"<stream" not in received           # a TLS client cannot read XML
        assert received == b"" or received[:1] == b"\x15"   # at most OpenSSL's alert
        await assert_still_serving(port)

    run_with_proxy(world, tmp_path, body)
    closed = log_lines(caplog, "stream-closed")
    assert any("TLS handshake failed" in line for line in closed), closed


def test_backend_down_gives_remote_connection_failed(world, tmp_path):
    with socket.socket() as s:     # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]

    async def main():
        config = make_config(world, f"127.0.0.1:{dead}", tmp_path)
        async with running_proxy(config) as listening:
            port = listening.inbound[0][1]
            peer = await Peer.connect(port)
            await peer.open_stream()
            await peer.starttls(world.peer)
            await peer.send(HEADER)
            received = await peer.until_closed()
            events = XmlStreamParser().feed(received)
            assert isinstance(events[0], StreamOpened) and events[0].from_ == LOCAL
            got, text = stream_error_of(events)
            assert got == "remote-connection-failed" and f"backend 127.0.0.1:{dead} unreachable" in text
            await assert_still_serving(port)

    trio.run(main)


def test_unix_socket_backend(world, tmp_path):
    """`inbound.backend = "unix:/path"`: the accepted stream reaches a backend on a Unix socket."""
    path = tmp_path / "s2s.sock"

    async def main():
        backend = FakeBackend()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(path))
        sock.listen()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, backend._serve, [trio.SocketListener(sock)])
            config = make_config(world, f"unix:{path}", tmp_path)
            async with running_proxy(config) as listening:
                peer = await Peer.connect(listening.inbound[0][1])
                await peer.negotiate(world.peer)
                await peer.send(db_result())
                answer = await peer.expect(Element)
                assert answer.is_(NS_DIALBACK, "result") and answer.attrs.get("type") == "valid"
                await peer.send(MESSAGE)
                await backend.wait_for(lambda: MESSAGE in backend.connections[0].received)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_max_connections_refuses_with_resource_constraint(world, tmp_path):
    async def body(port, backend):
        first = await Peer.connect(port)
        await first.open_stream()            # occupies the only slot
        received = await plaintext_exchange(port, b"")
        got, text = stream_error_of(received)
        assert got == "resource-constraint" and "max_connections" in text
        await first.expect(Element)           # the first stream is unaffected
        await first.aclose()

    run_with_proxy(world, tmp_path, body, max_connections=1)


# ================================================================================ authentication gates

def test_stanza_before_dialback_is_invalid_from_and_never_relayed(world, tmp_path):
    async def body(port, backend):
        peer = await Peer.connect(port)
        await peer.negotiate(world.peer)
        await peer.send(MESSAGE)
        got, text = stream_error_of(await peer.until_closed())
        assert got == "invalid-from" and "before any domain was authenticated" in text
        await backend.wait_for(lambda: backend.connections[0].closed)
        assert bytes(backend.connections[0].received) == peer.last_header + b"</stream:stream>"

    run_with_proxy(world, tmp_path, body)


def test_stanza_for_another_pair_is_invalid_from(world, tmp_path):
    spoof = b"<message from='mallory@evil.example' to='romeo@b.example'><body>trust me</body></message>"

    async def body(port, backend):
        peer = await Peer.connect(port)
        await peer.negotiate(world.peer)
        await peer.send(db_result())
        await peer.expect(Element)
        await peer.send(MESSAGE + spoof)
        got, text = stream_error_of(await peer.until_closed())
        assert got == "invalid-from" and "evil.example" in text and "a.example->b.example" in text
        await backend.wait_for(lambda: backend.connections[0].closed)
        received = bytes(backend.connections[0].received)
        assert MESSAGE in received and b"mallory" not in received

    run_with_proxy(world, tmp_path, body)


def test_pair_is_authenticated_only_after_the_backend_confirms(world, tmp_path):
    async def body(port, backend):
        peer = await Peer.connect(port)
        await peer.negotiate(world.peer)
        await peer.send(db_result())
        await backend.wait_for(lambda: db_result() in backend.connections[0].received)
        await peer.send(MESSAGE)   # the backend has not said type='valid'
        got, _ = stream_error_of(await peer.until_closed())
        assert got == "invalid-from"
        await backend.wait_for(lambda: backend.connections[0].closed)
        assert MESSAGE not in backend.connections[0].received

    run_with_proxy(world, tmp_path, body, backend_kwargs={"confirm_dialback": False})


def test_db_verify_is_relayed_without_the_gate(world, tmp_path):
    verify = b"<db:verify from='a.example' to='b.example' id='remote-id'>c0ffee</db:verify>"

    async def body(port, backend):
        peer = await Peer.connect(port)
        await peer.negotiate(None)    # not even a client certificate
        await peer.send(verify)
        await backend.wait_for(lambda: verify in backend.connections[0].received)
        await peer.send(b"</stream:stream>")
        await peer.until_closed()

    run_with_proxy(world, tmp_path, body)


def test_unknown_target_domain_gets_item_not_found_dialback_error(world, tmp_path):
    async def body(port, backend):
        peer = await Peer.connect(port)
        await peer.negotiate(world.peer)
        await peer.send(db_result(target="nope.example"))
        error = await peer.expect(Element)
        assert error.is_(NS_DIALBACK, "result") and error.attrs["type"] == "error"
        assert b"item-not-found" in error.raw and b"nope.example" in error.raw
        await peer.send(b"</stream:stream>")
        await peer.until_closed()
        await backend.wait_for(lambda: backend.connections[0].closed)
        assert bytes(backend.connections[0].received) == peer.last_header + b"</stream:stream>"

    run_with_proxy(world, tmp_path, body)


# ================================================================================ closing

def test_peer_close_flushes_everything_to_the_backend_first(world, tmp_path):
    stanzas = [MESSAGE.replace(b"hi", b"n%d" % i) for i in range(50)]

    async def body(port, backend):
        peer = await Peer.connect(port)
        await peer.negotiate(world.peer)
        await peer.send(db_result())
        await peer.expect(Element)
        await peer.send(b"".join(stanzas) + b"</stream:stream>")
        received = await peer.until_closed()
        assert received.endswith(b"</stream:stream>")   # the backend's own close, relayed
        await backend.wait_for(lambda: backend.connections[0].closed)
        assert bytes(backend.connections[0].received) == (
            peer.last_header + db_result() + b"".join(stanzas) + b"</stream:stream>")

    run_with_proxy(world, tmp_path, body)


def test_backend_closing_closes_the_peer_stream(world, tmp_path):
    async def body(port, backend):
        peer = await Peer.connect(port)
        await peer.negotiate(world.peer)
        await backend.wait_for(lambda: backend.streams)
        await backend.streams[0].send_all(b"<message from='romeo@b.example' to='juliet@a.example'/></stream:stream>")
        await peer.expect(Element)
        await peer.expect(StreamClosed)
        assert peer.received.endswith(b"<message from='romeo@b.example' to='juliet@a.example'/></stream:stream>")
        # RFC 6120 §4.4: the backend keeps reading until the peer closes too; then it gets ours.
        await peer.send(b"</stream:stream>")
        await peer.until_closed()
        await backend.wait_for(lambda: bytes(backend.connections[0].received).endswith(b"</stream:stream>"))

    run_with_proxy(world, tmp_path, body)


def test_shutdown_ends_streams_with_system_shutdown(world, tmp_path):
    async def main():
        async with FakeBackend().running() as backend:
            config = make_config(world, f"127.0.0.1:{backend.port}", tmp_path)
            async with running_proxy(config) as listening:
                port = listening.inbound[0][1]
                peer = await Peer.connect(port)
                await peer.negotiate(world.peer)
                await peer.send(db_result())
                await peer.expect(Element)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(listening.server.shutdown)
                    # RFC 6120 §4.4: our stream ends (system-shutdown, then </stream:stream>)...
                    got, text = stream_error_of([await peer.expect(Element)])
                    assert got == "system-shutdown" and "shutting down" in text
                    await peer.expect(StreamClosed)
                    with pytest.raises(OSError):
                        await trio.open_tcp_stream("127.0.0.1", port)   # no longer accepting
                    # ...but what the peer sent before it saw that still reaches the backend,
                    # and the backend's stream ends only when the peer has closed its side.
                    assert not backend.connections[0].closed
                    await peer.send(MESSAGE + b"</stream:stream>")
                    await peer.until_closed()
                await backend.wait_for(lambda: backend.connections[0].closed)
                assert backend.connections[0].received.endswith(db_result() + MESSAGE + b"</stream:stream>")

    trio.run(main)


def test_metrics_count_outcomes_verdicts_and_bytes(world, tmp_path):
    from proxy.metrics import Metrics

    metrics = Metrics(process_metrics=False)

    def value(name, **labels):
        return metrics.registry.get_sample_value(f"xmpp_dane_proxy_{name}", labels) or 0

    async def main():
        async with FakeBackend().running() as backend:
            # max_unauthenticated = 2 too: the held connections never authenticate.
            config = make_config(world, f"127.0.0.1:{backend.port}", tmp_path, max_connections=2,
                                 max_unauthenticated=2)
            async with running_proxy(config, metrics=metrics) as listening:
                port = listening.inbound[0][1]
                good = await Peer.connect(port)
                await good.negotiate(world.peer)
                await good.send(db_result())
                await good.expect(Element)
                await good.send(MESSAGE + b"</stream:stream>")
                await good.until_closed()
                await plaintext_exchange(port, HEADER.encode() + b"<a></b>")
                anonymous = await Peer.connect(port)
                await anonymous.negotiate(None, dialback_ns=False)
                await anonymous.send(db_result().replace(b"<db:result", b"<db:result xmlns:db='jabber:server:dialback'"))
                await anonymous.until_closed()
                # max_connections=2: hold two, the third is refused
                held = [await Peer.connect(port) for _ in range(2)]
                for h in held:
                    await h.open_stream()
                await plaintext_exchange(port, b"")
                for h in held:
                    await h.aclose()

    trio.run(main)
    assert value("connections_total", direction="inbound", outcome="ok") >= 1
    assert value("connections_total", direction="inbound", outcome="not-well-formed") == 1
    assert value("connections_total", direction="inbound", outcome="not-authorized") == 1
    assert value("connections_total", direction="inbound", outcome="over-limit") == 1
    assert value("connections_total", direction="inbound", outcome="internal-error") == 0
    assert value("verdicts_total", direction="inbound", verdict="accept", prooftype="pkix", reason="accepted") == 1
    assert value("verdicts_total", direction="inbound", verdict="reject", prooftype="-", reason="no-certificate") == 1
    assert value("relayed_bytes_total", direction="inbound", source="peer") >= len(MESSAGE)
    assert value("handshake_seconds_count", direction="inbound") == 2
    assert value("connections_open", direction="inbound") == 0


def test_bad_streams_do_not_disturb_a_good_one(world, tmp_path):
    async def body(port, backend):
        good = await Peer.connect(port)
        await good.negotiate(world.peer)
        await good.send(db_result())
        await good.expect(Element)
        async with trio.open_nursery() as nursery:
            for data in [b"<junk", HEADER.encode() + b"<a></b>", b"\x16\x03\x01\x00\x01\x00", b"GET /\r\n\r\n"] * 5:
                nursery.start_soon(plaintext_exchange, port, data)
        await good.send(MESSAGE)
        await backend.wait_for(lambda: MESSAGE in backend.connections[0].received)
        await good.send(b"</stream:stream>")
        await good.until_closed()

    run_with_proxy(world, tmp_path, body, handshake_timeout=1)


# ================================================================================ the session in memory

def session(**kw) -> InboundSession:
    return InboundSession([LOCAL, "c.example"], **kw)


def up(s: InboundSession, header: bytes = HEADER.encode()) -> list:
    """Drive a session to the relaying state; returns the actions of the last step."""
    s.peer_data(header)
    s.peer_data(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    from proxy.tls import TlsInfo
    s.tls_established(TlsInfo("1.3", "TLSv1.3", None, None, None, ()))
    actions = s.peer_data(header)
    assert actions == [ConnectBackend()]
    return s.backend_connected()


BACKEND_HEADER = b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' id='x'>"


def relaying(s: InboundSession) -> list:
    """`up`, then the backend's stream header: the peer's elements are handled from here on
    (they wait for the header, whose id binds dialback keys)."""
    up(s)
    return s.backend_data(BACKEND_HEADER)


def test_session_pipelined_input_is_processed_in_order():
    s = session()
    up(s)
    verify = b"<db:verify from='a.example' to='b.example' id='i'>k</db:verify>"
    # Everything waits for the backend's stream header (its id binds dialback keys) ...
    assert s.peer_data(db_result() + verify + b"</stream:stream>") == []
    header = b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' id='x'>"
    actions = s.backend_data(header)
    assert actions == [SendToPeer(b"<?xml version='1.0'?>" + header), CheckDialback(PEER, LOCAL)]
    # ... and then the verify waits its turn.
    actions = s.verdict(PEER, LOCAL, True, "ok")
    assert actions == [SendToBackend(db_result() + verify + b"</stream:stream>"), PeerDone()]


def test_session_starttls_trailing_bytes_go_to_tls():
    s = session()
    s.peer_data(HEADER.encode())
    actions = s.peer_data(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>\x16\x03\x01\x00")
    assert actions[0] == SendToPeer(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    assert actions[1] == StartTls(LOCAL, b"\x16\x03\x01\x00", False)


def test_session_direct_tls_detection():
    s = session()
    assert s.peer_data(b"\x16\x03\x01") == [StartTls(None, b"\x16\x03\x01", True)]


def test_session_backend_features_are_filtered_and_valid_result_authenticates():
    s = session()
    actions = up(s)
    assert actions == [SendToBackend(restarted_header()), Negotiated()]
    out = s.backend_data(b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' "
                         b"id='x'>" + FakeBackend.FEATURES)
    (send,) = out
    assert b"starttls" not in send.data and b"bidi" not in send.data and b"mechanisms" not in send.data
    assert b"<dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>" in send.data
    s.peer_data(db_result())
    s.verdict(PEER, LOCAL, True, "ok")
    # A 'valid' for a pair the policy did not accept authenticates nothing.
    s.backend_data(b"<db:result xmlns:db='jabber:server:dialback' from='b.example' to='evil.example' type='valid'/>")
    assert s.authenticated == set()
    s.backend_data(b"<db:result xmlns:db='jabber:server:dialback' from='b.example' to='a.example' type='valid'/>")
    assert s.authenticated == {(PEER, LOCAL)}
    assert s.peer_data(MESSAGE) == [SendToBackend(MESSAGE)]


def test_session_too_many_dialback_rejections_end_the_stream():
    s = session()
    relaying(s)
    for i in range(MAX_DIALBACK_REJECTIONS - 1):
        sender = f"d{i}.example"
        assert s.peer_data(db_result(sender=sender)) == [CheckDialback(sender, LOCAL)]
        (send,) = s.verdict(sender, LOCAL, False, "nope")
        assert b"type='error'" in send.data
    s.peer_data(db_result(sender="last.example"))
    actions = s.verdict("last.example", LOCAL, False, "nope")
    assert isinstance(actions[-1], Close) and actions[-1].condition == "policy-violation"
    assert actions[0] == SendToBackend(b"</stream:stream>")


def test_session_timeouts_by_state():
    s = session()
    (send, close) = s.timed_out(3)
    assert b"connection-timeout" in send.data and send.data.startswith(b"<?xml") and close.condition == "connection-timeout"
    s = session()
    s.peer_data(b"\x16")
    assert s.timed_out(3) == [Close("TLS handshake not completed within 3 s", None, "connection-timeout")]


def test_session_reasons_quoting_peer_data_are_clipped():
    s = session()
    relaying(s)
    huge = "x" * 200_000 + ".example"
    actions = s.peer_data(b"<message from='a@" + huge.encode() + b"' to='b@b.example'/>")
    assert actions[0] == SendToBackend(b"</stream:stream>")
    error, close = actions[1], actions[2]
    assert b"invalid-from" in error.data and len(error.data) < 2000
    assert close.condition == "invalid-from" and len(close.reason) <= 601


def test_session_one_read_of_many_stanzas_is_one_send_up_to_the_first_refused():
    s = session()
    up(s)
    s.backend_data(b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' "
                   b"xmlns:db='jabber:server:dialback' id='x'>")
    s.peer_data(db_result())
    s.verdict(PEER, LOCAL, True, "ok")
    s.backend_data(b"<db:result from='b.example' to='a.example' type='valid'/>")
    stanzas = [MESSAGE.replace(b"hi", b"hi %d" % i) for i in range(3000)]
    # Whitespace between stanzas is not relayed; every stanza is, in order, in one send.
    assert s.peer_data(b"\n".join(stanzas)) == [SendToBackend(b"".join(stanzas))]
    # A stanza for a pair nobody authenticated stops the relay exactly there: what came
    # before it in the same read goes to the backend, nothing after it does.
    bad = b"<message from='x@evil.example' to='romeo@b.example'/>"
    actions = s.peer_data(b"".join(stanzas[:10]) + bad + b"".join(stanzas[10:20]))
    assert actions[0] == SendToBackend(b"".join(stanzas[:10]) + b"</stream:stream>")
    assert b"invalid-from" in actions[1].data and actions[2].condition == "invalid-from"
    assert len(actions) == 3


@pytest.mark.parametrize("jid,domain", [
    ("user@Example.ORG/res@with/slash", "example.org"), ("example.org", "example.org"),
    ("example.org/res", "example.org"), ("bücher.example", "xn--bcher-kva.example"),
])
def test_jid_domain(jid, domain):
    assert jid_domain(jid) == domain


@pytest.mark.parametrize("jid", ["a@b@c", "u@straße.example", "u@a\u200db.example", "u@foo_bar.example/r", "u@"])
def test_jid_domain_without_one_reading_is_refused(jid):
    # DESIGN §2.6: '@' in a domainpart, IDNA deviation characters, names one reading refuses.
    from policy.domain_reading import DomainReadingError

    with pytest.raises(DomainReadingError):
        jid_domain(jid)


def test_proxy_protocol_v2_header():
    header = proxy_protocol_v2(("192.0.2.1", 40000), ("127.0.0.1", 5270))
    assert header[:12] == b"\r\n\r\n\x00\r\nQUIT\n" and header[12:14] == b"\x21\x11"
    assert header[14:16] == b"\x00\x0c" and header[16:20] == bytes([192, 0, 2, 1]) and header[24:26] == b"\x9c\x40"
    assert proxy_protocol_v2(("::1", 1, 0, 0), ("::1", 2, 0, 0))[13] == 0x21
    assert proxy_protocol_v2(None, None)[12:] == b"\x20\x00\x00\x00"
