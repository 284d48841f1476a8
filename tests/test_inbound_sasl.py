"""Authentication at the proxy on the inbound side (DESIGN §3.3), against the running proxy.

A peer driven from Python (plain TCP, STARTTLS, client certificates from tests/pki.py) talks
to the proxy; a scripted backend (`FakeBackend`) records every byte.  Covered:

* SASL EXTERNAL offered only with a client certificate and `inbound.sasl_external`; judged
  with the same verdict as `<db:result>` (same decision line); on success the peer restarts,
  the backend gets a `<db:result>` whose key the proxy's own `DialbackKeys` recognises, and
  stanzas wait for the backend's `valid`; on failure `<failure>` and nothing at the backend.
* Key swap: a `<db:result>` accepted by DANE reaches the backend with the proxy's key, one
  accepted under `require = "tls"` with the peer's.
* Local answers: a peer's `<db:verify>` of a key the proxy minted is answered by the proxy.
"""
from __future__ import annotations

import base64
import dataclasses
import logging
import re

import pytest
import trio

from proxy.inbound_auth import BACKEND_REFUSED_KEY
from proxy.s2s_auth import NS_SASL, element_text
from proxy.xmlstream import NS_DIALBACK, NS_STREAMS, Element, StreamOpened, XmlStreamParser
from test_inbound_openssl import (
    LOCAL, PEER, FakeBackend, Peer, db_result, decisions, log_lines, make_config, running_proxy, stream_error_of,
    tlsa_311, world,  # noqa: F401  (a fixture)
)

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

BACKEND_ID = "backend-stream-1"     # FakeBackend's stream id
MESSAGE = b"<message from='juliet@a.example/x' to='romeo@b.example' id='m1'><body>held</body></message>"


def auth(payload: str = "=", mechanism: str = "EXTERNAL") -> bytes:
    return f"<auth xmlns='{NS_SASL}' mechanism='{mechanism}'>{payload}</auth>".encode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def config_for(world, backend, tmp_path, *, sasl_external: bool = True, **kwargs):
    config = make_config(world, f"127.0.0.1:{backend.port}", tmp_path, **kwargs)
    return dataclasses.replace(config, inbound=dataclasses.replace(config.inbound, sasl_external=sasl_external))


def mechanisms(features: Element) -> list[str]:
    offer = features.find(NS_SASL, "mechanisms")
    if offer is None:
        return []
    texts = re.findall(rb"<mechanism>([^<]*)</mechanism>", features.raw)
    return [t.decode() for t in texts]


def sasl_answer(element: Element) -> tuple[str, str, str]:
    """(name, condition, text) of a `<success/>` or `<failure/>`."""
    assert element.ns == NS_SASL, element.raw
    if element.name == "success":
        return "success", "", ""
    condition = next(c.name for c in element.children if c.name != "text")
    text = re.search(rb"<text[^>]*>(.*?)</text>", element.raw, re.S)
    return element.name, condition, text.group(1).decode() if text else ""


async def restart(peer: Peer, *, from_: str | None = PEER) -> tuple[StreamOpened, Element]:
    """RFC 6120 §6.4.6: after <success/>, a new stream on the same TLS connection."""
    peer.parser, peer.events = XmlStreamParser(), []
    header = await peer.open_stream(from_=from_, dialback_ns=False)
    return header, await peer.expect(Element)


def backend_elements(backend, index: int = 0) -> list[Element]:
    return backend.elements(index)


def run(world, tmp_path, body, *, backend_kwargs=None, **config_kwargs):
    async def main():
        async with FakeBackend(**(backend_kwargs or {})).running() as backend:
            async with running_proxy(config_for(world, backend, tmp_path, **config_kwargs)) as listening:
                await body(listening, backend)

    trio.run(main)


# ================================================================================ SASL EXTERNAL

