"""Authenticating the backend's domains to a peer, on the proxy's own stream (DESIGN §3.3), sans-IO.

The outbound side answers the backend's stream itself and opens a stream of its own to the peer
D (after TLS that presented the local domain L's certificate, `proxy.connect`).  On that stream
`PeerAuthentication` authenticates each local domain the backend asks for with its
`<db:result from=L to=D>`:

1. SASL EXTERNAL (RFC 6120 §6, XEP-0178) when D offers it and L is the stream's `from` -- the
   domain whose certificate the proxy presented.  `<success/>` restarts the stream (RFC 6120
   §6.4.6: a new header from us, D's new header and features) and L is authenticated.
2. Otherwise -- EXTERNAL not offered, refused (`<failure/>`), or a second local domain on the
   stream (XEP-0178 authenticates the stream's `from` only) -- Server Dialback (XEP-0220) with a
   key of the proxy's own (XEP-0185, `proxy.dialback_keys`) bound to D's current stream id.  D
   checks it with L's authoritative server, which is the proxy's inbound side: it recognises
   keys the proxy minted.  The backend's own key never leaves the proxy.

It also carries the backend's `<db:verify>` for keys that are not the proxy's (keys D issued,
which only D can check) and hands back D's answer.

Nothing the peer sends is relayed: the peer only answers.  What may come back is the gate's
table for a stream the proxy opened (`proxy.gate`, Stage.OUTBOUND_PEER, deny by default):
features, SASL's answers to our `<auth/>`, dialback answers to questions asked on this stream
(same domains in their one reading, same id), a stream error.  Anything else breaks the stream.

Choices where DESIGN is silent:
* EXTERNAL is tried once per stream, for the stream's `from` only; after `<failure/>` that
  domain falls back to dialback on the same stream (RFC 6120 §6.4.5 lets the initiating
  entity carry on; XEP-0178 §3 names dialback as the fallback).
* A SASL `<challenge/>` (not expected: our `<auth/>` carries the authzid, XEP-0178 §3) gets one
  empty `<response/>` (RFC 6120 §6.4.3); a second one breaks the stream.
* While SASL runs nothing else is sent (RFC 6120 §6.4.1: the stream is being negotiated);
  dialback questions wait for the restarted stream's features and use its new id.
* A peer header without an id cannot carry dialback (the key is bound to it, XEP-0185 §3):
  such a domain is not authenticated, with that reason.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from policy.domain_reading import DomainReadingError, read_domain
from proxy.connect import describe_stream_error
from proxy.dialback_keys import DialbackKeys
from proxy.gate import Passage, Refusal, Stage, admit, describe
from proxy.s2s_auth import (
    EXTERNAL, NS_SASL, auth_external, db_result, db_verify, db_verify_answer, dialback_error,
    dialback_error_reason, element_text, offered_mechanisms,
)
from proxy.xmlstream import (
    DEFAULT_MAX_STANZA_BYTES, NS_STREAMS, Element, StreamClosed, StreamOpened, XmlError,
    XmlStreamParser, stream_error, stream_header,
)

__all__ = [
    "ANSWER_TIMEOUT", "AuthEvent", "Authenticated", "MAX_QUESTIONS", "NotAuthenticated", "PeerAuthentication",
    "PeerBroken", "PeerEnded", "VerifyAnswered",
]

# How long the peer may take to answer one question (SASL or dialback) once it was sent: a
# dialback answer needs D to connect back to our inbound side, so this is the whole of a
# stream negotiation -- limits.handshake_timeout's default, Prosody's and ejabberd's own.
ANSWER_TIMEOUT = 30.0
# Unanswered questions per stream.  A backend asks one <db:result> per local domain and one
# <db:verify> per incoming stream it checks; 32 at once is far beyond that, and the bound keeps
# a misbehaving backend from queueing work without end.
MAX_QUESTIONS = 32
_RESPONSE = f"<response xmlns='{NS_SASL}'/>".encode()


# ------------------------------------------------------------------------------------- events

@dataclass(frozen=True)
class Authenticated:
    """The peer accepted `local` on this stream (`method`: "sasl-external" or "dialback");
    `note` says why EXTERNAL was not used, when it was not."""

    local: str
    method: str
    note: str = ""


@dataclass(frozen=True)
class NotAuthenticated:
    """The peer refused `local`, for `reason` (its words where it gave any)."""

    local: str
    reason: str


@dataclass(frozen=True)
class VerifyAnswered:
    """The peer's answer to a relayed `<db:verify>`, rebuilt for the backend (`answer`)."""

    local: str
    stream_id: str
    valid: bool
    answer: bytes


