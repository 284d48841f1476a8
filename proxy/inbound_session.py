"""The inbound protocol (DESIGN §3.1), sans-IO: peer -> proxy :5269 -> plaintext backend.

`InboundSession` holds no sockets and never waits: the trio shell (`proxy.inbound`) feeds it
what happened (bytes from the peer or the backend, TLS established, backend connected, a
verdict) and performs the actions it returns, in order (`SendToPeer`, `StartTls`,
`ConnectBackend`, `CheckDialback`, `Close`, ... in `proxy.inbound_actions`), so every rule
below is testable in memory.  This module is the stream's life; how domain pairs are
authenticated and checked on it (steps 4-5, DESIGN §3.3) is `proxy.inbound_pairs`; how it ends
(timeouts, the backend gone, shutdown, stream errors) is `proxy.inbound_endings`.

The flow, and what the peer gets when it breaks a rule (always with a `<text>` reason):

1. Stream header: `to` must be a configured local domain (`host-unknown`).  A first byte
   0x16 is a TLS ClientHello: Direct TLS (XEP-0368) on the same port.
2. We answer with features offering only `<starttls><required/></starttls>`; anything but
   `<starttls/>` is a `policy-violation`.  TLS: certificate by SNI or `to`, client
   certificate requested (not required), TLS >= 1.2.
3. After TLS the peer restarts the stream.  The backend connection is opened and that header
   relayed; the backend's header and features go back to the peer without `<starttls/>`,
   its SASL mechanisms and bidi -- plus the proxy's own SASL EXTERNAL offer when the peer
   presented a certificate and `inbound.sasl_external` is on (DESIGN §3.3).
4. Each `<db:result from=A to=B>` -- and an `<auth mechanism='EXTERNAL'>` asserting A -- is
   judged: A's policy against the client certificate and DNS evidence.  Reject -> a dialback
   error (XEP-0220 §2.4), a SASL `<failure/>` or stream error `not-authorized`, and the
   backend sees nothing of it.  Accept -> the backend is asked to accept the pair by
   dialback (with the proxy's own key when a certificate proved it, DESIGN §3.3); after
   SASL `<success/>` the peer restarts its stream and its stanzas wait for the backend's
   confirmation.  `<db:verify>` (the peer checking a key) is relayed, or answered by the
   proxy when the key is one of its own.
5. A stanza reaches the backend only if its (from, to) domains are a pair we accepted AND the
   backend confirmed with `<db:result type='valid'>` (`invalid-from` otherwise).
6. Relay until either side closes, then close the other with `</stream:stream>` after
   everything already received was passed on.
"""
from __future__ import annotations

import functools
import secrets
from collections import deque
from collections.abc import Collection, Mapping
from types import MappingProxyType

from policy.domain_reading import DomainReadingError, domainpart, read_domain
from proxy.bounce import STANZAS as _STANZAS, elements_in
from proxy.dialback_keys import DialbackKeys
from proxy.gate import Passage, Refusal, Stage, admit
from proxy.inbound_actions import (
    Action, Authenticated, CheckDialback, Close, ConnectBackend, Negotiated, PeerDone, PeerGrace,
    Note, SendToBackend, SendToPeer, StartTls,
)
from proxy.inbound_auth import ExternalAuth
from proxy.inbound_endings import BACKEND_GONE_LIMIT, BACKEND_GONE_QUIET, StreamEndings
from proxy.inbound_pairs import MAX_DIALBACK_REJECTIONS, describe_element, jid_domain, local_reading
from proxy.s2s_auth import NS_SASL, dialback_error
from proxy.tls import TlsInfo
from proxy.xmlstream import (
    NS_DIALBACK, NS_SERVER, NS_STREAMS, NS_TLS, STREAM_CLOSE, DEFAULT_MAX_STANZA_BYTES, Element,
    StreamClosed, StreamOpened, XmlError, XmlStreamParser, stream_header,
)


# After the peer ended its stream, how long the backend may take to end its own before we
# close anyway (RFC 6120 §4.4 lets it flush first; it must not hold the connection forever).
CLOSE_GRACE = 10.0