def test_external_accepted_restart_backend_key_and_held_stanza(world, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="xmpp_dane_proxy")

    async def body(listening, backend):
        keys = listening.server.settings.dialback_keys
        peer = await Peer.connect(listening.inbound[0][1])
        _header, features = await peer.negotiate(world.peer, dialback_ns=False)
        assert mechanisms(features) == ["EXTERNAL"], features.raw   # ours, not the backend's
        await peer.send(auth())
        assert sasl_answer(await peer.expect(Element)) == ("success", "", "")
        header, features = await restart(peer)
        assert header.from_ == LOCAL and header.to == PEER and header.id != BACKEND_ID
        assert features.is_(NS_STREAMS, "features") and not features.children
        # The proxy asserted the pair to the backend with a key of its own, bound to the
        # backend's stream id.
        await backend.wait_for(lambda: any(e.is_(NS_DIALBACK, "result") for e in backend_elements(backend)))
        (result,) = [e for e in backend_elements(backend) if e.is_(NS_DIALBACK, "result")]
        assert (result.attrs["from"], result.attrs["to"]) == (PEER, LOCAL)
        assert keys.is_ours(receiving=LOCAL, originating=PEER, stream_id=BACKEND_ID, key=element_text(result))
        # A stanza now is held: a <db:verify> sent after it (relayed at once) reaches the
        # backend while the stanza does not.
        await peer.send(MESSAGE + b"<db:verify xmlns:db='jabber:server:dialback' from='a.example' to='b.example' "
                                  b"id='x1'>foreign</db:verify>")
        await backend.wait_for(lambda: any(e.is_(NS_DIALBACK, "verify") for e in backend_elements(backend)))
        assert MESSAGE not in backend.connections[0].received
        await backend.streams[0].send_all(b"<db:result from='b.example' to='a.example' type='valid'/>")
        await backend.wait_for(lambda: MESSAGE in backend.connections[0].received)
        await peer.send(b"</stream:stream>")
        received = await peer.until_closed()
        await peer.aclose()
        # The backend's answer was the proxy's: the peer never sees it.
        assert b"db:result" not in received and b"type='valid'" not in received
        upstream = bytes(backend.connections[0].received)
        assert b"xmpp-sasl" not in upstream and b"auth" not in upstream
        assert upstream.index(b"db:verify") < upstream.index(MESSAGE)

    run(world, tmp_path, body, backend_kwargs={"confirm_dialback": False})
    (line,) = decisions(caplog)
    assert "domain=a.example verdict=accept prooftype=pkix" in line
    (note,) = log_lines(caplog, "sasl-external")
    assert "a.example -> b.example authenticated by its certificate (pkix)" in note


def test_external_with_authzid_equal_to_stream_from_and_fake_backend_confirming(world, tmp_path):
    async def body(listening, backend):
        peer = await Peer.connect(listening.inbound[0][1])
        await peer.negotiate(world.peer)
        await peer.send(auth(b64(PEER)))
        assert sasl_answer(await peer.expect(Element))[0] == "success"
        await restart(peer)
        await peer.send(MESSAGE)
        await backend.wait_for(lambda: MESSAGE in backend.connections[0].received)
        await peer.aclose()

    run(world, tmp_path, body)


@pytest.mark.parametrize("policy,reason", [
    ("dane-mismatch", "DANE"),
    ('require = "block"\n', "block"),
])
def test_external_rejected_gets_failure_and_the_backend_only_the_header(world, tmp_path, caplog, policy, reason):
    caplog.set_level(logging.INFO, logger="xmpp_dane_proxy")
    if policy == "dane-mismatch":
        policy = f'require = "dane"\ntlsa = ["{tlsa_311(world.peer_self.issued.cert)}"]\n'

    async def body(listening, backend):
        peer = await Peer.connect(listening.inbound[0][1])
        _header, features = await peer.negotiate(world.stranger, dialback_ns=False)
        assert mechanisms(features) == ["EXTERNAL"]
        await peer.send(auth())
        name, condition, text = sasl_answer(await peer.expect(Element))
        assert (name, condition) == ("failure", "not-authorized")
        assert text.startswith("a.example not authenticated: ")
        # The stream stays up (RFC 6120 §6.4.5 lets the peer retry); a stanza is refused.
        await peer.send(MESSAGE)
        condition, _text = stream_error_of(await peer.until_closed())
        assert condition == "invalid-from"
        await peer.aclose()
        await backend.wait_for(lambda: backend.connections[0].closed)
        assert bytes(backend.connections[0].received) == peer.last_header + b"</stream:stream>"

    run(world, tmp_path, body, policies={PEER: policy})
    (line,) = decisions(caplog)
    assert "verdict=reject" in line and "domain=a.example" in line
    assert reason.lower() in line.lower()
    (note,) = log_lines(caplog, "sasl-external-failure")
    assert "reason=\"not-authorized: a.example not authenticated" in note


