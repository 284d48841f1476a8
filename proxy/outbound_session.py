"""The outbound protocol (DESIGN §3.2, §3.3), sans-IO: backend → proxy (`outbound.listen`) → peer.

`OutboundSession` holds no sockets and never waits: the trio shell (`proxy.outbound`) feeds it
bytes from the backend and the peer, tells it when a peer was accepted or none could be, and
sends what it returns, in order.  Time comes in through `clock` (`deadline` / `tick`).

The flow:

1. The backend's stream header (from = L, a configured `[[domain]]`; to = D, the peer) is
   answered at once, by the proxy: our header (a fresh id, from = D, to = L) and features
   offering dialback only -- no STARTTLS (the hop is plaintext loopback), no SASL mechanisms.
   Nothing is sent to D yet; no connection is opened.
2. `<db:verify from=L to=D id=X>KEY` whose key the proxy minted itself for that pair and stream
   id (`proxy.dialback_keys`, the inbound side's keys for peers it accepted by certificate) is
   answered `valid` here: no connection to D.
3. Anything that needs D -- the backend's `<db:result>` (it wants L authenticated to D), a
   `<db:verify>` of a key D issued -- asks the shell to connect (`Output.connect`); the shell
   resolves D, tries its targets, gets TLS up with L's certificate and judges D's
   (`proxy.connect`).  No target accepted: `remote-connection-failed` to the backend with every
   target's reason.
4. On the accepted connection the proxy opens a stream of its own and authenticates L itself
   (`proxy.outbound_auth`: SASL EXTERNAL with the certificate it presented, else dialback with
   a key of its own); then answers the backend's `<db:result>` valid.  D's refusal reaches
   the backend as a stream error `not-authorized` with D's reason.  A relayed `<db:verify>`
   gets D's answer back.
5. Stanzas (`jabber:server` message/presence/iq) pass to D, bytes as received, only when
   their (from, to) domains are a pair D accepted on this stream (`not-authorized` otherwise).
   What D sends is never relayed (it only answers; a stream the proxy opened carries no
   stanzas inward: no bidi, XEP-0288).

This replaces the relaying of DESIGN §3.2 ("relay the peer's header and the backend's
dialback"): once the proxy answers the backend's stream itself, the two streams have different
ids, and a dialback key is bound to its stream id (XEP-0185 §3) -- the backend's keys could no
longer be checked by D, so they are never sent.  Authentication ends at the proxy in both
directions; what crosses is the proxy's own.

Choices where DESIGN is silent:
* A backend header whose `from` is not a configured `[[domain]]` gets `host-unknown`
  (DESIGN §3.5): the proxy has no certificate to present for it.  A missing `from` or `to`
  too, with its own text.  Every dialback element's `from` must be a configured domain as well
  (`invalid-from`), and its `to` must be D: a stream is verified for D only, so piggybacking
  another peer domain (XEP-0220 §2.6 target multiplexing) is a `policy-violation`; the backend
  opens a new stream for it (Prosody and ejabberd always do).
* D's refusal of one pair ends the whole backend stream (`not-authorized`, with D's words):
  Prosody and ejabberd bounce the queued stanzas with that text, which is how the user learns
  why.  A `<db:result type='invalid'>` would lose the reason.
* A backend that sends `<starttls/>` to us (Prosody with `s2s_require_encryption = true`)
  gets `<failure/>` (RFC 6120 §5.4.2.2) and a log line saying what to change.
* Deadlines: the backend's header, and its first question, within `handshake_timeout` of the
  connection (`connection-timeout`); each question sent to D within `answer_timeout`
  (`remote-connection-failed`, naming the question).  Connecting is bounded by
  `proxy.connect`'s per-target timeout.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from policy.domain_reading import DomainReadingError, domainpart, read_domain
from policy.pkix_names import normalise_domain
from proxy.connect import DEFAULT_ATTEMPT_TIMEOUT, new_stream_id
from proxy.dialback_keys import DialbackKeys
from proxy.gate import Passage, Refusal, Stage, admit, describe
from proxy.outbound_auth import (
    ANSWER_TIMEOUT, MAX_QUESTIONS, Authenticated, NotAuthenticated, PeerAuthentication, PeerBroken, PeerEnded,
    VerifyAnswered,
)
from proxy.s2s_auth import NS_DIALBACK_FEATURE, db_result_answer, element_text
from proxy.xmlstream import (
    DEFAULT_MAX_STANZA_BYTES, NS_SERVER, NS_TLS, STREAM_CLOSE, Element, StreamClosed, StreamOpened,
    XmlError, XmlStreamParser, stream_error, stream_header,
)

__all__ = ["Opening", "OutboundSession", "Output", "jid_domain"]

_TLS_FAILURE = f"<failure xmlns='{NS_TLS}'/>".encode()
# XEP-0220 §2.1: the dialback stream feature; <errors/> says we understand dialback errors (§2.4).
_FEATURES = (f"<stream:features><dialback xmlns='{NS_DIALBACK_FEATURE}'><errors/></dialback>"
             f"</stream:features>").encode()


# Stream-error conditions without a metrics series of their own (proxy/metrics.py
# CONNECTION_OUTCOMES) are counted with the nearest one: the backend broke a rule.
_OUTCOME_OF = {"unsupported-stanza-type": "policy-violation", "improper-addressing": "policy-violation",
               "bad-format": "policy-violation", "invalid-namespace": "policy-violation"}


def jid_domain(jid: str) -> str:
    """The domain part of a JID (RFC 7622 §3.2), normalised; "" for an empty JID."""
    bare = jid.split("/", 1)[0]
    return normalise_domain(bare.rpartition("@")[2]) if bare else ""


@dataclass(frozen=True)
class Opening:
    """The backend's stream header was accepted: it speaks as `local_domain` to `peer_domain`."""

    peer_domain: str
    local_domain: str
    header: StreamOpened


