"""The outbound protocol in memory (DESIGN §3.2, §3.3): `proxy.outbound_session.OutboundSession`
answering the backend's stream itself, and `proxy.outbound_auth.PeerAuthentication`
authenticating the backend's domain to the peer (SASL EXTERNAL, else the proxy's own dialback key).

No sockets: the backend is bytes fed to the session; the peer is `ScriptedPeer`, which parses
what the session sends it and answers as a server would (its stream header, features offering
EXTERNAL or not, `<success/>`/`<failure/>`, dialback answers).  Hypothesis drives random
backends and peers against the invariants: nothing from the backend reaches a peer that was not
accepted; the backend's dialback keys never reach the peer; a `<db:verify>` with the proxy's
key is answered locally and opens no connection; any other key is never answered valid by the
proxy; stanzas reach the peer only for a pair answered valid.
"""
from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.dialback_keys import DialbackKeys
from proxy.outbound_session import OutboundSession
from proxy.s2s_auth import element_text
from proxy.xmlstream import NS_DIALBACK, NS_SERVER, Element, StreamOpened, XmlStreamParser, stream_header

LOCAL, OTHER_LOCAL, PEER = "home.example", "second.example", "peer.test"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
DB = f"xmlns:db='{NS_DIALBACK}'"
BACKEND_KEY = "backend-own-dialback-key-0123456789"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def session(keys: DialbackKeys | None = None, clock: Clock | None = None, **kw) -> OutboundSession:
    return OutboundSession(local_domains=[LOCAL, OTHER_LOCAL], keys=keys or DialbackKeys(b"k" * 32),
                           clock=clock or Clock(), handshake_timeout=30.0, answer_timeout=20.0, **kw)


def backend_header(to: str | None = PEER, from_: str | None = LOCAL) -> bytes:
    return stream_header(to=to, from_=from_)


def db_result(frm=LOCAL, to=PEER, key=BACKEND_KEY) -> bytes:
    return f"<db:result {DB} from='{frm}' to='{to}'>{key}</db:result>".encode()


def db_verify(frm=LOCAL, to=PEER, id="in-1", key="k") -> bytes:
    return f"<db:verify {DB} from='{frm}' to='{to}' id='{id}'>{key}</db:verify>".encode()


def message(frm=f"a@{LOCAL}", to=f"b@{PEER}", body="hello") -> bytes:
    return f"<message from='{frm}' to='{to}' type='chat'><body>{body}</body></message>".encode()


def parse_all(data: bytes) -> tuple[list[StreamOpened], list[Element]]:
    p = XmlStreamParser()
    if not data.startswith(b"<?xml") and not data.startswith(b"<stream:stream"):
        p.feed(stream_header(id="x"))
    headers, elements = [], []
    for e in p.feed(data):
        if isinstance(e, StreamOpened):
            headers.append(e)
        elif isinstance(e, Element):
            elements.append(e)
    return headers, elements


