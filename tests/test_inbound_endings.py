"""How an inbound stream ends, in memory (proxy/inbound.py `InboundSession`, proxy/bounce.py).

RFC 6120 §4.4 when the backend closes first, undeliverable stanzas answered with an error
(RFC 6120 §8.3) when the backend's connection is lost, the backend's whitespace keepalives,
the drain's end, a backend that never answers — and, as a property over any order of those
events: every stanza the peer sent on an authenticated stream is delivered, answered or
counted; nothing is sent to a side after its closing tag; the session closes once, never as
internal-error.
"""
from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.bounce import elements_in, error_reply, needs_error_reply
from proxy.inbound_session import (
    BACKEND_GONE_LIMIT, BACKEND_GONE_QUIET, CLOSE_GRACE, Close, InboundSession, PeerGrace, SendToBackend,
    SendToPeer,
)
from proxy.tls import TlsInfo
from proxy.xmlstream import STREAM_CLOSE, Element, XmlStreamParser

LOCAL, PEER = "b.example", "a.example"
HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' "
          b"xmlns:db='jabber:server:dialback' from='a.example' to='b.example' version='1.0'>")
BACKEND_HEADER = (b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' "
                  b"xmlns:db='jabber:server:dialback' id='x' from='b.example'><stream:features/>")
DB_RESULT = b"<db:result from='a.example' to='b.example'>k</db:result>"
DB_VALID = b"<db:result xmlns:db='jabber:server:dialback' from='b.example' to='a.example' type='valid'/>"


def message(n: int, type_: str = "chat") -> bytes:
    return f"<message from='j@a.example/r' to='r@b.example' id='m{n}' type='{type_}'><body>{n}</body></message>".encode()


def authenticated() -> InboundSession:
    """A session relaying for the pair a.example -> b.example."""
    s = InboundSession([LOCAL])
    s.peer_data(HEADER)
    s.peer_data(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    s.tls_established(TlsInfo("1.3", "TLSv1.3", None, None, None, ()))
    s.peer_data(HEADER)
    s.backend_connected()
    s.backend_data(BACKEND_HEADER)
    s.peer_data(DB_RESULT)
    s.verdict(PEER, LOCAL, True, "ok")
    s.backend_data(DB_VALID)
    assert s.authenticated == {(PEER, LOCAL)}
    return s


def to_peer(actions) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, SendToPeer))


def to_backend(actions) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, SendToBackend))


def test_backend_close_first_keeps_relaying_until_the_peer_closes():
    s = authenticated()
    actions = s.backend_data(b"</stream:stream>")
    assert actions == [SendToPeer(STREAM_CLOSE), PeerGrace(None, CLOSE_GRACE)]
    # RFC 6120 §4.4: the backend still reads; what the peer had under way reaches it.
    assert s.peer_data(message(1)) == [SendToBackend(message(1))]
    actions = s.peer_data(message(2) + b"</stream:stream>")
    assert to_backend(actions) == message(2) + STREAM_CLOSE
    assert actions[-1] == Close("the backend closed the stream, then the peer", None, "ok")
    assert s.ending == actions[-1] and to_peer(actions) == b""


def test_backend_close_first_and_a_peer_that_never_closes():
    s = authenticated()
    s.backend_data(b"</stream:stream>")
    actions = s.grace_over()
    assert actions[0] == SendToBackend(STREAM_CLOSE) and actions[-1].outcome == "ok"
    assert "did not close its own in time" in actions[-1].reason


def test_backend_lost_stanzas_come_back_as_service_unavailable():
    s = authenticated()
    assert s.backend_eof("Connection reset by peer") == [PeerGrace(BACKEND_GONE_QUIET, BACKEND_GONE_LIMIT)]
    (reply,) = s.peer_data(message(7))
    assert b"<message from='r@b.example' to='j@a.example/r' id='m7' type='error'>" in reply.data
    assert b"<service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>" in reply.data
    assert b"Connection reset by peer" in reply.data
    # No error for an error, none for an iq result (RFC 6120 §8.3.1).
    assert s.peer_data(message(8, "error")) == []
    assert s.peer_data(b"<iq from='a.example' to='b.example' id='q' type='result'/>") == []
    actions = s.grace_over()
    assert b"remote-connection-failed" in to_peer(actions)
    close = actions[-1]
    assert close.outcome == "remote-connection-failed" and "1 stanzas returned" in close.reason
    assert s.returned == 1 and s.undeliverable == 0


