"""Deadlines and bounds that bind (issue 10, breaches 2 and 4; DESIGN §3.1 Deadlines).

* `limits.handshake_timeout` runs from accept until the backend confirms the first pair,
  on every listener: a peer that does TLS and a stream header and then nothing is closed with
  `connection-timeout` (before the fix it held its slot and a backend connection forever).
* `limits.max_unauthenticated`: a flood of such peers fills only its share; the next one gets
  `resource-constraint`, an authenticated peer keeps relaying, and a valid peer gets in once
  the flood is gone.
* `limits.idle_timeout`: an authenticated peer silent for longer is closed.
* Before authentication only `<db:result>` and `<db:verify>` pass: `<db:request>` (or any
  other dialback-namespace element) gets `not-authorized` and never reaches the backend.
* Slow input costs linear CPU (`proxy.xmlstream`): measured as bytes expat has to tokenise,
  not as time.

The peers are test_inbound_openssl.py's scripted `Peer` (STARTTLS / Direct TLS) and
test_websocket_inbound.py's wss peer; the backend is the recording `FakeBackend`.
"""
from __future__ import annotations

import pytest
import trio

from proxy.xmlstream import Element, PyXmlStreamParser, StreamOpened, XmlError, XmlStreamParser
from test_inbound_openssl import (
    LOCAL, PEER, FakeBackend, Peer, db_result, make_config, running_proxy, stream_error_of,
    world,  # noqa: F401  (a fixture)
)
from test_websocket_inbound import DB_RESULT, OPEN, stream_error, ws_config, ws_peer

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

HANDSHAKE = 1.5   # seconds; short so the test is quick, long enough for a loaded machine's TLS


async def negotiated(port: int, world, how: str) -> Peer:
    """A peer with TLS and the restarted stream header done, but no dialback."""
    peer = await Peer.connect(port)
    if how == "starttls":
        await peer.negotiate(world.peer)
    else:
        await peer.direct_tls(world.peer)
        await peer.open_stream()
        await peer.expect(Element)   # the backend's features
    return peer


# ------------------------------------------------------------------ handshake deadline

@pytest.mark.parametrize("how", ["starttls", "direct-tls"])
def test_a_peer_that_never_authenticates_is_closed_at_the_handshake_deadline(world, tmp_path, how):
    async def main():
        async with FakeBackend().running() as backend:
            config = make_config(world, f"127.0.0.1:{backend.port}", tmp_path, handshake_timeout=HANDSHAKE)
            async with running_proxy(config) as listening:
                peer = await negotiated(listening.inbound[0][1], world, how)
                started = trio.current_time()
                # Well past the deadline the stream must be gone; before the fix it never was.
                got, text = stream_error_of(await peer.until_closed(timeout=HANDSHAKE + 10))
                assert got == "connection-timeout", (got, text)
                assert "no domain pair authenticated" in text and "handshake_timeout" in text, text
                assert trio.current_time() - started < HANDSHAKE + 5
                await backend.wait_for(lambda: backend.connections[0].closed)
                # The backend saw the header and the end of the stream, nothing else.
                assert bytes(backend.connections[0].received) == peer.last_header + b"</stream:stream>"

    trio.run(main)


def test_a_websocket_peer_that_never_authenticates_is_closed_at_the_handshake_deadline(world, tmp_path):
    async def main():
        async with FakeBackend().running() as backend:
            config = ws_config(world, backend, tmp_path, handshake_timeout=HANDSHAKE)
            async with running_proxy(config) as listening:
                async with ws_peer(world, listening.websocket[0][1], world.peer) as peer:
                    await peer.negotiate(OPEN)
                    got, text = stream_error(await peer.until_closed(timeout=HANDSHAKE + 10))
                    assert got == "connection-timeout" and "handshake_timeout" in text, (got, text)

    trio.run(main)


def test_the_handshake_deadline_ends_when_the_backend_confirms_a_pair(world, tmp_path):
    async def main():
        async with FakeBackend().running() as backend:
            config = make_config(world, f"127.0.0.1:{backend.port}", tmp_path, handshake_timeout=HANDSHAKE)
            async with running_proxy(config) as listening:
                peer = await negotiated(listening.inbound[0][1], world, "starttls")
                await peer.send(db_result())
                assert (await peer.expect(Element)).attrs.get("type") == "valid"
                # Past the handshake deadline the authenticated stream still relays.
                await trio.sleep(HANDSHAKE + 0.5)
                message = f"<message from='x@{PEER}' to='y@{LOCAL}'><body>late</body></message>".encode()
                await peer.send(message)
                await backend.wait_for(lambda: message in backend.connections[0].received)
                assert not peer.eof
                await peer.aclose()

    trio.run(main)