class ScriptedPeer:
    """A peer server on the proxy's stream: reads what the session sends, answers like one.

    `external`: offer EXTERNAL; `sasl`: "success" or "failure"; `result`: the dialback answer
    ("valid", "invalid", "error"); verifies are answered `verify_answer`."""

    def __init__(self, *, external=True, sasl="success", result="valid", verify_answer="invalid",
                 keys: DialbackKeys | None = None) -> None:
        self.external, self.sasl, self.result, self.verify_answer = external, sasl, result, verify_answer
        self.received = bytearray()
        self.parser = XmlStreamParser(stop_after=lambda el: el.is_(NS_SASL, "auth") and self.sasl == "success")
        self.streams = 0
        self.stream_id = ""
        self.auths: list[str] = []
        self.results: list[tuple[str, str, str]] = []    # (from, key, stream id it was sent on)
        self.verifies: list[Element] = []
        self.keys = keys

    def receive(self, data: bytes) -> bytes:
        self.received += data
        out = b""
        events = self.parser.feed(data)
        while True:
            for event in events:
                if isinstance(event, StreamOpened):
                    self.streams += 1
                    self.stream_id = f"peer-{self.streams}"
                    mech = (f"<mechanisms xmlns='{NS_SASL}'><mechanism>EXTERNAL</mechanism></mechanisms>"
                            if self.external and self.streams == 1 else "")
                    out += stream_header(from_=PEER, id=self.stream_id) + (
                        f"<stream:features>{mech}<dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>"
                        f"</stream:features>").encode()
                elif isinstance(event, Element):
                    if event.is_(NS_SASL, "auth"):
                        self.auths.append(base64.b64decode(element_text(event)).decode())
                        out += (f"<success xmlns='{NS_SASL}'/>" if self.sasl == "success" else
                                f"<failure xmlns='{NS_SASL}'><not-authorized/><text>untrusted issuer</text>"
                                f"</failure>").encode()
                    elif event.is_(NS_DIALBACK, "result"):
                        frm = event.attrs["from"]
                        self.results.append((frm, element_text(event), self.stream_id))
                        if self.result == "error":
                            out += (f"<db:result {DB} from='{PEER}' to='{frm}' type='error'><error type='cancel'>"
                                    f"<remote-server-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
                                    f"</error></db:result>").encode()
                        else:
                            out += f"<db:result {DB} from='{PEER}' to='{frm}' type='{self.result}'/>".encode()
                    elif event.is_(NS_DIALBACK, "verify"):
                        self.verifies.append(event)
                        out += (f"<db:verify {DB} from='{PEER}' to='{event.attrs['from']}' id='{event.attrs['id']}' "
                                f"type='{self.verify_answer}'/>").encode()
            if self.parser.state != "stopped":
                return out
            trailing = self.parser.trailing
            self.parser = XmlStreamParser()
            events = self.parser.feed(trailing)


def converse(s: OutboundSession, peer: ScriptedPeer, to_peer: bytes) -> bytes:
    """Carry bytes between session and scripted peer until quiet; what the backend got."""
    to_backend = b""
    while to_peer and s.state != "closed":
        reply = peer.receive(to_peer)
        out = s.peer_data(reply) if reply else None
        if out is None:
            break
        to_backend += out.to_backend
        to_peer = out.to_peer
    return to_backend


# =============================================================================== the backend's stream

def test_the_backends_header_is_answered_locally_with_dialback_and_no_connection():
    s = session()
    out = s.backend_data(backend_header())
    assert out.connect is None and out.to_peer == b"" and not out.close
    (header,), (features,) = parse_all(out.to_backend)
    assert (header.from_, header.to, header.version) == (PEER, LOCAL, "1.0") and len(header.id) >= 16
    assert header.namespaces.get("db") == NS_DIALBACK
    # Dialback only: no STARTTLS (the hop is plaintext loopback), no SASL mechanisms.
    assert [(c.ns, c.name) for c in features.children] == [("urn:xmpp:features:dialback", "dialback")]
    assert features.children[0].find("urn:xmpp:features:dialback", "errors") is not None
    assert session().backend_data(backend_header()).to_backend != out.to_backend   # a fresh id each time


@pytest.mark.parametrize("to, from_, text", [
    (PEER, "stranger.example", "stranger.example is not a [[domain]] of this proxy"),
    (PEER, None, "no 'from'"),
    (None, LOCAL, "no 'to'"),
])
def test_bad_headers_get_host_unknown(to, from_, text):
    out = session().backend_data(backend_header(to, from_))
    assert out.close and out.outcome == "host-unknown" and out.connect is None
    assert b"<host-unknown " in out.to_backend and text.encode() in out.to_backend


def test_a_verify_of_the_proxys_own_key_is_answered_locally():
    keys = DialbackKeys(b"s" * 32)
    s = session(keys)
    s.backend_data(backend_header())
    key = keys.mint(receiving=LOCAL, originating=PEER, stream_id="backend-in-7")
    out = s.backend_data(db_verify(id="backend-in-7", key=key))
    assert out.connect is None and out.to_peer == b"" and not out.close
    (answer,) = parse_all(out.to_backend)[1]
    assert answer.is_(NS_DIALBACK, "verify")
    assert dict(answer.attrs) == {"from": PEER, "to": LOCAL, "id": "backend-in-7", "type": "valid"}
    assert s.local_answers == 1 and s.peer is None
    assert ("dialback-answered-locally", {"local": LOCAL, "domain": PEER}) in out.events
    # ejabberd's verification stream then ends: nothing ever went to the peer.
    out = s.backend_data(b"</stream:stream>")
    assert out.close and out.outcome == "ok" and out.to_backend == b"</stream:stream>" and out.to_peer == b""