@pytest.mark.parametrize("payload,condition,words", [
    (b64("c.example"), "invalid-authzid", "differs from the stream header's 'from' a.example"),
    (b64("juliet@a.example"), "invalid-authzid", "not a bare domain"),
    ("not base64!", "incorrect-encoding", "not base64"),
    (b64("stra\u00dfe.example"), "invalid-authzid", "two domains in one name"),
])
def test_external_malformed_requests_get_their_failure(world, tmp_path, payload, condition, words):
    async def body(listening, backend):
        peer = await Peer.connect(listening.inbound[0][1])
        await peer.negotiate(world.peer)
        await peer.send(auth(payload))
        name, got, text = sasl_answer(await peer.expect(Element))
        assert (name, got) == ("failure", condition) and words in text, text
        # The same stream goes on: a second, good <auth/> succeeds (RFC 6120 §6.4.5 retry).
        await peer.send(auth())
        assert sasl_answer(await peer.expect(Element))[0] == "success"
        await peer.aclose()
        await backend.wait_for(lambda: backend.connections and backend.connections[0].closed)
        assert b"xmpp-sasl" not in backend.connections[0].received

    run(world, tmp_path, body)


def test_other_mechanism_is_invalid_mechanism_and_auth_without_offer_is_a_policy_violation(world, tmp_path):
    async def body(listening, backend):
        port = listening.inbound[0][1]
        peer = await Peer.connect(port)
        await peer.negotiate(world.peer)
        await peer.send(auth(mechanism="PLAIN"))
        assert sasl_answer(await peer.expect(Element))[:2] == ("failure", "invalid-mechanism")
        await peer.aclose()
        # Without a client certificate nothing is offered, and an <auth/> ends the stream.
        peer = await Peer.connect(port)
        _header, features = await peer.negotiate(None)
        assert mechanisms(features) == [] and features.find(NS_SASL, "mechanisms") is None
        await peer.send(auth())
        condition, text = stream_error_of(await peer.until_closed())
        assert condition == "policy-violation" and "SASL was not offered" in text
        await peer.aclose()
        await backend.wait_for(lambda: len(backend.connections) == 2 and all(c.closed for c in backend.connections))
        assert all(b"xmpp-sasl" not in c.received for c in backend.connections)

    run(world, tmp_path, body)


def test_second_auth_after_success_is_a_policy_violation(world, tmp_path):
    async def body(listening, backend):
        peer = await Peer.connect(listening.inbound[0][1])
        await peer.negotiate(world.peer)
        await peer.send(auth())
        assert sasl_answer(await peer.expect(Element))[0] == "success"
        await restart(peer)
        await peer.send(auth())
        condition, text = stream_error_of(await peer.until_closed())
        assert condition == "policy-violation" and "authentication on this stream is over" in text
        await peer.aclose()

    run(world, tmp_path, body)


def test_sasl_external_off_offers_nothing(world, tmp_path):
    async def body(listening, backend):
        peer = await Peer.connect(listening.inbound[0][1])
        _header, features = await peer.negotiate(world.peer)
        assert features.find(NS_SASL, "mechanisms") is None, features.raw
        await peer.send(auth())
        condition, _text = stream_error_of(await peer.until_closed())
        assert condition == "policy-violation"
        await peer.aclose()

    run(world, tmp_path, body, sasl_external=False)