# ------------------------------------------------------------------ idle timeout

def test_an_idle_authenticated_peer_is_closed_after_idle_timeout(world, tmp_path):
    async def main():
        async with FakeBackend().running() as backend:
            config = make_config(world, f"127.0.0.1:{backend.port}", tmp_path, idle_timeout=1.0)
            async with running_proxy(config) as listening:
                peer = await negotiated(listening.inbound[0][1], world, "starttls")
                await peer.send(db_result())
                assert (await peer.expect(Element)).attrs.get("type") == "valid"
                got, text = stream_error_of(await peer.until_closed(timeout=10))
                assert got == "connection-timeout" and "idle_timeout" in text, (got, text)
                await backend.wait_for(lambda: backend.connections[0].closed)
                assert bytes(backend.connections[0].received).endswith(db_result() + b"</stream:stream>")

    trio.run(main)


# ------------------------------------------------------------------ max_unauthenticated

def test_a_flood_of_unauthenticated_peers_cannot_lock_out_a_valid_one(world, tmp_path):
    async def main():
        async with FakeBackend().running() as backend:
            config = make_config(world, f"127.0.0.1:{backend.port}", tmp_path, max_connections=10,
                                 max_unauthenticated=2)
            async with running_proxy(config) as listening:
                port = listening.inbound[0][1]
                # An authenticated peer first.
                good = await negotiated(port, world, "starttls")
                await good.send(db_result())
                assert (await good.expect(Element)).attrs.get("type") == "valid"
                # The flood: TLS and a header, never dialback.
                flood = [await negotiated(port, world, "starttls") for _ in range(2)]
                # One more unauthenticated connection is refused at once, before TLS.
                late = await Peer.connect(port)
                got, text = stream_error_of(await late.until_closed(timeout=10))
                assert got == "resource-constraint" and "limits.max_unauthenticated = 2" in text, (got, text)
                # The authenticated peer is unaffected.
                message = f"<message from='x@{PEER}' to='y@{LOCAL}'><body>still here</body></message>".encode()
                await good.send(message)
                await backend.wait_for(lambda: message in backend.connections[0].received)
                # The flood goes (its handshake deadline would do this too); a valid peer gets in.
                for peer in flood:
                    await peer.aclose()
                with trio.fail_after(10):
                    while listening.server.unauthenticated.held:
                        await trio.sleep(0.01)
                newcomer = await negotiated(port, world, "direct-tls")
                await newcomer.send(db_result())
                assert (await newcomer.expect(Element)).attrs.get("type") == "valid"
                # ... and once authenticated it no longer counts against the bound.
                with trio.fail_after(10):
                    while listening.server.unauthenticated.held:
                        await trio.sleep(0.01)
                for peer in (good, newcomer, late):
                    await peer.aclose()

    trio.run(main)


def test_max_unauthenticated_defaults_to_a_quarter_of_max_connections():
    from proxy.admission import effective_max_unauthenticated

    assert effective_max_unauthenticated(0, 10000) == 2500
    assert effective_max_unauthenticated(0, 2) == 1          # never 0: one peer can always try
    assert effective_max_unauthenticated(50, 10000) == 50
    assert effective_max_unauthenticated(50, 10) == 10       # never above max_connections


# ------------------------------------------------------------------ breach 4

@pytest.mark.parametrize("element", [
    b"<db:request from='blocked.example' to='b.example'>k</db:request>",
    b"<db:foo from='a.example' to='b.example'/>",
    b"<db:result xmlns:db='urn:example:not-dialback' from='a.example' to='b.example'>k</db:result>",
])
def test_other_dialback_namespace_elements_before_authentication_are_refused(world, tmp_path, element):
    async def main():
        async with FakeBackend().running() as backend:
            config = make_config(world, f"127.0.0.1:{backend.port}", tmp_path)
            async with running_proxy(config) as listening:
                peer = await negotiated(listening.inbound[0][1], world, "starttls")
                await peer.send(element)
                got, text = stream_error_of(await peer.until_closed())
                assert got == "not-authorized" and "before any domain was authenticated" in text, (got, text)
                await backend.wait_for(lambda: backend.connections[0].closed)
                assert bytes(backend.connections[0].received) == peer.last_header + b"</stream:stream>"

    trio.run(main)