@pytest.mark.parametrize("case", ["forged", "other-pair", "other-id", "other-secret", "second-local"])
def test_any_other_key_is_asked_of_the_peer_and_not_answered_valid_here(case):
    keys = DialbackKeys(b"s" * 32)
    s = session(keys)
    s.backend_data(backend_header())
    key = {
        "forged": "ab" * 32,
        "other-pair": keys.mint(receiving=LOCAL, originating="elsewhere.test", stream_id="in-1"),
        "other-id": keys.mint(receiving=LOCAL, originating=PEER, stream_id="in-2"),
        "other-secret": DialbackKeys(b"t" * 32).mint(receiving=LOCAL, originating=PEER, stream_id="in-1"),
        "second-local": keys.mint(receiving=OTHER_LOCAL, originating=PEER, stream_id="in-1"),
    }[case]
    out = s.backend_data(db_verify(id="in-1", key=key))
    assert b"type='valid'" not in out.to_backend and out.to_backend == b""
    assert out.connect is not None and out.connect.peer_domain == PEER and out.connect.local_domain == LOCAL
    # Relayed once the peer is there; the peer's answer goes back.
    peer = ScriptedPeer(external=False)
    got = converse(s, peer, s.peer_accepted())
    (verify,) = peer.verifies
    assert element_text(verify) == key and verify.attrs["id"] == "in-1"
    (answer,) = parse_all(got)[1]
    assert dict(answer.attrs) == {"from": PEER, "to": LOCAL, "id": "in-1", "type": "invalid"}
    assert peer.results == [] and peer.auths == []      # a verify authenticates nothing


# =============================================================================== authenticating to the peer

def _connected(s: OutboundSession, peer: ScriptedPeer) -> bytes:
    s.backend_data(backend_header())
    out = s.backend_data(db_result())
    assert out.connect is not None and out.to_peer == b"" and out.to_backend == b""
    first = s.peer_accepted()
    (header,) = parse_all(first)[0]
    assert (header.from_, header.to) == (LOCAL, PEER)
    return converse(s, peer, first)


def test_external_when_offered_then_a_restart_then_valid_to_the_backend():
    s, peer = session(), ScriptedPeer(external=True, sasl="success")
    got = _connected(s, peer)
    assert peer.auths == [LOCAL] and peer.streams == 2 and peer.results == []
    (answer,) = parse_all(got)[1]
    assert dict(answer.attrs) == {"from": PEER, "to": LOCAL, "type": "valid"}
    assert BACKEND_KEY.encode() not in peer.received
    # Stanzas of the pair now pass, byte for byte.
    out = s.backend_data(message())
    assert out.to_peer == message()


def test_external_refused_falls_back_to_the_proxys_own_dialback_key():
    keys = DialbackKeys(b"s" * 32)
    s, peer = session(keys), ScriptedPeer(external=True, sasl="failure", result="valid")
    got = _connected(s, peer)
    assert peer.auths == [LOCAL]
    ((frm, key, stream_id),) = peer.results
    # XEP-0185: bound to D receiving from L on D's stream id -- our inbound side checks it.
    assert frm == LOCAL and stream_id == "peer-1" and key == keys.mint(receiving=PEER, originating=LOCAL,
                                                                        stream_id="peer-1")
    assert key != BACKEND_KEY and BACKEND_KEY.encode() not in peer.received
    assert b"type='valid'" in got


def test_no_external_offered_means_dialback_at_once():
    s, peer = session(), ScriptedPeer(external=False, result="valid")
    got = _connected(s, peer)
    assert peer.auths == [] and len(peer.results) == 1 and b"type='valid'" in got