def test_backend_refusing_the_proxy_key_ends_the_stream_with_an_operator_reason(world, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="xmpp_dane_proxy")

    async def body(listening, backend):
        peer = await Peer.connect(listening.inbound[0][1])
        await peer.negotiate(world.peer)
        await peer.send(auth())
        assert sasl_answer(await peer.expect(Element))[0] == "success"
        await restart(peer)
        await backend.wait_for(lambda: any(e.is_(NS_DIALBACK, "result") for e in backend_elements(backend)))
        await peer.send(MESSAGE + b"<db:verify xmlns:db='jabber:server:dialback' from='a.example' to='b.example' "
                                  b"id='x1'>foreign</db:verify>")
        await backend.wait_for(lambda: any(e.is_(NS_DIALBACK, "verify") for e in backend_elements(backend)))
        await backend.streams[0].send_all(b"<db:result from='b.example' to='a.example' type='invalid'/>")
        received = await peer.until_closed()
        await peer.aclose()
        condition, text = stream_error_of(received)
        assert condition == "not-authorized" and text == BACKEND_REFUSED_KEY
        # The held message was answered as undeliverable, and never reached the backend.
        assert b"<message from='romeo@b.example' to='juliet@a.example/x' id='m1' type='error'>" in received
        await backend.wait_for(lambda: backend.connections[0].closed)
        assert MESSAGE not in backend.connections[0].received

    run(world, tmp_path, body, backend_kwargs={"confirm_dialback": False})
    (warning,) = log_lines(caplog, "sasl-backend-refused")
    assert "outbound.listen" in warning and "domain=a.example" in warning


# ================================================================================ key swap

@pytest.mark.parametrize("require,proxy_key", [("dane", True), ("tls", False)])
def test_db_result_accepted_by_certificate_reaches_the_backend_with_the_proxy_key(world, tmp_path, require, proxy_key):
    # `tls` without TLSA: no certificate check, dialback itself is the proof (prooftype tls).
    policy = f'require = "{require}"\n' + (f'tlsa = ["{tlsa_311(world.peer_self.issued.cert)}"]\n' if proxy_key else "")

    async def body(listening, backend):
        keys = listening.server.settings.dialback_keys
        peer = await Peer.connect(listening.inbound[0][1])
        await peer.negotiate(world.peer_self)
        await peer.send(db_result(key="peers-own-key"))
        answer = await peer.expect(Element)
        assert answer.is_(NS_DIALBACK, "result") and answer.attrs["type"] == "valid"
        (result,) = [e for e in backend_elements(backend) if e.is_(NS_DIALBACK, "result")]
        if proxy_key:
            assert keys.is_ours(receiving=LOCAL, originating=PEER, stream_id=BACKEND_ID, key=element_text(result))
            assert b"peers-own-key" not in backend.connections[0].received
        else:   # dialback is the proof: the peer's own bytes, as before
            assert result.raw == db_result(key="peers-own-key")
        await peer.aclose()

    run(world, tmp_path, body, policies={PEER: policy})


# ================================================================================ local answers

def test_db_verify_of_a_key_the_proxy_minted_is_answered_by_the_proxy(world, tmp_path):
    async def body(listening, backend):
        keys = listening.server.settings.dialback_keys
        peer = await Peer.connect(listening.inbound[0][1])
        await peer.negotiate(None)
        # The peer checks a key our outbound side presented to it for b.example on its stream s-9.
        ours = keys.mint(receiving=PEER, originating=LOCAL, stream_id="s-9")
        await peer.send(f"<db:verify from='{PEER}' to='{LOCAL}' id='s-9'>{ours}</db:verify>")
        answer = await peer.expect(Element)
        assert answer.is_(NS_DIALBACK, "verify")
        assert answer.attrs == {"from": LOCAL, "to": PEER, "id": "s-9", "type": "valid"}
        # The same key for another stream id is not ours: relayed to the backend.
        await peer.send(f"<db:verify from='{PEER}' to='{LOCAL}' id='s-10'>{ours}</db:verify>")
        await backend.wait_for(lambda: any(e.is_(NS_DIALBACK, "verify") for e in backend_elements(backend)))
        (relayed,) = [e for e in backend_elements(backend) if e.is_(NS_DIALBACK, "verify")]
        assert relayed.attrs["id"] == "s-10"
        assert b"id='s-9'" not in backend.connections[0].received
        await peer.aclose()

    run(world, tmp_path, body)