NS_BIDI_FEATURE = "urn:xmpp:features:bidi"
# Backend stream features the peer must not see.  STARTTLS: TLS is ours, the backend's port
# is plaintext.  SASL: a SASL exchange with the backend would authenticate peers past the
# gate; the proxy offers (and judges) its own EXTERNAL instead (DESIGN §3.3).  Bidirectional streams (XEP-0288)
# would carry the backend's outgoing traffic past the outbound verification (DESIGN §3.2).
_WITHHELD = frozenset({(NS_TLS, "starttls"), (NS_SASL, "mechanisms"), (NS_BIDI_FEATURE, "bidi")})
_XML_DECL = b"<?xml version='1.0'?>"
_NOTHING: Mapping = MappingProxyType({})
_PROCEED = b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
_FEATURES_STARTTLS = (
    b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>"
    b"</stream:features>"
)
# Elements from the backend are trusted to be sane; the bound only caps memory.  1 MiB is
# above Prosody's s2s default of 512 KiB, so nothing the backend legitimately sends is cut.
BACKEND_MAX_ELEMENT_BYTES = 1 << 20
# Routes of the fast path (`_route`): a stream carries a handful of domain pairs; 64 spellings
# of them are plenty, and bound what a peer can make us keep.
_MAX_ROUTES = 64


@functools.lru_cache(maxsize=16)
def _local_readings(domains: frozenset[str]) -> frozenset[str]:
    # One set for all the streams of a configuration, not one per stream (issue 13).
    return frozenset(local_reading(d) for d in domains)


# ================================================================================ the protocol