@pytest.mark.parametrize("answer, reason", [
    ("invalid", "answered <db:result type='invalid'> for home.example"),
    ("error", "refused home.example by dialback: remote-server-not-found"),
])
def test_a_refusal_reaches_the_backend_as_not_authorized_with_the_reason(answer, reason):
    s, peer = session(), ScriptedPeer(external=True, sasl="failure", result=answer)
    s.backend_data(backend_header())
    s.backend_data(db_result())
    to_peer = s.peer_accepted()
    to_backend = b""
    while to_peer and s.state != "closed":
        out = s.peer_data(peer.receive(to_peer))
        to_backend += out.to_backend
        to_peer = out.to_peer
        last = out
    assert last.close and last.outcome == "not-authorized" and last.to_peer.endswith(b"</stream:stream>")
    assert b"<not-authorized " in to_backend
    assert reason.replace("<", "&lt;").replace(">", "&gt;").encode() in to_backend
    assert b"SASL EXTERNAL refused by peer.test (not-authorized: untrusted issuer)" in to_backend
    assert any(e == "peer-refused-authentication" for e, _ in last.events)


def test_a_second_local_domain_uses_dialback_even_after_external():
    s, peer = session(), ScriptedPeer(external=True, sasl="success")
    _connected(s, peer)
    out = s.backend_data(db_result(frm=OTHER_LOCAL))
    got = converse(s, peer, out.to_peer)
    assert peer.auths == [LOCAL] and [r[0] for r in peer.results] == [OTHER_LOCAL]
    assert peer.results[0][2] == "peer-2"            # the restarted stream's id
    (answer,) = parse_all(got)[1]
    assert dict(answer.attrs) == {"from": PEER, "to": OTHER_LOCAL, "type": "valid"}


def test_questions_while_connecting_wait_for_the_peers_features():
    s, peer = session(), ScriptedPeer(external=False)
    s.backend_data(backend_header())
    assert s.backend_data(db_result()).connect is not None
    out = s.backend_data(db_verify(key="x"))
    assert out.connect is None and out.to_peer == b""          # one connection per stream
    first = s.peer_accepted()
    assert b"<db:" not in first                                 # only our header until features
    got = converse(s, peer, first)
    assert len(peer.results) == 1 and len(peer.verifies) == 1
    assert got.count(b"<db:") == 2


# =============================================================================== the gate

@pytest.mark.parametrize("stanza", [
    message(),                                        # before its pair is authenticated
    message(frm=f"a@{OTHER_LOCAL}"),
])
def test_stanzas_before_their_pair_is_accepted_are_refused(stanza):
    s, peer = session(), ScriptedPeer()
    s.backend_data(backend_header())
    out = s.backend_data(stanza)
    assert out.close and out.outcome == "not-authorized" and out.to_peer == b"" and out.connect is None
    s2 = session()
    _connected(s2, peer)
    if stanza == message():
        return
    out = s2.backend_data(stanza)                     # L accepted, OTHER_LOCAL not
    assert out.close and stanza not in out.to_peer and out.to_peer == b"</stream:stream>"


def test_stanzas_to_another_domain_and_backend_sasl_are_refused():
    s = session()
    _connected(s, ScriptedPeer())
    out = s.backend_data(message(to="b@elsewhere.test"))
    assert out.close and out.outcome == "policy-violation" and b"only peer.test was verified" in out.to_backend
    s = session()
    s.backend_data(backend_header())
    out = s.backend_data(f"<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>=</auth>".encode())
    assert out.close and b"<unsupported-stanza-type " in out.to_backend and out.connect is None


def test_dialback_for_another_peer_or_a_foreign_local_is_refused():
    s = session()
    s.backend_data(backend_header())
    out = s.backend_data(db_result(to="elsewhere.test"))
    assert out.close and out.outcome == "policy-violation" and out.connect is None
    s = session()
    s.backend_data(backend_header())
    out = s.backend_data(db_result(frm="stranger.example"))
    assert out.close and out.outcome == "invalid-from" and out.connect is None