@dataclass
class Output:
    """What to do after feeding the session: send these bytes (peer first, then backend);
    `connect` -- start finding the peer (once per stream); `close` -- tear both connections
    down after sending; `outcome` -- how the stream ended (the metrics outcome, DESIGN §6), set
    with `close`; `notes` -- operator hints (warnings); `events` -- (event, fields) for the log."""

    to_peer: bytes = b""
    to_backend: bytes = b""
    connect: Opening | None = None
    close: bool = False
    outcome: str | None = None
    notes: list[str] = field(default_factory=list)
    events: list[tuple[str, dict[str, str]]] = field(default_factory=list)


class OutboundSession:
    """One backend stream, from its header to its end, without I/O.

    `state`: ``opening`` (reading the backend's header) → ``open`` (answered; the peer is
    connected only when needed: `peer` None → ``connecting`` → ``connected``) → ``closed``.
    Feed `backend_data`, `backend_eof`, `peer_data`, `peer_eof`; call `peer_accepted()` once
    a peer's verdict is accept (its return value is the first thing the peer may receive) or
    `refuse()` when no peer will be; `tick(now)` when `deadline` has passed.
    """

    def __init__(self, *, local_domains: Collection[str], keys: DialbackKeys | None = None,
                 max_stanza_bytes: int = DEFAULT_MAX_STANZA_BYTES,
                 handshake_timeout: float = DEFAULT_ATTEMPT_TIMEOUT, answer_timeout: float = ANSWER_TIMEOUT,
                 max_questions: int = MAX_QUESTIONS, clock: Callable[[], float] = time.monotonic) -> None:
        self.local_domains = frozenset(normalise_domain(d) for d in local_domains)
        self.keys = keys if keys is not None else DialbackKeys()
        self.max_stanza_bytes = max_stanza_bytes
        self.handshake_timeout = handshake_timeout
        self.answer_timeout = answer_timeout
        self.max_questions = max_questions
        self.clock = clock
        self.state = "opening"
        self.peer: str | None = None          # None / "connecting" / "connected"
        self.opening: Opening | None = None
        self.stream_id = ""                   # the id of our answer to the backend
        self.auth: PeerAuthentication | None = None
        self.accepted_pairs: set[tuple[str, str]] = set()   # (local, peer) D accepted
        self.local_answers = 0
        self.backend_closed = False           # the backend ended its stream
        self.peer_closed = False              # the peer ended its stream
        self._backend_close_sent = False      # our stream to the backend is ended
        self._peer_close_sent = False         # our stream to the peer is ended
        self.outcome: str | None = None
        self.reason = ""                      # the text of the last stream error we sent the backend
        self._started = clock()
        self._asked_anything = False
        self._backend = XmlStreamParser(max_stanza_bytes=max_stanza_bytes)
        self._backend_has_header = False
        self._early: list[tuple[str, str, str, str]] = []   # questions asked before the peer was ready

    @property
    def closing(self) -> bool:
        """One side has ended its stream; the other has CLOSE_TIMEOUT to follow."""
        return self.state == "open" and self.peer == "connected" and (self.backend_closed or self.peer_closed)

    # ------------------------------------------------------------------ backend → us

    def backend_data(self, data: bytes) -> Output:
        """Bytes from the backend: its header (answered at once), its questions, its stanzas."""
        out = Output()
        if self.state == "closed" or not data:
            return out
        events = self._backend.feed(data)
        if (not events and not data.strip() and self._backend.buffered == 0 and self.peer == "connected"
                and self.accepted_pairs):
            # Whitespace keepalive (RFC 6120 §4.6.1) between elements: pass one on, so the
            # peer's idle timers see the backend alive.
            out.to_peer += b" "
        for event in events:
            if self.state == "closed":
                break
            if isinstance(event, XmlError):
                self._fail_backend(out, event.condition, f"the backend's stream is broken: {event.text}")
            elif isinstance(event, StreamOpened):
                if self.state == "opening":
                    self._open(event, out)
                else:
                    self._fail_backend(out, "bad-format", "a second stream header: the proxy offers no SASL, "
                                                          "so the stream never restarts")
            elif isinstance(event, StreamClosed):
                self._backend_stream_closed(out)
            else:
                self._backend_element(event, out)
        return out

    def backend_eof(self) -> Output:
        """The backend closed its TCP connection."""
        out = Output()
        if self.state == "closed":
            return out
        self.backend_closed = self._backend_close_sent = True
        self._close_peer(out)
        self._finish(out, "ok" if self._asked_anything else "closed-early")
        return out

    def _open(self, header: StreamOpened, out: Output) -> None:
        # RFC 6120 §4.7.1-2 / §4.9.3.6.  `to` is the peer, `from` ours (DESIGN §3.2).
        if header.content_ns != NS_SERVER:
            self._fail_backend(out, "invalid-namespace",
                               f"the outbound port speaks server-to-server (jabber:server), not {header.content_ns!r}")
            return
        to, from_ = (header.to or "").strip(), (header.from_ or "").strip()
        if not to:
            self._fail_backend(out, "host-unknown", "the stream header has no 'to': no peer domain to connect to")
            return
        if not from_:
            self._fail_backend(out, "host-unknown",
                               "the stream header has no 'from': the proxy needs the local domain to present its certificate")
            return
        try:
            # DESIGN §2.6: the peer the proxy dials must be the domain the backend means.
            peer = read_domain(to)
        except DomainReadingError as exc:
            self._fail_backend(out, "host-unknown", f"'to': {exc}")
            return
        local = normalise_domain(from_)
        if not peer or any(c in peer for c in "@/ "):
            self._fail_backend(out, "host-unknown", f"'to' = {to!r} is not a domain name")
            return
        if local not in self.local_domains:
            known = ", ".join(sorted(self.local_domains)) or "none"
            self._fail_backend(out, "host-unknown",
                               f"{local} is not a [[domain]] of this proxy (configured: {known}); "
                               "it has no certificate to present for it")
            return
        self.opening = Opening(peer, local, header)
        self.state = "open"
        # RFC 6120 §4.7: our answer -- a fresh id, from = the peer domain it asked for, to = it.
        self.stream_id = new_stream_id()
        out.to_backend += stream_header(from_=peer, to=local, id=self.stream_id) + _FEATURES
        self._backend_has_header = True

    def _backend_element(self, el: Element, out: Output) -> None:
        assert self.opening is not None
        if el.is_(NS_TLS, "starttls"):
            # RFC 6120 §5.4.2.2: failure, then the stream ends.  TLS to the peer is ours.
            out.notes.append("the backend sent <starttls/> to the proxy; the hop to the proxy is plaintext "
                             "by design: set s2s_require_encryption = false (Prosody) or disable STARTTLS "
                             "for s2s to the proxy")
            out.to_backend += _TLS_FAILURE + STREAM_CLOSE
            self._backend_close_sent = True
            self._close_peer(out)
            self._finish(out, "policy-violation")
            return
        rule = admit(Stage.OUTBOUND_BACKEND, el.ns, el.name)
        if isinstance(rule, Refusal):
            self._fail_backend(out, rule.condition, f"{describe(el.ns, el.name)} {rule.why}")
        elif rule is Passage.SWALLOW:
            pass
        elif rule is Passage.STANZA:
            self._stanza(el, out)
        elif el.attrs.get("type") is not None:
            # Dialback answers come from the proxy, never to it: the backend asks only.
            self._fail_backend(out, "unsupported-stanza-type",
                               f"{describe(el.ns, el.name)} with a type: the proxy asks the backend nothing")
        else:
            pair = self._dialback_pair(el, out)
            if pair is None:
                return
            self._asked_anything = True
            if rule is Passage.AUTHENTICATE:
                self._ask(out, "result", pair[0])
            else:
                self._check_key(el, pair[0], out)

    def _dialback_pair(self, el: Element, out: Output) -> tuple[str, str] | None:
        """(local, peer) of a dialback question, each read once (DESIGN §2.6), or None after
        failing the stream."""
        assert self.opening is not None
        peer = self.opening.peer_domain
        try:
            frm, to = read_domain(el.attrs.get("from", "")), read_domain(el.attrs.get("to", ""))
        except DomainReadingError as exc:
            self._fail_backend(out, "improper-addressing", f"{describe(el.ns, el.name)}: {exc}")
            return None
        if to != peer:
            self._fail_backend(out, "policy-violation",
                               f"{describe(el.ns, el.name)} to {to} on the stream to {peer}: only {peer} is "
                               "verified on it; open a new stream")
            return None
        if frm not in self.local_domains:
            self._fail_backend(out, "invalid-from", f"{describe(el.ns, el.name)} from {frm}, which is not a "
                                                    "[[domain]] of this proxy")
            return None
        return frm, to

    def _check_key(self, el: Element, local: str, out: Output) -> None:
        assert self.opening is not None
        peer = self.opening.peer_domain
        answer = self.keys.answer(el, local, peer)
        if answer is not None:
            # DESIGN §3.3: a key the proxy minted for this pair and stream id (the inbound side
            # accepted the peer by certificate): answered here, nothing asked of the peer.
            self.local_answers += 1
            out.to_backend += answer
            out.events.append(("dialback-answered-locally", {"local": local, "domain": peer}))
            return
        self._ask(out, "verify", local, el.attrs.get("id", ""), element_text(el).strip())

    def _ask(self, out: Output, kind: str, local: str, stream_id: str = "", key: str = "") -> None:
        """A question only the peer can answer: connect if not yet, then ask."""
        if self.auth is None:
            if len(self._early) >= self.max_questions:
                self._fail_backend(out, "policy-violation",
                                   f"more than {self.max_questions} dialback questions before the peer was reached")
                return
            self._early.append((kind, local, stream_id, key))
            if self.peer is None:
                self.peer = "connecting"
                out.connect = self.opening
            return
        to_peer, events = (self.auth.authenticate(local) if kind == "result"
                           else self.auth.verify(local, stream_id, key))
        out.to_peer += to_peer
        self._auth_events(events, out)

    def _stanza(self, el: Element, out: Output) -> None:
        assert self.opening is not None
        try:
            # DESIGN §2.6: each address in its one reading, as the pairs were recorded.
            frm, to = (read_domain(domainpart(el.attrs[a])) if el.attrs.get(a) else "" for a in ("from", "to"))
        except DomainReadingError as exc:
            self._fail_backend(out, "improper-addressing", f"<{el.name}>: {exc}")
            return
        if to and to != self.opening.peer_domain:
            self._fail_backend(out, "policy-violation",
                               f"<{el.name}> to {to} on the stream to {self.opening.peer_domain}: only "
                               f"{self.opening.peer_domain} was verified on it; open a new stream")
            return
        if (frm, self.opening.peer_domain) not in self.accepted_pairs or self.peer != "connected":
            # RFC 6120 §4.9.3.12 / DESIGN §3.1: nothing before its pair is authenticated.
            self._fail_backend(out, "not-authorized",
                               f"<{el.name}> from {frm or '(no from)'} to {to or '(no to)'}: that pair was not "
                               "authenticated to the peer on this stream")
            return
        out.to_peer += el.raw

    def _backend_stream_closed(self, out: Output) -> None:
        self.backend_closed = True
        if self.peer == "connected":
            self._close_peer(out)
            if not self.peer_closed:
                return          # the peer gets CLOSE_TIMEOUT to answer with its own close
        self._close_backend(out)
        self._finish(out, "ok" if self._asked_anything else "closed-early")

    # ------------------------------------------------------------------ the verdict

    def peer_accepted(self) -> bytes:
        """The peer was accepted: our stream header, the first thing it receives."""
        if self.state != "open" or self.peer != "connecting":
            raise RuntimeError(f"peer_accepted() in state {self.state}/{self.peer}")
        assert self.opening is not None
        self.peer = "connected"
        self.auth = PeerAuthentication(peer=self.opening.peer_domain, stream_from=self.opening.local_domain,
                                       keys=self.keys, max_stanza_bytes=self.max_stanza_bytes,
                                       answer_timeout=self.answer_timeout, max_questions=self.max_questions,
                                       clock=self.clock)
        # The questions asked while connecting wait in `auth` for the peer's features.
        early, self._early = self._early, []
        for kind, local, stream_id, key in early:
            if kind == "result":
                self.auth.authenticate(local)
            else:
                self.auth.verify(local, stream_id, key)
        return self.auth.opening()

    def refuse(self, condition: str, text: str) -> bytes:
        """No peer will be connected (or the header never came): the stream error for the
        backend, preceded by a header of ours if it has none."""
        if self.state == "closed":
            return b""
        out = Output()
        self._fail_backend(out, condition, text)
        return out.to_backend

    def shutdown(self, text: str = "the proxy is shutting down") -> Output:
        """DESIGN §3.5 system-shutdown to the backend; the peer's stream is closed."""
        out = Output()
        if self.state == "closed":
            return out
        self._close_peer(out)
        self._to_backend_error(out, "system-shutdown", text)
        self._finish(out, "system-shutdown")
        return out

    # ------------------------------------------------------------------ deadlines

    @property
    def deadline(self) -> float | None:
        """When `tick` has something to do (None: nothing is waiting on time)."""
        if self.state == "closed":
            return None
        if not self._asked_anything:
            return self._started + self.handshake_timeout
        return self.auth.deadline if self.auth is not None else None

    def tick(self, now: float) -> Output:
        """Time has passed: a header or first question not in time, an unanswered question."""
        out = Output()
        if self.state == "closed":
            return out
        if not self._asked_anything and now - self._started >= self.handshake_timeout:
            what = "stream header" if self.state == "opening" else "dialback request"
            self._fail_backend(out, "connection-timeout", f"no {what} within {self.handshake_timeout:g} s")
        elif self.auth is not None:
            reason = self.auth.overdue(now)
            if reason is not None:
                out.events.append(("peer-unanswered", {"domain": self.auth.peer, "reason": reason}))
                self._fail_backend(out, "remote-connection-failed", reason)
        return out

    # ------------------------------------------------------------------ peer → us

    def peer_data(self, data: bytes) -> Output:
        """Decrypted bytes from the accepted peer: read here, never relayed."""
        out = Output()
        if self.state == "closed" or self.peer != "connected" or not data:
            return out
        assert self.auth is not None
        to_peer, events = self.auth.feed(data)
        out.to_peer += to_peer
        if to_peer.endswith(STREAM_CLOSE):
            self._peer_close_sent = True      # the stream error the peer broke it with
        self._auth_events(events, out)
        if not data.strip() and self.state != "closed" and self.accepted_pairs and not self._backend_close_sent:
            out.to_backend += b" "      # the peer's keepalive keeps the backend's timers quiet too
        return out

    def _auth_events(self, events, out: Output) -> None:
        assert self.opening is not None
        peer = self.opening.peer_domain
        for event in events:
            if self.state == "closed":
                return
            if isinstance(event, Authenticated):
                if (event.local, peer) not in self.accepted_pairs:
                    self.accepted_pairs.add((event.local, peer))
                    fields = {"local": event.local, "domain": peer, "method": event.method}
                    if event.note:
                        fields["note"] = event.note
                    out.events.append(("authenticated-to-peer", fields))
                if not self._backend_close_sent:
                    out.to_backend += db_result_answer(event.local, peer, True)
            elif isinstance(event, NotAuthenticated):
                out.events.append(("peer-refused-authentication", {"local": event.local, "domain": peer,
                                                                    "reason": event.reason}))
                self._fail_backend(out, "not-authorized", event.reason)
            elif isinstance(event, VerifyAnswered):
                if not self._backend_close_sent:
                    out.to_backend += event.answer
            elif isinstance(event, PeerEnded):
                self._peer_stream_closed(out)
            elif isinstance(event, PeerBroken):
                out.events.append(("peer-stream-failed", {"domain": peer, "reason": event.reason}))
                self._fail_backend(out, "remote-connection-failed", event.reason)

    def _peer_stream_closed(self, out: Output) -> None:
        self.peer_closed = True
        if self.auth is not None and self.auth.outstanding and not self._backend_close_sent:
            self._fail_backend(out, "remote-connection-failed",
                               f"the peer {self.auth.peer} closed its stream before answering")
            return
        self._close_backend(out)
        if self.backend_closed:
            self._close_peer(out)
            self._finish(out, "ok")
        # else: the backend gets CLOSE_TIMEOUT to end its stream as well

    def peer_error(self, condition: str, text: str) -> Output:
        """The transport found the peer's framing broken (WebSocket: RFC 7395 §3.3.3)."""
        out = Output()
        if self.state != "closed" and self.peer == "connected":
            domain = self.opening.peer_domain if self.opening else ""
            out.to_peer += stream_error(condition, text)
            self.peer_closed = self._peer_close_sent = True
            self._fail_backend(out, "remote-connection-failed", f"the peer {domain} broke the stream ({condition}: {text})")
        return out

    def peer_eof(self) -> Output:
        """The peer closed the TCP connection (or TLS ended)."""
        out = Output()
        if self.state == "closed" or self.peer != "connected":
            return out
        self.peer_closed = self._peer_close_sent = True
        if self.auth is not None and self.auth.outstanding:
            self._to_backend_error(out, "remote-connection-failed",
                                   f"the peer {self.auth.peer} closed the connection before answering")
        else:
            self._close_backend(out)
        self._finish(out, "ok")
        return out

    def revoked(self, condition: str, text: str) -> Output:
        """DESIGN §3.4: the peer is no longer accepted -- a stream error to it saying what
        changed, the backend's stream ended politely, the end."""
        out = Output()
        if self.state == "closed" or self.peer != "connected":
            return out
        if not self._peer_close_sent:
            out.to_peer += stream_error(condition, text)
            self._peer_close_sent = True
        self._close_backend(out)
        self._finish(out, condition)
        return out

    def lost(self, outcome: str = "ok") -> None:
        """A connection broke while sending: the session is over."""
        self._finish(Output(), outcome)

    # ------------------------------------------------------------------ endings

    def _close_peer(self, out: Output) -> None:
        """Our `</stream:stream>` to the peer, once, if it has a stream of ours."""
        if self.peer == "connected" and not self._peer_close_sent:
            out.to_peer += STREAM_CLOSE
            self._peer_close_sent = True

    def _close_backend(self, out: Output) -> None:
        """Our `</stream:stream>` to the backend, once."""
        if not self._backend_close_sent:
            out.to_backend += STREAM_CLOSE
            self._backend_close_sent = True

    def _fail_backend(self, out: Output, condition: str, text: str) -> None:
        """A stream error to the backend, the peer's stream (if any) closed politely, the end."""
        self._to_backend_error(out, condition, text)
        self._close_peer(out)
        self._finish(out, _OUTCOME_OF.get(condition, condition))

    def _to_backend_error(self, out: Output, condition: str, text: str) -> None:
        self.reason = text
        if not self._backend_close_sent:
            out.to_backend += self._backend_error(condition, text)
            self._backend_close_sent = True

    def _backend_error(self, condition: str, text: str) -> bytes:
        head = b""
        if not self._backend_has_header:
            # RFC 6120 §4.9.1.2: an error before any header is preceded by one.
            o = self.opening
            head = stream_header(from_=o.peer_domain if o else None, to=o.local_domain if o else None,
                                 id=new_stream_id())
            self._backend_has_header = True
        return head + stream_error(condition, text)

    def _finish(self, out: Output, outcome: str) -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        self.outcome = outcome
        out.close = True
        out.outcome = outcome