def test_a_pairs_later_stanzas_go_as_one_buffer_and_come_back_one_by_one_once_the_backend_is_gone():
    """Issue 13's fast path: after one stanza of a pair passed, a read of more of them is one
    SendToBackend with exactly their bytes; a stanza of a pair not authenticated still ends
    the stream; once the backend is lost, routed stanzas are answered one by one again."""
    s = authenticated()
    assert s.peer_data(message(1)) == [SendToBackend(message(1))]      # the slow path, once
    burst = message(2) + message(3) + b"<presence from='a.example' to='b.example'/>" + message(4)
    actions = s.peer_data(burst)
    assert actions == [SendToBackend(burst)]
    assert s._peer_parser.routes == {("message", "a.example", "b.example"): True,
                                     ("presence", "a.example", "b.example"): True}
    assert s.backend_eof("gone") == [PeerGrace(BACKEND_GONE_QUIET, BACKEND_GONE_LIMIT)]
    replies = s.peer_data(message(5) + message(6))
    assert [b"id='m5' type='error'" in replies[0].data, b"id='m6' type='error'" in replies[0].data] == [True, True]
    assert to_backend(replies) == b"" and s.returned == 2
    s2 = authenticated()
    s2.peer_data(message(1))
    stray = b"<message from='x@c.example' to='r@b.example'/>"
    actions = s2.peer_data(message(2) + stray)
    assert to_backend(actions) == message(2) + STREAM_CLOSE   # the stray one never
    assert actions[-1].condition == "invalid-from"


def test_a_failed_send_to_the_backend_answers_what_it_carried():
    s = authenticated()
    sent = s.peer_data(message(1) + message(2))
    actions = s.backend_send_failed(to_backend(sent), "Broken pipe")
    ids = re.findall(rb"id='(m\d)' type='error'", to_peer(actions))
    assert ids == [b"m1", b"m2"] and s.state == "backend-gone"


def test_whitespace_keepalive_from_the_backend_is_passed_on():
    s = authenticated()
    assert s.backend_data(b" \n ") == [SendToPeer(b" ")]
    assert s.backend_data(b"<message from='r@b.example' to='j@a.example'") == []   # mid-element
    assert to_peer(s.backend_data(b"/> ")) == b"<message from='r@b.example' to='j@a.example'/>"