@pytest.mark.parametrize("stanza", [
    b"<message from='x@peer.test' to='y@home.example'/>",
    b"<db:request xmlns:db='jabber:server:dialback' from='peer.test' to='home.example'/>",
    b"<db:result xmlns:db='jabber:server:dialback' from='peer.test' to='second.example' type='valid'/>",
    b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>",            # no <auth/> of ours pending
    b"<enabled xmlns='urn:xmpp:sm:3'/>",                               # nothing enabled SM
])
def test_the_peer_only_answers(stanza):
    s = session()
    _connected(s, ScriptedPeer())
    out = s.peer_data(stanza)
    assert out.close and b"<unsupported-stanza-type " in out.to_peer and b"<remote-connection-failed " in out.to_backend
    assert stanza not in out.to_backend


def test_backend_starttls_gets_failure():
    s = session()
    s.backend_data(backend_header())
    out = s.backend_data(f"<starttls xmlns='{NS_TLS}'/>".encode())
    assert out.to_backend.startswith(f"<failure xmlns='{NS_TLS}'/>".encode()) and out.close
    assert out.notes and "s2s_require_encryption = false" in out.notes[0]


# =============================================================================== time and endings

def test_deadlines_header_first_question_and_answers():
    clock = Clock()
    s = session(clock=clock)
    assert s.deadline == 1030.0
    clock.now = 1030.0
    out = s.tick(clock.now)
    assert out.close and b"<connection-timeout " in out.to_backend and b"no stream header within 30 s" in out.to_backend

    clock = Clock()
    s = session(clock=clock)
    s.backend_data(backend_header())
    s.backend_data(db_result())
    assert s.deadline is None                   # connecting: bounded by proxy.connect's timeouts
    s.peer_accepted()
    s.peer_data(stream_header(from_=PEER, id="p1") + b"<stream:features/>")    # dialback sent now
    assert s.deadline == 1020.0
    clock.now = 1019.0
    assert not s.tick(clock.now).close
    clock.now = 1020.0
    out = s.tick(clock.now)
    assert out.close and out.outcome == "remote-connection-failed" and out.to_peer == b"</stream:stream>"
    assert b"did not answer &lt;db:result&gt; for home.example within 20 s" in out.to_backend


def test_shutdown_and_closing():
    s = session()
    s.backend_data(backend_header())
    out = s.shutdown()
    assert b"<system-shutdown " in out.to_backend and out.close and out.to_peer == b""
    s = session()
    _connected(s, ScriptedPeer())
    out = s.backend_data(b"</stream:stream>")
    assert out.to_peer == b"</stream:stream>" and not out.close and s.closing
    out = s.peer_data(b"</stream:stream>")
    assert out.to_backend == b"</stream:stream>" and out.close and out.outcome == "ok"


def test_too_many_questions_are_bounded():
    s = session(max_questions=3)
    s.backend_data(backend_header())
    for i in range(3):
        assert not s.backend_data(db_verify(id=f"i{i}")).close
    out = s.backend_data(db_verify(id="i9"))
    assert out.close and b"more than 3 dialback questions" in out.to_backend


# =============================================================================== invariants

backend_items = st.sampled_from(["result", "result-other", "verify-ours", "verify-ours-other-id",
                                 "verify-forged", "message", "message-other", "space", "close"])