class InboundSession(StreamEndings):
    """The inbound stream's protocol state, sans-IO.  See the module docstring for the rules.

    Inputs return the list of actions to perform, in order.  Peer events are processed one
    at a time: while the session waits for TLS, the backend or a verdict, later events wait
    in a queue, so nothing is reordered and nothing is judged before its turn.
    """

    # A stream holds its session for life: slots keep it at ~0.4 KiB, where its ~45
    # attributes make a per-instance dict of ~2.5 KiB (issue 13, memory per idle stream).
    __slots__ = (
        "local_domains", "max_stanza_bytes", "backend_max_element_bytes", "describe_backend", "state",
        "direct_tls", "tls", "local_domain", "peer_domain", "dialback_errors", "accepted", "rejected",
        "authenticated", "rejections", "keys", "_sasl_external", "sasl", "_websocket",
        "_end_after_release", "_handshake_over", "_peer_bound", "_peer_bound_bytes", "backend_stream_id",
        "_peer_parser", "_backend_parser", "_queue", "_waiting", "_pending_result", "_peer_header",
        "_header_sent", "_backend_header_seen", "_backend_closed_sent", "_backend_lost", "_gone_reason",
        "returned", "undeliverable", "ending", "_out",
    )

    def __init__(
        self,
        local_domains: Collection[str],
        *,
        max_stanza_bytes: int = DEFAULT_MAX_STANZA_BYTES,
        backend_max_element_bytes: int = BACKEND_MAX_ELEMENT_BYTES,
        describe_backend: str = "the backend",
        sasl_external: bool = False,
        dialback_keys: DialbackKeys | None = None,
    ) -> None:
        self.local_domains = _local_readings(frozenset(local_domains))
        self.max_stanza_bytes = max_stanza_bytes
        self.backend_max_element_bytes = max(backend_max_element_bytes, max_stanza_bytes)
        self.describe_backend = describe_backend
        # start header starttls tls tls-header connecting relay peer-done draining closed;
        # backend-done: the backend ended its stream, the peer's stanzas still go to it;
        # backend-gone: the backend's connection is lost, the peer's stanzas are returned.
        self.state = "start"
        self.direct_tls = False
        self.tls: TlsInfo | None = None
        self.local_domain: str | None = None     # the stream's `to`
        self.peer_domain: str | None = None      # the stream's `from`, if given
        self.dialback_errors = False             # peer declared jabber:server:dialback
        # (sender, target) our policy accepted -> the verdict's prooftype
        self.accepted: dict[tuple[str, str], str | None] = {}
        self.rejected: dict[tuple[str, str], str] = {}    # ... and rejected, with the reason
        self.authenticated: set[tuple[str, str]] = set()  # accepted AND backend said valid
        self.rejections = 0
        # DESIGN §3.3: with `dialback_keys` the proxy answers a peer's verification of keys its
        # outbound side minted.  `sasl_external` says the backend's own outbound S2S goes
        # through the proxy, which then answers the backend's checks of keys the proxy presents
        # here: so only then are certificate-proved pairs asserted with the proxy's own keys,
        # and SASL EXTERNAL offered to peers that presented a certificate.
        self.keys = dialback_keys
        self._sasl_external = sasl_external and dialback_keys is not None
        self.sasl = ExternalAuth()
        self._websocket = False          # RFC 7395 has no stream restart: no SASL there
        self._end_after_release = False  # the peer ended while stanzas were held for the backend
        self._handshake_over = False     # `Authenticated` was announced
        self._peer_bound: list[bytes] | None = None   # backend bytes for the peer while it restarts
        self._peer_bound_bytes = 0
        self.backend_stream_id: str | None = None
        self._peer_parser = XmlStreamParser(max_stanza_bytes=max_stanza_bytes, stop_after=self._is_starttls)
        self._backend_parser: XmlStreamParser | None = None
        # Peer events waiting their turn; None when there are none and the stream is idle
        # (release_idle): an empty deque is 0.7 KiB (issue 13, memory per idle stream).
        self._queue: deque | None = deque()
        self._waiting: CheckDialback | ConnectBackend | StartTls | None = None
        self._pending_result: Element | None = None
        self._peer_header: StreamOpened | None = None
        self._header_sent = False      # has the peer seen a stream header on this stream?
        self._backend_header_seen = False
        self._backend_closed_sent = False
        self._backend_lost = False      # the backend's connection is gone (EOF or a failed send)
        self._gone_reason = ""
        self.returned = 0               # stanzas answered with an error because the backend was gone
        self.undeliverable = 0          # ... and those that could not even be answered
        # How the session ended (the Close it emitted), whether or not the shell got to it.
        self.ending: Close | None = None
        self._out: list[Action] = []

    # ------------------------------------------------------------------ state queries

    @property
    def negotiated(self) -> bool:
        return self.state in ("relay", "peer-done", "draining", "backend-done", "backend-gone")

    @property
    def reading_peer(self) -> bool:
        """Whether the shell should read from the peer now."""
        return self.state in ("start", "header", "starttls", "tls-header", "connecting", "relay", "draining",
                              "backend-done", "backend-gone")

    @property
    def closed(self) -> bool:
        return self.state == "closed"

    @staticmethod
    def _is_starttls(element: Element) -> bool:
        return element.name == "starttls" and element.ns == NS_TLS

    @property
    def backend_answered(self) -> bool:
        """The backend's stream header arrived (its deadline is over)."""
        return self._backend_header_seen

    def release_idle(self) -> None:
        """The shell read everything there was: an authenticated stream keeps no expat
        parser state between elements (issue 13, memory per idle stream; `release_idle` in
        proxy/xmlstream.py).  Events stay exactly the same."""
        if self.authenticated:
            self._peer_parser.release_idle()
            if self._backend_parser is not None:
                self._backend_parser.release_idle()
            if not self._queue:
                self._queue = None
            header = self._peer_header
            if header is not None and (header.attrs or header.namespaces):
                # Once a pair is authenticated our header was sent long ago and only the peer
                # header's bytes are still read (re-parsing held data, resuming after <auth/>):
                # its attributes and namespaces (~1 KiB) are dropped.
                self._peer_header = StreamOpened(_NOTHING, _NOTHING, header.raw)

    # ------------------------------------------------------------------ inputs: peer

    def peer_data(self, data: bytes) -> list[Action]:
        """Bytes from the peer (plaintext before TLS, decrypted after)."""
        if self.closed or not data:
            return []
        if self.state == "start":
            # XEP-0368 §3: Direct TLS on the S2S port; a TLS record starts with 0x16
            # (handshake), while an XML stream starts with '<', whitespace or a BOM.
            if data[0] == 0x16:
                self.state = "tls"
                self.direct_tls = True
                self._waiting = StartTls(None, data, True)
                return [self._waiting]
            self.state = "header"
        self._enqueue(self._peer_parser.feed(data))
        return self._drain()

    def peer_eof(self, reason: str = "") -> list[Action]:
        """The peer's connection ended (or broke) without `</stream:stream>`."""
        if self.closed:
            return []
        why = f"peer closed the connection{': ' + reason if reason else ''}"
        if self.state == "draining":
            self._finish_drain(why)
            return self._take()
        if self.state == "backend-gone":
            self._close(why, outcome="remote-connection-failed")
            return self._take()
        if self.state == "backend-done":
            self._end_backend_stream()
            self._close(f"the backend closed the stream, then the {why}")
            return self._take()
        if self.state in ("relay", "peer-done"):
            self._end_backend_stream_after_held()
            if self.state == "relay":
                self.state = "peer-done"
                self._out.append(PeerDone())
            return self._take()
        self._close(why)
        return self._take()

    def peer_broken(self, reason: str) -> list[Action]:
        """Sending to the peer failed: nothing more can reach it."""
        if self.closed:
            return []
        self._end_backend_stream()
        self._close(f"peer connection lost: {reason}")
        return self._take()

    # ------------------------------------------------------------------ inputs: TLS

    def tls_established(self, info: TlsInfo) -> list[Action]:
        if self.state != "tls":
            return []
        self.tls = info
        self._waiting = None
        self.state = "tls-header"
        # DESIGN §3.3: EXTERNAL needs a certificate to rest on (RFC 6120 §6.3.4: it uses
        # credentials of the lower layer); WebSocket peers get none (no restart in RFC 7395).
        self.sasl = ExternalAuth(offerable=self._sasl_external and bool(info.chain_der) and not self._websocket)
        # RFC 6120 §5.4.3.3: after TLS both sides restart with fresh parsers and headers.
        self._peer_parser = self._new_peer_parser()
        self._header_sent = False
        return self._drain()

    def transport_secured(self, info: TlsInfo) -> list[Action]:
        """The transport was TLS before the first XMPP byte and has no STARTTLS of its own
        (XEP-0468: WebSocket over wss, the client certificate presented there).  The session
        starts where `tls_established` leaves a STARTTLS stream: waiting for the one stream
        header, with the peer's chain known.  Call before any `peer_data`."""
        if self.state != "start":
            return []
        self.state, self.direct_tls, self._websocket = "tls", True, True
        return self.tls_established(info)

    def peer_error(self, condition: str, text: str) -> list[Action]:
        """The transport found the peer's framing broken (for WebSocket, RFC 7395 §3.3.3: a
        message that is not one complete element): the stream error bad XML in a TCP stream
        gets, after the events already queued."""
        if self.closed:
            return []
        self._enqueue([XmlError(condition, text)])
        return self._drain()

    def tls_failed(self, reason: str, *, peer_spoke_tls: bool = True) -> list[Action]:
        """The handshake failed.  OpenSSL's alert already went out; a STARTTLS peer that did
        not even send a TLS record gets a plaintext stream error it can read."""
        if self.closed:
            return []
        if not self.direct_tls and not peer_spoke_tls:
            self.state = "starttls"   # still plaintext: our header went out, an error can follow
            self._error("policy-violation", f"expected a TLS handshake after <proceed/>: {reason}")
            return self._take()
        self._close(reason, outcome="tls-failed")
        return self._take()

    # ------------------------------------------------------------------ inputs: backend

    def backend_connected(self) -> list[Action]:
        if self.state != "connecting":
            return []
        self._waiting = None
        self._backend_parser = XmlStreamParser(max_stanza_bytes=self.backend_max_element_bytes)
        assert self._peer_header is not None
        self._out.append(SendToBackend(_XML_DECL + self._peer_header.raw))
        self.state = "relay"
        self._out.append(Negotiated())
        return self._drain()

    def backend_failed(self, reason: str, condition: str = "remote-connection-failed") -> list[Action]:
        """The backend connection could not be opened: `remote-connection-failed`, or
        `resource-constraint` when the proxy itself ran out of descriptors or memory."""
        if self.state != "connecting":
            return []
        self._error(condition, reason)
        return self._take()

    def backend_data(self, data: bytes) -> list[Action]:
        if self.closed or self._backend_parser is None or not data:
            return []
        events = self._backend_parser.feed(data)
        if (not events and self.state in ("relay", "peer-done") and self._backend_header_seen
                and not data.strip() and self._backend_parser.buffered == 0 and self._peer_bound is None):
            # RFC 6120 §4.6.1: whitespace between elements is the backend's keepalive; pass
            # one space on, so the peer's idle timers see the stream alive.
            self._out.append(SendToPeer(b" "))
        opened = False
        for event in events:
            if self.state == "draining":
                # Our stream to the peer is closed (RFC 6120 §4.4: nothing more may be sent on
                # it); the backend sees its stream end once the peer has finished.
                if isinstance(event, StreamClosed):
                    self._backend_closed_sent = True
                    self._close("the backend closed the stream", outcome="system-shutdown")
                    break
                continue
            if isinstance(event, Element):
                self._from_backend(event)
            elif isinstance(event, StreamOpened):
                self._backend_header_seen = opened = True
                self._header_sent = True
                self.backend_stream_id = event.id
                self._out.append(SendToPeer(_XML_DECL + event.raw))
            elif isinstance(event, StreamClosed):
                self._to_peer(STREAM_CLOSE)
                if self.state == "relay":
                    # RFC 6120 §4.4: the backend closed first and keeps reading until we close
                    # too.  The peer gets the close and may still send what it had under way:
                    # that goes to the backend until the peer closes (bounded), then ours.
                    self.state = "backend-done"
                    self._out.append(PeerGrace(None, CLOSE_GRACE))
                    return self._take()
                self._close("the backend closed the stream")   # peer-done: both have closed
                return self._take()
            elif isinstance(event, XmlError):
                self._end_backend_stream()
                self._error("internal-server-error",
                            f"{self.describe_backend} sent bad XML ({event.condition}: {event.text})")
                return self._take()
            if self.closed:
                break
        return self._drain() if opened else self._take()   # the peer's elements waited for the header

    # ------------------------------------------------------------------ peer events

    def _drain(self) -> list[Action]:
        # Once relaying, the peer's elements wait for the backend's stream header: its id is
        # what the proxy's dialback keys are bound to (DESIGN §3.3), and a peer cannot have
        # seen it before (so anything it sent earlier was pipelined and can wait).
        while (self._queue and self._waiting is None and not self.closed
               and (self.state != "relay" or self._backend_header_seen)):
            event = self._queue.popleft()   # type: ignore[union-attr] # non-empty
            if type(event) is bytes:
                self._on_passed(event)
            elif isinstance(event, XmlError):
                self._end_backend_stream()
                self._error(event.condition, event.text)
            elif isinstance(event, StreamOpened):
                self._on_header(event)
            elif isinstance(event, StreamClosed):
                self._on_peer_close()
            else:
                self._on_element(event)
        return self._take()

    def _on_header(self, header: StreamOpened) -> None:
        self._peer_header = header
        if header.content_ns != NS_SERVER:
            # RFC 6120 §4.8.2 / §4.9.3.10: this port serves jabber:server only.
            self._error("invalid-namespace",
                        f"the stream's default namespace is {header.content_ns or 'missing'!r}; "
                        f"this is a server-to-server port ({NS_SERVER!r})")
            return
        if not header.to:
            self._error("improper-addressing", "the stream header has no 'to' attribute naming our domain")
            return
        try:
            to = read_domain(header.to)
        except DomainReadingError as exc:
            self._error("improper-addressing", f"the stream header's 'to': {exc}")
            return
        if to not in self.local_domains:
            self._error("host-unknown", f"{header.to!r} is not a domain served here")
            return
        if self.sasl.awaiting_restart and to != self.local_domain:
            # RFC 6120 §6.4.6: the restarted stream continues the authenticated one.
            self._error("improper-addressing", f"the stream restarted after SASL is to {to}, but {self.local_domain} "
                                               "was authenticated to")
            return
        self.local_domain = to
        try:
            self.peer_domain = read_domain(header.from_) if header.from_ else None
        except DomainReadingError as exc:
            # The backend reads the header's 'from' too (e.g. Prosody's session.from_host).
            self._error("invalid-from", f"the stream header's 'from': {exc}")
            return
        if self.sasl.awaiting_restart:
            self._on_restart(header)
        elif self.state == "header":
            if header.version is None or not header.version.startswith("1."):
                self._error("policy-violation",
                            "TLS is required, but a stream without version='1.0' cannot negotiate STARTTLS")
                return
            self._out.append(SendToPeer(stream_header(
                from_=header.to, to=header.from_, id=secrets.token_hex(8)) + _FEATURES_STARTTLS))
            self._header_sent = True
            self.state = "starttls"
        elif self.state == "tls-header":
            # XEP-0220 §2.4.1: a peer announces dialback by declaring its namespace.
            self.dialback_errors = NS_DIALBACK in header.namespaces.values()
            self.state = "connecting"
            self._waiting = ConnectBackend()
            self._out.append(self._waiting)
        else:  # a second header without a restart
            self._error("not-well-formed", "unexpected stream header")

    def _on_peer_close(self) -> None:
        if self.state == "draining":
            self._finish_drain("the peer closed its stream after system-shutdown")
            return
        if self.state == "backend-done":
            self._end_backend_stream()
            self._close("the backend closed the stream, then the peer")
            return
        if self.state == "backend-gone":
            self._out.append(SendToPeer(STREAM_CLOSE))
            self._close(self._gone_reason + "; then the peer closed its stream", outcome="remote-connection-failed")
            return
        if self.state in ("relay", "peer-done"):
            self._end_backend_stream_after_held()
            self.state = "peer-done"
            self._out.append(PeerDone())
            return
        if self._header_sent:
            self._out.append(SendToPeer(STREAM_CLOSE))
        self._close("the peer closed the stream during negotiation")

    def _on_element(self, el: Element) -> None:
        if self.state == "starttls":
            if self._is_starttls(el):
                self._out.append(SendToPeer(_PROCEED))
                self.state = "tls"
                self._waiting = StartTls(self.local_domain, self._peer_parser.trailing, False)
                self._out.append(self._waiting)
            else:
                self._error("policy-violation", f"STARTTLS is required; got {describe_element(el)} instead of <starttls/>")
            return
        if self.state in ("draining", "backend-done", "backend-gone") and el.ns == NS_DIALBACK:
            return   # no new authentications on a stream that is closing
        if self.state == "backend-gone" and not (el.ns == NS_SERVER and el.name in _STANZAS):
            return   # nothing else expects an answer, and the backend is gone
        if self.state not in ("relay", "draining", "backend-done", "backend-gone"):
            self._error("not-authorized", f"{describe_element(el)} before the stream was negotiated")
            return
        # Deny by default (DESIGN §3.1): the table in proxy/gate.py says how each element passes.
        if self.authenticated:
            stage = Stage.INBOUND_AUTHENTICATED
        else:
            stage = Stage.INBOUND_SASL_PENDING if self.sasl.pair else Stage.INBOUND_UNAUTHENTICATED
        rule = admit(stage, el.ns, el.name)
        if isinstance(rule, Refusal):
            self._end_backend_stream()
            self._error(rule.condition, f"{describe_element(el)} {rule.why}")
        elif rule is Passage.JUDGE:
            self._on_dialback_result(el)
        elif rule is Passage.VERIFY:
            self._on_dialback_verify(el)
        elif rule is Passage.STANZA:
            self._on_stanza(el)
        elif rule is Passage.SASL:
            self._on_sasl_auth(el)
        elif rule is Passage.RELAY:
            self._out.append(SendToBackend(el.raw))   # XEP-0198 elements, <stream:error>
        # Passage.SWALLOW: the peer's parting <stream:error> before authentication; the
        # backend just sees the stream end (DESIGN §3.1 step 3).

    def _route(self, name: str, sender: str, target: str) -> None:
        """A stanza just passed: from now on the framer hands over stanzas with the same
        name and the same domainparts as written (all `_on_stanza` reads: `jid_domain` is a
        function of the domainpart) as bytes, and a read of them is forwarded as one buffer
        (`_on_passed`; issue 13).  Authenticated pairs are never withdrawn on a stream, so a
        route stays right; bounded, as peers may spell a domain in many ways."""
        routes = self._peer_parser.routes
        if routes is None:
            routes = self._peer_parser.routes = {}
        if len(routes) < _MAX_ROUTES:
            routes[(name, domainpart(sender), domainpart(target))] = True

    def _on_passed(self, data: bytes) -> None:
        """Stanzas the framer matched against the routes: what `_on_stanza` would do with
        each, done once.  If the backend is gone they are handled one by one (each answered
        as undeliverable)."""
        if not self._backend_lost and self.state in ("relay", "draining", "backend-done"):
            self._out.append(SendToBackend(data))
            return
        assert self._peer_header is not None
        for el in elements_in(data, self._peer_header.raw, self.max_stanza_bytes):
            self._on_element(el)

    # ------------------------------------------------------------------ backend events

    def _from_backend(self, el: Element) -> None:
        if el.ns == NS_STREAMS and el.name == "features":
            features = el.raw_without(lambda child: (child.ns, child.name) in _WITHHELD)
            # DESIGN §3.3: EXTERNAL is the proxy's offer; a key for it needs the stream id.
            self._to_peer(self.sasl.features(features) if self.backend_stream_id else features)
            return
        if el.ns == NS_DIALBACK and el.name == "result" and self.sasl.pending and self._answers_sasl(el):
            self._on_sasl_answer(el)
            return
        if el.ns == NS_DIALBACK and el.name == "result" and el.attrs.get("type") == "valid":
            # XEP-0220 §2.2.1 step 4: the backend confirms (to=sender, from=target).
            try:
                pair = (read_domain(el.attrs.get("to", "")), read_domain(el.attrs.get("from", "")))
            except DomainReadingError:
                pair = None   # nothing we accepted: accepted pairs are in their one reading
            if pair in self.accepted and pair not in self.authenticated:
                self._confirmed(pair)
        self._to_peer(el.raw)

    def _to_peer(self, data: bytes) -> None:
        """Backend bytes for the peer; held while the peer restarts its stream after SASL
        (they must follow our new stream header, RFC 6120 §6.4.6).  On an inbound stream the
        backend only answers (dialback results, XEP-0198, errors): a few hundred bytes in a
        restart's round trip, so over BACKEND_MAX_ELEMENT_BYTES something is wrong."""
        if self._peer_bound is None:
            self._out.append(SendToPeer(data))
            return
        self._peer_bound.append(data)
        self._peer_bound_bytes += len(data)
        if self._peer_bound_bytes > self.backend_max_element_bytes:
            self._end_backend_stream()
            self._error("internal-server-error", f"{self.describe_backend} sent over {self.backend_max_element_bytes} "
                                                 "bytes while the peer restarted its stream after SASL")

    def _enqueue(self, events: list, *, first: bool = False) -> None:
        """Queue peer events for `_drain`, after those waiting (`first`: before them)."""
        if not events:
            return
        if self._queue is None:
            self._queue = deque()
        if first:
            self._queue.extendleft(reversed(events))
        else:
            self._queue.extend(events)

    def _take(self) -> list[Action]:
        """The collected actions, with adjacent sends to the same side merged.  Only inputs
        call this; the handlers they call just append to `_out`."""
        actions, self._out = self._out, []
        if len(actions) < 2:
            return actions
        # One join per run of sends to the same side (not `a + b` per stanza, which re-copies
        # the run so far for every stanza of a read: quadratic in stanzas per read).
        out: list[Action] = []
        run: list[bytes] = []
        kind: type | None = None
        for action in actions:
            cls = type(action)
            if cls is kind:
                run.append(action.data)
                continue
            if run:
                out.append(kind(run[0] if len(run) == 1 else b"".join(run)))
                run = []
            if cls is SendToPeer or cls is SendToBackend:
                kind = cls
                run.append(action.data)
            else:
                kind = None
                out.append(action)
        if run:
            out.append(kind(run[0] if len(run) == 1 else b"".join(run)))
        return out


__all__ = [
    "Action", "Authenticated", "BACKEND_GONE_LIMIT", "BACKEND_GONE_QUIET", "CLOSE_GRACE", "CheckDialback", "Close",
    "ConnectBackend", "InboundSession", "MAX_DIALBACK_REJECTIONS", "Negotiated", "PeerDone", "PeerGrace",
    "Note", "SendToBackend", "SendToPeer", "StartTls", "dialback_error", "jid_domain",
]