def test_whitespace_before_the_backend_header_is_not_passed_on():
    s = InboundSession([LOCAL])
    s.peer_data(HEADER)
    s.peer_data(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    s.tls_established(TlsInfo("1.3", "TLSv1.3", None, None, None, ()))
    s.peer_data(HEADER)
    s.backend_connected()
    # (The peer's next bytes must be an XML declaration: no whitespace may come first.)
    assert s.backend_data(b"\n") == []


def test_drain_end_closes_the_backend_stream_as_system_shutdown():
    s = authenticated()
    assert b"system-shutdown" in to_peer(s.shutdown())
    actions = s.stopped()
    assert actions[0] == SendToBackend(STREAM_CLOSE)
    assert actions[-1].outcome == "system-shutdown" and to_peer(actions) == b""
    s = authenticated()
    actions = s.stopped()
    assert b"system-shutdown" in to_peer(actions) and to_backend(actions) == STREAM_CLOSE


def test_backend_that_sends_no_header():
    s = InboundSession([LOCAL])
    s.peer_data(HEADER)
    s.peer_data(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    s.tls_established(TlsInfo("1.3", "TLSv1.3", None, None, None, ()))
    s.peer_data(HEADER)
    s.backend_connected()
    actions = s.backend_silent(6)
    assert b"<stream:stream" in to_peer(actions) and b"remote-connection-failed" in to_peer(actions)
    assert b"sent no stream header within 6 s" in to_peer(actions)
    assert actions[-1].outcome == "remote-connection-failed"
    s2 = authenticated()
    assert s2.backend_silent(6) == []


def test_bounce_helpers():
    (el,) = elements_in(message(3), HEADER, 65536)
    assert needs_error_reply(el)
    assert b"id='m3'" in error_reply(el, "why")
    # With the header in front (the first bytes to the backend), and a close behind.
    found = elements_in(b"<?xml version='1.0'?>" + HEADER[21:] + message(4) + STREAM_CLOSE, b"", 65536)
    assert [e.attrs["id"] for e in found] == ["m4"]


# ------------------------------------------------------------------------------ the property

EVENTS = st.lists(st.sampled_from([
    "stanza", "stanza", "stanza", "result", "backend-close", "backend-eof", "backend-send-failed",
    "peer-close", "peer-eof", "grace-over", "shutdown", "stopped", "keepalive", "backend-stanza",
]), max_size=25)


@settings(max_examples=300, deadline=None)
@given(EVENTS)
def test_every_stanza_is_accounted_for_and_no_side_hears_after_its_close(events):
    s = authenticated()
    sent: list[str] = []
    delivered: list[str] = []
    answered: list[str] = []
    peer_closed = backend_closed = False
    closes = []
    n = 0

    def perform(actions):
        nonlocal peer_closed, backend_closed
        for a in actions:
            if isinstance(a, SendToPeer):
                assert not peer_closed, ("sent to the peer after our close", events)
                answered.extend(m.decode() for m in re.findall(rb"id='(m\d+)' type='error'", a.data))
                if a.data.endswith(STREAM_CLOSE):
                    peer_closed = True
            elif isinstance(a, SendToBackend):
                assert not backend_closed, ("sent to the backend after its close", events)
                for el in XmlStreamParser().feed(HEADER + a.data):
                    if isinstance(el, Element) and el.name == "message":
                        delivered.append(el.attrs["id"])
                if a.data.endswith(STREAM_CLOSE):
                    backend_closed = True
            elif isinstance(a, Close):
                closes.append(a)

    for event in events:
        if s.closed:
            break
        if event in ("stanza", "result"):
            n += 1
            data = message(n, "chat" if event == "stanza" else "error")
            if event == "stanza" and s.reading_peer:
                sent.append(f"m{n}")
            if s.reading_peer:
                perform(s.peer_data(data))
        elif event == "backend-close":
            perform(s.backend_data(b"</stream:stream>"))
        elif event == "backend-eof":
            perform(s.backend_eof("reset"))
        elif event == "backend-send-failed":
            n += 1
            data = message(n)
            if s.reading_peer:
                actions = s.peer_data(data)
                sent.append(f"m{n}")
                if to_backend(actions):
                    # The send of exactly these bytes failed.
                    perform([a for a in actions if not isinstance(a, SendToBackend)])
                    perform(s.backend_send_failed(to_backend(actions), "broken pipe"))
                else:
                    perform(actions)
        elif event == "peer-close":
            if s.reading_peer:
                perform(s.peer_data(b"</stream:stream>"))
        elif event == "peer-eof":
            perform(s.peer_eof())
        elif event == "grace-over":
            perform(s.grace_over())
        elif event == "shutdown":
            perform(s.shutdown())
        elif event == "stopped":
            perform(s.stopped())
        elif event == "keepalive":
            perform(s.backend_data(b" "))
        elif event == "backend-stanza":
            perform(s.backend_data(b"<message from='r@b.example' to='j@a.example/r'/>"))
    if not s.closed:
        perform(s.stopped())
    assert len(closes) == 1 and closes[0].outcome != "internal-error"
    assert s.ending is closes[0]
    # Every stanza: delivered, answered with an error, or counted as undeliverable.
    unaccounted = [m for m in sent if m not in delivered and m not in answered]
    assert len(unaccounted) == s.undeliverable, (unaccounted, s.undeliverable, events)
    assert not set(delivered) & set(answered)