# ================================================================================ in memory

IN_HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' "
             b"to='b.example' from='a.example' version='1.0'>")
BACKEND_HEADER = (b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' "
                  b"xmlns:db='jabber:server:dialback' id='backend-stream-1' version='1.0'>")
VALID = b"<db:result from='b.example' to='a.example' type='valid'/>"


def sasl_session(*, succeed: bool = True):
    """A session on Direct TLS with a client certificate, relaying, EXTERNAL offered; with
    `succeed`, after <success/> (not yet restarted)."""
    from proxy.dialback_keys import DialbackKeys
    from proxy.inbound_session import InboundSession
    from proxy.tls import TlsInfo

    s = InboundSession([LOCAL], sasl_external=True, dialback_keys=DialbackKeys())
    s.peer_data(b"\x16\x03\x01")
    s.tls_established(TlsInfo("1.3", "TLSv1.3", None, None, None, (b"cert",)))
    s.peer_data(IN_HEADER)
    s.backend_connected()
    out = s.backend_data(BACKEND_HEADER + b"<stream:features/>")
    assert b"<mechanism>EXTERNAL</mechanism>" in out[-1].data
    if succeed:
        s.peer_data(auth())
        s.verdict(PEER, LOCAL, True, "test", "dane-ee")
        assert s.sasl.awaiting_restart
    return s


def sent(actions, kind) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, kind))


def test_session_holds_over_the_bound_end_the_stream():
    from proxy.inbound_auth import MAX_HELD_STANZAS
    from proxy.inbound_session import Close, SendToBackend

    s = sasl_session()
    s.peer_data(IN_HEADER)
    out = s.peer_data(MESSAGE * MAX_HELD_STANZAS)
    assert sent(out, SendToBackend) == b""          # all held
    out = s.peer_data(MESSAGE)
    assert isinstance(out[-1], Close) and out[-1].condition == "policy-violation"
    assert "held by the proxy after SASL EXTERNAL" in out[-1].reason
    assert MESSAGE not in sent(out, SendToBackend)


def test_session_peer_closing_with_held_stanzas_gets_them_delivered_first():
    from proxy.inbound_session import SendToBackend

    s = sasl_session()
    s.peer_data(IN_HEADER)
    out = s.peer_data(MESSAGE + b"</stream:stream>")
    assert sent(out, SendToBackend) == b""          # the backend's stream is not ended yet
    out = s.backend_data(VALID)
    assert sent(out, SendToBackend) == MESSAGE + b"</stream:stream>"


def test_session_backend_lost_with_held_stanzas_answers_them():
    from proxy.inbound_session import SendToPeer

    s = sasl_session()
    s.peer_data(IN_HEADER + MESSAGE)
    out = s.backend_eof("reset")
    assert b"type='error'" in sent(out, SendToPeer) and s.returned == 1


def test_session_backend_bytes_during_the_restart_follow_our_new_header():
    from proxy.inbound_session import Authenticated, SendToPeer

    s = sasl_session()
    other = b"<db:result from='b.example' to='c.example' type='invalid'/>"
    out = s.backend_data(VALID + b" " + other)
    assert sent(out, SendToPeer) == b""             # the peer is between streams
    assert not any(isinstance(a, Authenticated) for a in out)   # the handshake waits for the restart
    out = s.peer_data(IN_HEADER)
    data = sent(out, SendToPeer)
    assert data.startswith(b"<?xml version='1.0'?><stream:stream") and data.endswith(b"<stream:features/>" + other)
    assert any(isinstance(a, Authenticated) for a in out)