def test_websocket_stanza_outside_jabber_server_is_refused(world, tmp_path):
    message = (f"<message xmlns='jabber:client' from='mallory@blocked.example' to='y@{LOCAL}'>"
               "<body>client namespace</body></message>")

    async def main():
        async with FakeBackend().running() as backend:
            config = ws_config(world, backend, tmp_path)
            async with running_proxy(config) as listening:
                async with ws_peer(world, listening.websocket[0][1], world.peer) as peer:
                    await peer.negotiate(OPEN)
                    await peer.send(DB_RESULT)
                    assert (await peer.next()).get("type") == "valid"
                    await peer.send(message)
                    got, text = stream_error(await peer.until_closed())
                    assert got == "unsupported-stanza-type" and "xmlns='jabber:client'" in text, (got, text)
                await backend.wait_for(lambda: backend.connections[0].closed)
                assert b"client namespace" not in bytes(backend.connections[0].received)

    trio.run(main)


# ------------------------------------------------------------------ slow input

HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
          b"xmlns:stream='http://etherx.jabber.org/streams' to='b.example'>")


class CountingExpat:
    """Wraps the parser's expat object; counts the bytes expat tokenises: each Parse call
    re-scans from the start of the token it could not finish last time."""

    def __init__(self, real) -> None:
        self.real, self.scanned, self.fed = real, 0, 0

    def Parse(self, data, final):   # noqa: N802 (expat's name)
        index = self.real.CurrentByteIndex
        start = index if 0 <= index <= self.fed else self.fed
        self.scanned += self.fed - start + len(data)
        self.fed += len(data)
        return self.real.Parse(data, final)

    def __getattr__(self, name):
        return getattr(self.real, name)


def drip(parser: XmlStreamParser, data: bytes, piece: int = 3) -> list:
    events = []
    for i in range(0, len(data), piece):
        events += parser.feed(data[i:i + piece])
    return events


@pytest.mark.parametrize("payload", [
    b"<message from='a@b' to='c@d' x='" + b"v" * 65536 + b"'/>",                # a long attribute
    b"<message from='a@b' to='c@d' x='" + b">" * 65536 + b"'/>",                # full of '>'
    b"<message from='a@b' to='c@d' x=\"" + b"'>" * 32768 + b"\"/>",             # quotes inside quotes
    b"<m" + b"n" * 65536 + b" xmlns='jabber:server'/>",                          # a long element name
    b"<message from='a@b' to='c@d'><body>" + b"t" * 65536 + b"</body></message>",  # long text
    b"<message from='a@b' to='c@d'><body>&amp" + b"x" * 65536 + b";</body></message>",  # a long reference
    b"<!--" + b"x" * 65536 + b"-->",                                               # a long comment
])
def test_dripped_input_costs_linear_work(payload):
    # The Python framer, whose expat object can be watched; the C framer (proxy/_xmlframe.c)
    # applies the same rule and is held to the Python one by its differential tests.
    parser = PyXmlStreamParser()
    parser.feed(HEADER)
    parser._p = CountingExpat(parser._p)
    events = drip(parser, payload)
    assert events, "the element (or its error) was framed"
    # Linear: expat tokenises each byte a bounded number of times.  Re-parsing the growing
    # token on every 3-byte read (the old behaviour) would be ~ n²/6: about 700 million here.
    assert parser._p.scanned <= 4 * len(payload), parser._p.scanned


def test_dripped_elements_frame_exactly_as_when_sent_whole():
    stream = (b"<message from='a@b' to='c@d' x='>' y=\"'\"><body>a &amp; b</body></message>  "
              b"<db:result xmlns:db='jabber:server:dialback' from='a' to='b'>k</db:result>"
              b"<iq from='a@b' to='c@d'/>")
    whole = XmlStreamParser()
    expected = whole.feed(HEADER + stream)
    for piece in (1, 2, 3, 7):
        parser = XmlStreamParser()
        assert drip(parser, HEADER + stream, piece) == expected


def test_the_stream_header_is_bounded():
    # Dripped: refused once more than 8 KiB arrived without the header's end.
    parser = XmlStreamParser()
    events = drip(parser, HEADER[:-1] + b" from='" + b"a" * 300_000, piece=3)
    (error,) = [e for e in events if isinstance(e, XmlError)]
    assert error.condition == "policy-violation" and "stream header" in error.text and "8192" in error.text
    # In one piece: the same rule (the header's '>' must be within the first 8 KiB).
    events = XmlStreamParser().feed(HEADER[:-1] + b" from='" + b"a" * 9000 + b"'>")
    assert [type(e) for e in events] == [XmlError] and "8192" in events[0].text
    # A large but legal header passes: two 1023-octet domains.
    big = HEADER[:-1] + b" from='" + b"a" * 1023 + b"' id='" + b"i" * 1023 + b"'>"
    assert isinstance(XmlStreamParser().feed(big)[0], StreamOpened)