@dataclass(frozen=True)
class PeerEnded:
    """The peer closed its stream (`</stream:stream>`)."""


@dataclass(frozen=True)
class PeerBroken:
    """The peer's stream is unusable: `reason` (for the backend and the log)."""

    reason: str


AuthEvent = Authenticated | NotAuthenticated | VerifyAnswered | PeerEnded | PeerBroken


@dataclass
class _Question:
    kind: str            # "result" or "verify"
    local: str
    stream_id: str = ""  # verify: the id it asks about
    key: str = ""        # verify: the key (D's), relayed as the backend gave it
    sent_at: float | None = None


# ------------------------------------------------------------------------------------- machine

class PeerAuthentication:
    """The proxy's stream to peer `peer` (after TLS) as the domains' authenticator.

    `opening()` is our header (send it first).  `authenticate(local)` / `verify(...)` queue a
    question and return what can be sent at once; `feed(data)` takes the peer's bytes and
    returns (bytes for the peer, events).  `overdue(now)` names a question the peer left
    unanswered past its deadline.  Domains are in their one reading (`read_domain`).
    """

    def __init__(self, *, peer: str, stream_from: str, keys: DialbackKeys,
                 max_stanza_bytes: int = DEFAULT_MAX_STANZA_BYTES, answer_timeout: float = ANSWER_TIMEOUT,
                 max_questions: int = MAX_QUESTIONS, clock: Callable[[], float] = time.monotonic) -> None:
        self.peer = peer
        self.stream_from = stream_from
        self.keys = keys
        self.max_stanza_bytes = max_stanza_bytes
        self.answer_timeout = answer_timeout
        self.max_questions = max_questions
        self.clock = clock
        # header -> features -> ready <-> sasl (-> header again after <success/>); ended
        self.state = "header"
        self.stream_id = ""
        self.mechanisms: frozenset[str] = frozenset()
        self.authenticated: dict[str, str] = {}     # local -> method
        self.restarts = 0
        self._parser = self._new_parser()
        self._queue: deque[_Question] = deque()
        self._asked_results: dict[str, _Question] = {}
        self._asked_verifies: dict[tuple[str, str], _Question] = {}
        self._external_tried = False
        self._external_note = ""
        self._sasl_question: _Question | None = None
        self._challenges = 0

    # -- questions from the session --------------------------------------------------------

    @property
    def outstanding(self) -> int:
        """Questions queued or asked and not answered yet."""
        return len(self._queue) + len(self._asked_results) + len(self._asked_verifies) + (
            1 if self._sasl_question is not None else 0)

    def opening(self) -> bytes:
        """Our stream header (RFC 6120 §4.7.1: from = L, to = D; dialback prefix declared)."""
        return stream_header(from_=self.stream_from, to=self.peer, id=None)

    def authenticate(self, local: str) -> tuple[bytes, list[AuthEvent]]:
        """Authenticate `local` to the peer (the backend's `<db:result>`)."""
        if local in self.authenticated:
            return b"", [Authenticated(local, self.authenticated[local])]
        if local in self._asked_results or any(q.kind == "result" and q.local == local for q in self._queue) or (
                self._sasl_question is not None and self._sasl_question.local == local):
            return b"", []          # already under way: one answer will come
        self._queue.append(_Question("result", local))
        return self._advance()

    def verify(self, local: str, stream_id: str, key: str) -> tuple[bytes, list[AuthEvent]]:
        """Ask the peer about a key it issued (the backend's `<db:verify>` of a key not ours)."""
        if (local, stream_id) in self._asked_verifies or any(
                q.kind == "verify" and (q.local, q.stream_id) == (local, stream_id) for q in self._queue):
            return b"", []
        self._queue.append(_Question("verify", local, stream_id, key))
        return self._advance()

    @property
    def deadline(self) -> float | None:
        """When the oldest question sent to the peer runs out of time (None: none is waiting)."""
        times = [q.sent_at for q in self._waiting() if q.sent_at is not None]
        return min(times) + self.answer_timeout if times else None

    def overdue(self, now: float) -> str | None:
        """The reason, if a question sent to the peer has waited past `answer_timeout`."""
        for q in self._waiting():
            if q.sent_at is not None and now - q.sent_at >= self.answer_timeout:
                what = "SASL EXTERNAL" if q is self._sasl_question else f"<db:{q.kind}>"
                return (f"the peer {self.peer} did not answer {what} for {q.local} within "
                        f"{self.answer_timeout:g} s")
        return None

    def _waiting(self) -> list[_Question]:
        sasl = [self._sasl_question] if self._sasl_question is not None else []
        return sasl + list(self._asked_results.values()) + list(self._asked_verifies.values())

    # -- what the peer says ----------------------------------------------------------------

    def feed(self, data: bytes) -> tuple[bytes, list[AuthEvent]]:
        """The peer's (decrypted) bytes: what to send back and what happened."""
        out, events = b"", []
        if self.state == "ended" or not data:
            return out, events
        pending = self._parser.feed(data)
        while True:
            for event in pending:
                if self.state == "ended":
                    return out, events
                more, happened = self._on_event(event)
                out += more
                events += happened
            if self.state == "ended" or self._parser.state != "stopped":
                return out, events
            # SASL <success/>: the stream restarts (RFC 6120 §6.4.6); bytes behind it, if any,
            # belong to the new stream.
            trailing = self._parser.trailing
            self._parser = self._new_parser()
            pending = self._parser.feed(trailing) if trailing else []
            if not pending:
                return out, events

    def _new_parser(self) -> XmlStreamParser:
        return XmlStreamParser(max_stanza_bytes=self.max_stanza_bytes,
                               stop_after=lambda el: el.is_(NS_SASL, "success"))

    def _on_event(self, event) -> tuple[bytes, list[AuthEvent]]:
        if isinstance(event, XmlError):
            return self._break(f"the peer {self.peer} broke the stream ({event.condition}: {event.text})",
                               stream_error(event.condition, event.text))
        if isinstance(event, StreamOpened):
            if self.state != "header":
                return self._break(f"the peer {self.peer} sent a second stream header",
                                   stream_error("bad-format", "a second stream header"))
            self.stream_id = (event.id or "").strip()
            # RFC 6120 §4.7.5: without version 1.0 no features follow (a pre-RFC server).
            self.state = "features" if (event.version or "").startswith("1.") else "ready"
            return self._advance() if self.state == "ready" else (b"", [])
        if isinstance(event, StreamClosed):
            self.state = "ended"
            return b"", [PeerEnded()]
        if self.state == "header":
            return self._break(f"the peer {self.peer} sent <{event.name}> before its stream header",
                               stream_error("bad-format", "an element before the stream header"))
        rule = admit(Stage.OUTBOUND_PEER, event.ns, event.name)
        if isinstance(rule, Refusal):
            return self._refuse(event, rule)
        if event.is_(NS_STREAMS, "error"):
            self.state = "ended"
            why = f"the peer {self.peer} ended the stream: {describe_stream_error(event)}"
            if self._external_note and self.stream_from not in self.authenticated:
                why += f" (after {self._external_note})"
            return b"", [PeerBroken(why)]
        if rule is Passage.FEATURES:
            if self.state != "features":
                return self._refuse(event, Refusal("unsupported-stanza-type", "came a second time on one stream"))
            self.mechanisms = offered_mechanisms(event)
            self.state = "ready"
            return self._advance()
        if event.ns == NS_SASL:
            return self._on_sasl(event)
        if rule is Passage.ANSWER:
            return self._on_dialback_answer(event)
        return self._refuse(event, Refusal("unsupported-stanza-type",
                                           "is not expected on a stream the proxy authenticates itself"))

    def _on_sasl(self, el: Element) -> tuple[bytes, list[AuthEvent]]:
        question = self._sasl_question
        if self.state != "sasl" or question is None:
            return self._refuse(el, Refusal("unsupported-stanza-type", "answers no <auth/> of ours"))
        if el.name == "challenge":
            self._challenges += 1
            if self._challenges > 1:
                return self._break(f"the peer {self.peer} sent a second SASL challenge to EXTERNAL",
                                   stream_error("policy-violation", "EXTERNAL takes at most one empty challenge"))
            return _RESPONSE, []
        self._sasl_question = None
        if el.name == "success":
            # RFC 6120 §6.4.6: the stream is authenticated for the authzid and restarts.
            self.authenticated[question.local] = "sasl-external"
            self.state = "header"
            self.restarts += 1
            return self.opening(), [Authenticated(question.local, "sasl-external")]
        # <failure/> (RFC 6120 §6.5): the same domain tries dialback instead.
        reason = _sasl_failure_reason(el)
        self._external_note = f"SASL EXTERNAL refused by {self.peer} ({reason})"
        self._queue.appendleft(question)
        self.state = "ready"
        return self._advance()

    def _on_dialback_answer(self, el: Element) -> tuple[bytes, list[AuthEvent]]:
        kind = el.attrs.get("type")
        try:
            frm, to = read_domain(el.attrs.get("from", "")), read_domain(el.attrs.get("to", ""))
        except DomainReadingError:
            frm = to = ""
        question = None
        if kind in ("valid", "invalid", "error") and frm == self.peer:
            if el.name == "result":
                question = self._asked_results.pop(to, None)
            else:
                question = self._asked_verifies.pop((to, el.attrs.get("id", "")), None)
        if question is None:
            return self._refuse(el, Refusal("unsupported-stanza-type",
                                            "answers no dialback question asked on this stream"))
        if el.name == "verify":
            valid = kind == "valid"
            answer = (db_verify_answer(question.local, self.peer, question.stream_id, valid) if kind != "error"
                      else dialback_error(question.local, self.peer, "remote-server-timeout",
                                          f"{self.peer} answered with an error: {dialback_error_reason(el)}",
                                          name="verify", id=question.stream_id))
            return b"", [VerifyAnswered(question.local, question.stream_id, valid, answer)]
        if kind == "valid":
            self.authenticated[question.local] = "dialback"
            note = self._external_note if question.local == self.stream_from else ""
            return b"", [Authenticated(question.local, "dialback", note)]
        if kind == "invalid":
            why = (f"{self.peer} answered <db:result type='invalid'> for {question.local}: it could not "
                   f"verify the proxy's dialback key with {question.local}'s authoritative server")
        else:
            why = f"{self.peer} refused {question.local} by dialback: {dialback_error_reason(el)}"
        if question.local == self.stream_from and self._external_note:
            why += f"; {self._external_note}"
        return b"", [NotAuthenticated(question.local, why)]

    # -- sending questions -----------------------------------------------------------------

    def _advance(self) -> tuple[bytes, list[AuthEvent]]:
        """Send what the queue holds, as far as the stream's state allows."""
        out, events = b"", []
        if len(self._queue) + len(self._asked_results) + len(self._asked_verifies) > self.max_questions:
            return self._break(f"more than {self.max_questions} questions to {self.peer} unanswered at once",
                               b"")
        while self.state == "ready" and self._queue:
            q = self._queue.popleft()
            if q.kind == "verify":
                out += db_verify(q.local, self.peer, q.stream_id, q.key)
                q.sent_at = self.clock()
                self._asked_verifies[(q.local, q.stream_id)] = q
                continue
            if q.local in self.authenticated:
                events.append(Authenticated(q.local, self.authenticated[q.local]))
                continue
            if q.local == self.stream_from and not self._external_tried and EXTERNAL in self.mechanisms:
                # XEP-0178 §3: EXTERNAL for the domain whose certificate the TLS handshake showed.
                self._external_tried = True
                self._sasl_question = q
                self._challenges = 0
                q.sent_at = self.clock()
                self.state = "sasl"
                out += auth_external(q.local)
                break
            if q.local == self.stream_from and not self._external_tried and not self._external_note:
                self._external_note = f"{self.peer} does not offer SASL EXTERNAL"
            if not self.stream_id:
                events.append(NotAuthenticated(q.local, f"the peer {self.peer} gave its stream no id, which "
                                                        "dialback binds its key to (XEP-0185 §3)"))
                continue
            # XEP-0185 §3: key for D receiving from L on D's stream id; our inbound side checks it.
            key = self.keys.mint(receiving=self.peer, originating=q.local, stream_id=self.stream_id)
            out += db_result(q.local, self.peer, key)
            q.sent_at = self.clock()
            self._asked_results[q.local] = q
        return out, events

    # -- ending ----------------------------------------------------------------------------

    def _refuse(self, el: Element, rule: Refusal) -> tuple[bytes, list[AuthEvent]]:
        text = f"{describe(el.ns, el.name)} {rule.why}"
        if len(text) > 600:
            text = text[:600] + "…"
        return self._break(f"the peer {self.peer} sent {text}; stream closed", stream_error(rule.condition, text))

    def _break(self, reason: str, to_peer: bytes) -> tuple[bytes, list[AuthEvent]]:
        self.state = "ended"
        return to_peer, [PeerBroken(reason)]


def _sasl_failure_reason(el: Element) -> str:
    """The condition (and text) of a SASL `<failure/>` (RFC 6120 §6.5)."""
    condition = next((c.name for c in el.children if c.ns == NS_SASL and c.name != "text"), "undefined-condition")
    text = ""
    node = el.find(NS_SASL, "text")
    if node is not None and node.span is not None:
        text = element_text(Element(ns=node.ns, name=node.name, attrs=node.attrs,
                                    raw=el.raw[node.span[0]:node.span[1]])).strip()
    return f"{condition}: {text}" if text else condition