@pytest.mark.parametrize("header,condition", [
    (IN_HEADER.replace(b"to='b.example'", b"to='c.example'"), None),   # not served here: host-unknown
    (IN_HEADER.replace(b"from='a.example'", b"from='evil.example'"), "invalid-from"),
])
def test_session_restart_must_continue_the_authenticated_stream(header, condition):
    from proxy.inbound_session import Close, InboundSession

    s = sasl_session()
    s.local_domains = frozenset({LOCAL, "c.example"}) if condition is None else s.local_domains
    out = s.peer_data(header)
    assert isinstance(out[-1], Close)
    assert out[-1].condition == (condition or "improper-addressing"), out[-1]


def test_session_timeout_before_the_restart_says_so():
    from proxy.inbound_session import Close

    s = sasl_session()
    s.backend_data(VALID)
    out = s.timed_out(30)
    assert isinstance(out[-1], Close) and out[-1].condition == "connection-timeout"
    assert "not restarted" in out[-1].reason


def test_session_without_sasl_external_relays_the_peers_key_and_offers_nothing():
    from proxy.dialback_keys import DialbackKeys
    from proxy.inbound_session import InboundSession, SendToBackend, SendToPeer
    from proxy.tls import TlsInfo

    s = InboundSession([LOCAL], sasl_external=False, dialback_keys=DialbackKeys())
    s.peer_data(b"\x16\x03\x01")
    s.tls_established(TlsInfo("1.3", "TLSv1.3", None, None, None, (b"cert",)))
    s.peer_data(IN_HEADER)
    s.backend_connected()
    out = s.backend_data(BACKEND_HEADER + b"<stream:features/>")
    assert b"mechanism" not in sent(out, SendToPeer)
    result = b"<db:result xmlns:db='jabber:server:dialback' from='a.example' to='b.example'>peers-own-key</db:result>"
    s.peer_data(result)
    out = s.verdict(PEER, LOCAL, True, "test", "dane-ee")
    assert sent(out, SendToBackend) == result


def test_session_backend_flooding_the_peer_during_its_restart_is_bounded():
    from proxy.inbound_session import Close, SendToPeer

    s = sasl_session()
    answer = b"<db:result from='b.example' to='c.example' type='invalid'/>"
    out = []
    for _ in range(s.backend_max_element_bytes // len(answer) + 1):
        out = s.backend_data(answer)
        if out:
            break
    assert isinstance(out[-1], Close) and out[-1].condition == "internal-server-error"
    # The peer gets our (new) stream header before the error, and none of the held bytes.
    data = sent(out, SendToPeer)
    assert data.startswith(b"<?xml version='1.0'?><stream:stream") and answer not in data


def test_session_dialback_proof_alone_after_sasl_is_refused_with_the_reason():
    """A second domain by dialback on the restarted stream: its key is bound to the proxy's
    stream id, which the backend never issued.  Proved by certificate, the proxy's own key goes
    to the backend (bound to the backend's id); proved by dialback alone (`tls`), it is
    refused with the reason instead of an `invalid` from the backend."""
    from proxy.inbound_session import SendToBackend, SendToPeer

    s = sasl_session()
    s.peer_data(IN_HEADER.replace(b"<?xml version='1.0'?>", b"").replace(b"version='1.0'>", b"version='1.0' "
                b"xmlns:db='jabber:server:dialback'>"))
    s.backend_data(VALID)
    for other, prooftype, refused in (("c.example", "tls", True), ("d.example", "dane-ee", False)):
        s.peer_data(f"<db:result from='{other}' to='{LOCAL}'>peer-key</db:result>".encode())
        out = s.verdict(other, LOCAL, True, "test", prooftype)
        to_backend, to_peer = sent(out, SendToBackend), sent(out, SendToPeer)
        if refused:
            assert to_backend == b"" and b"type='error'" in to_peer and b"open a new stream" in to_peer, out
        else:
            assert b"db:result" in to_backend and b"peer-key" not in to_backend and to_peer == b"", out
            assert s.keys.is_ours(receiving=LOCAL, originating=other, stream_id="backend-stream-1",
                                  key=to_backend.split(b">")[1].split(b"<")[0].decode())