@given(items=st.lists(backend_items, max_size=10), external=st.booleans(), sasl=st.sampled_from(["success", "failure"]),
       result=st.sampled_from(["valid", "invalid", "error"]), verify_answer=st.sampled_from(["valid", "invalid"]),
       accept=st.booleans(), cuts=st.lists(st.integers(1, 40), max_size=6))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_invariants_of_a_random_backend_and_peer(items, external, sasl, result, verify_answer, accept, cuts):
    keys = DialbackKeys(b"i" * 32)
    ours = keys.mint(receiving=LOCAL, originating=PEER, stream_id="in-ours")
    backend_bytes = {
        "result": db_result(), "result-other": db_result(frm=OTHER_LOCAL, key="other-backend-key"),
        "verify-ours": db_verify(id="in-ours", key=ours),
        "verify-ours-other-id": db_verify(id="in-else", key=ours),
        "verify-forged": db_verify(id="in-ours", key="cd" * 32),
        "message": message(body="m-local"), "message-other": message(frm=f"a@{OTHER_LOCAL}", body="m-other"),
        "space": b"  ", "close": b"</stream:stream>",
    }
    s = session(keys)
    peer = ScriptedPeer(external=external, sasl=sasl, result=result, verify_answer=verify_answer)
    to_backend = bytearray()
    peer_bytes = bytearray()
    peer_up = False
    valid_answered: set[str] = set()

    def feed_backend(data: bytes) -> None:
        nonlocal peer_up
        # Chunked as a TCP stream might deliver it.
        pieces, rest = [], data
        for cut in cuts:
            if len(rest) <= cut:
                break
            pieces.append(rest[:cut])
            rest = rest[cut:]
        pieces.append(rest)
        for piece in pieces:
            out = s.backend_data(piece)
            handle(out)

    def handle(out) -> None:
        nonlocal peer_up
        if not peer_up:
            assert out.to_peer == b"", "bytes for a peer that was not accepted"
        to_backend.extend(out.to_backend)
        for _, el in enumerate(parse_all(out.to_backend)[1] if out.to_backend.lstrip().startswith(b"<db:") else []):
            if el.is_(NS_DIALBACK, "result") and el.attrs.get("type") == "valid":
                valid_answered.add(el.attrs["to"])
        if out.to_peer:
            # Stanzas reach the peer only for a pair answered valid to the backend before.
            if b"m-local" in out.to_peer:
                assert LOCAL in valid_answered
            if b"m-other" in out.to_peer:
                assert OTHER_LOCAL in valid_answered
            peer_bytes.extend(out.to_peer)
            reply = peer.receive(out.to_peer)
            if reply and s.state != "closed":
                handle(s.peer_data(reply))
        if out.connect is not None and s.state != "closed":
            if accept:
                peer_up = True
                first = s.peer_accepted()
                peer_bytes.extend(first)
                reply = peer.receive(first)
                if reply:
                    handle(s.peer_data(reply))
            else:
                to_backend.extend(s.refuse("remote-connection-failed", "no server of peer.test was accepted"))

    handle(s.backend_data(backend_header()))
    for item in items:
        if s.state == "closed":
            break
        feed_backend(backend_bytes[item])
    # The backend's own dialback keys never reach the peer; neither does anything if refused.
    assert BACKEND_KEY.encode() not in peer_bytes and b"other-backend-key" not in peer_bytes
    if not accept:
        assert peer_bytes == b""
    # A verify of the proxy's key: answered valid locally, never sent to the peer.
    answers = [el for el in parse_all(bytes(to_backend))[1] if el.is_(NS_DIALBACK, "verify")]
    assert ours.encode() not in peer_bytes or "verify-ours-other-id" in items
    for el in answers:
        if el.attrs.get("type") == "valid" and el.attrs.get("id") == "in-ours":
            # valid for id in-ours: the proxy's own key, or the peer said so for the forged one
            assert "verify-ours" in items or verify_answer == "valid"
        if el.attrs.get("type") == "valid" and el.attrs.get("id") == "in-else":
            assert verify_answer == "valid"           # the proxy itself never says so
    if set(items) <= {"verify-ours", "space"}:
        assert s.peer is None                       # local answers open no connection


def test_stanza_addresses_are_read_once_like_the_pairs():
    s = session()
    _connected(s, ScriptedPeer())
    # The same domains written otherwise still belong to the accepted pair...
    out = s.backend_data(message(frm=f"a@{LOCAL.upper()}/r@x", to=f"b@{PEER}."))
    assert not out.close and out.to_peer.startswith(b"<message")
    # ...a domain with two readings does not.
    out = s.backend_data(message(frm="a@stra\u00dfe.example"))
    assert out.close and b"<improper-addressing " in out.to_backend and b"<message" not in out.to_peer
    assert out.outcome == "policy-violation"          # its metrics series
