"""How a domain pair gets authenticated and checked on an inbound stream (DESIGN §3.1 steps
4-5, §3.3): the `DomainPairs` part of `proxy.inbound_session.InboundSession`, sans-IO.

* `<db:result from=A to=B>` (XEP-0220 §2.1.1): A's policy is judged against the peer's
  certificate (`CheckDialback`); accepted pairs are asserted to the backend -- with the
  peer's key, or with the proxy's own when a certificate proved the pair and the backend's
  outbound goes through the proxy (`inbound.sasl_external`), which then answers the backend's
  check of that key itself (XEP-0344 §2: the reverse connection would prove nothing more).
* `<db:verify>` (the peer checking a key): answered by the proxy when it is a key the proxy's
  outbound side minted (`proxy.dialback_keys.DialbackKeys.answer`), relayed otherwise.
* SASL EXTERNAL (RFC 6120 §6, XEP-0178): offered after TLS with a client certificate, judged
  exactly as a `<db:result>` for the asserted domain; on `<success/>` the peer restarts its
  stream, the proxy asserts the pair to the backend by dialback with its own key, and the
  peer's stanzas of that pair are held until the backend confirms.
* Stanzas pass only for a pair the backend confirmed (`invalid-from` otherwise).

`verdict()` (the shell's answer to `CheckDialback`, for a `<db:result>` and an `<auth/>` alike)
and the peer parser's SASL stop-and-resume live here too.

`DomainPairs` is a mixin: it works on the session's state and uses its plumbing (`_out`,
`_error`, `_end_backend_stream`, `_undeliverable`, the peer parser) -- the split is by idea,
so that the stream's life (`proxy.inbound_session`) and how pairs are authenticated on it
can each be read on their own.
"""
from __future__ import annotations

import functools
import secrets

from policy.domain_reading import DomainReadingError, domainpart, read_domain
from policy.pkix_names import normalise_domain
from proxy.bounce import error_reply, needs_error_reply
from proxy.gate import describe
from proxy.inbound_actions import Action, Authenticated, CheckDialback, Note, SendToBackend, SendToPeer
from proxy.inbound_auth import (
    BACKEND_REFUSED_KEY, MAX_SASL_FAILURES, certificate_proved, external_identity, is_sasl_auth, proxy_db_result,
)
from proxy.s2s_auth import SaslError, dialback_error, failure, success
from proxy.xmlstream import NS_DIALBACK, Element, Node, StreamOpened, XmlStreamParser, stream_header

# Metronome closes a stream after 10 dialback failures; a peer that keeps asserting domains
# it cannot prove is probing, and each attempt costs DNS lookups.
MAX_DIALBACK_REJECTIONS = 10
# Reasons quote peer data (domains, element names); a peer must not make us log megabytes.
_MAX_REASON_CHARS = 600


def local_reading(name: str) -> str:
    """A configured local domain's canonical form."""
    # Configured names come from the operator; one whose readings differ can never match a
    # peer's (those are refused), so its UTS #46 form is as good as any.
    try:
        return read_domain(name)
    except DomainReadingError:
        return normalise_domain(name)


def unreadable(name: str) -> bool:
    """Whether `name` has no one reading (DESIGN §2.6)."""
    try:
        read_domain(name)
        return False
    except DomainReadingError:
        return True


def clip(text: str) -> str:
    """`text` cut to a length fit for a log line and a stream error."""
    return text if len(text) <= _MAX_REASON_CHARS else text[:_MAX_REASON_CHARS] + "…"


@functools.lru_cache(maxsize=4096)   # every stanza's from/to; few distinct JIDs per stream
def jid_domain(jid: str) -> str:
    """The domainpart of a JID (RFC 7622 §3.2) in its one reading: `user@Example.org/res` ->
    `example.org`.  Raises `DomainReadingError` (DESIGN §2.6)."""
    return read_domain(domainpart(jid))


def describe_element(element: Node) -> str:
    """The element as a peer's operator would recognise it in an error text."""
    return describe(element.ns, element.name)


class DomainPairs:
    """The domain-pair steps of `InboundSession` (see the module docstring)."""

    __slots__ = ()   # the attributes are InboundSession's

    # ------------------------------------------------------------------ verdicts

    def verdict(self, sender: str, target: str, accepted: bool, reason: str,
                prooftype: str | None = None) -> list[Action]:
        """The answer to `CheckDialback(sender, target)`: the verdict's accept/reject, its
        reason and, when accepted, its prooftype (DESIGN §2.5)."""
        waiting = self._waiting
        if not isinstance(waiting, CheckDialback) or (waiting.sender, waiting.target) != (sender, target):
            return []
        element, self._pending_result, self._waiting = self._pending_result, None, None
        pair = (sender, target)
        if is_sasl_auth(element):
            self._sasl_verdict(pair, accepted, reason, prooftype)
        elif accepted and self.sasl.pair is not None and not certificate_proved(prooftype):
            # After SASL the peer's stream carries the proxy's id, not the backend's (RFC 6120
            # §4.7.3: every stream gets a new id), and a dialback key is bound to the id the
            # peer saw (XEP-0185 §3).  Where dialback itself is the proof (prooftype `tls`)
            # the backend would check that key against its own id and answer invalid: say why
            # here instead, so the peer can open a stream of its own for this domain.
            reason = (f"{sender} is proved by dialback alone (prooftype {prooftype}), and after SASL "
                      f"this stream's id is the proxy's, not the backend's, so the backend cannot check "
                      f"the key: open a new stream for {sender}")
            self.rejected[pair] = reason
            self._reject_dialback(sender, target, reason)
        elif accepted:
            self.accepted[pair] = prooftype
            self.rejected.pop(pair, None)
            if not self._backend_closed_sent:   # the peer may have ended meanwhile
                self._out.append(SendToBackend(self._result_for_backend(element, pair)))
        else:
            self.rejected[pair] = reason
            self._reject_dialback(sender, target, reason)
        if self.closed:
            return self._take()
        return self._drain()

    def _confirmed(self, pair: tuple[str, str]) -> None:
        """The backend confirmed `pair`.  The first confirmation ends the handshake (DESIGN
        §3.1 Deadlines) -- unless the peer has yet to restart after SASL, which the handshake
        deadline still bounds."""
        self.authenticated.add(pair)
        if not self._handshake_over and not self.sasl.awaiting_restart:
            self._handshake_over = True
            self._out.append(Authenticated())

    def _new_peer_parser(self) -> XmlStreamParser:
        """A parser for the peer's stream after TLS.  While EXTERNAL may still be negotiated it
        stops after an `<auth/>`: what follows belongs to a new stream if it succeeds (RFC 6120
        §6.4.6), to this one if not (`_resume_peer_stream`)."""
        stop = is_sasl_auth if self.sasl.offerable and self.sasl.pair is None else None
        return XmlStreamParser(max_stanza_bytes=self.max_stanza_bytes, stop_after=stop)

    def _resume_peer_stream(self) -> None:
        """Go on parsing the peer's stream after an `<auth/>` that did not succeed: a fresh
        parser given the peer's header again (for its namespace declarations, its event
        dropped) and the bytes that followed the `<auth/>`.  (A parser that did not stop --
        no EXTERNAL offered -- simply goes on.)"""
        if self._peer_parser.state != "stopped":
            return
        trailing = self._peer_parser.trailing
        self._peer_parser = self._new_peer_parser()
        assert self._peer_header is not None
        events = self._peer_parser.feed(self._peer_header.raw + trailing)
        self._enqueue([e for e in events if not isinstance(e, StreamOpened)], first=True)

    # ------------------------------------------------------------------ dialback

    def _on_dialback_result(self, el: Element) -> None:
        sender, target = el.attrs.get("from"), el.attrs.get("to")
        if not sender or not target:
            self._end_backend_stream()
            self._error("improper-addressing", "<db:result> needs both 'from' and 'to' (XEP-0220 §2.1.1)")
            return
        readings = self._read_dialback_pair(el, sender, target)
        if readings is None:
            return
        sender, target = pair = readings
        if target not in self.local_domains:
            reason = clip(f"{target!r} is not a domain served here")
            if self.dialback_errors:
                self._count_rejection()
                if not self.closed:
                    self._out.append(SendToPeer(dialback_error(sender, target, "item-not-found", reason)))
            else:
                self._end_backend_stream()
                self._error("host-unknown", reason)
            return
        if pair in self.accepted:
            self._out.append(SendToBackend(self._result_for_backend(el, pair)))  # renewed key
            return
        if pair in self.rejected:
            self._reject_dialback(sender, target, self.rejected[pair])
            return
        self._pending_result = el
        self._waiting = CheckDialback(sender, target)
        self._out.append(self._waiting)

    def _read_dialback_pair(self, el: Element, sender: str, target: str) -> tuple[str, str] | None:
        """(from, to) of a dialback element in their one reading (DESIGN §2.6), or None after
        refusing it: a dialback error (jid-malformed, RFC 6120 §8.3.3.8) if the peer
        understands them, else a stream error."""
        try:
            return read_domain(sender), read_domain(target)
        except DomainReadingError as exc:
            which = "from" if unreadable(sender) else "to"
            text = clip(f"<db:{el.name}> '{which}': {exc}")
            if self.dialback_errors:
                self._count_rejection()
                if not self.closed:
                    self._out.append(SendToPeer(dialback_error(
                        sender, target, "jid-malformed", text, name=el.name,
                        id=el.attrs.get("id") if el.name == "verify" else None)))
            else:
                self._end_backend_stream()
                self._error("invalid-from" if which == "from" else "improper-addressing", text)
            return None

    def _on_dialback_verify(self, el: Element) -> None:
        """<db:verify>: the peer, as receiving server, asks our backend (as the authoritative
        server) about a key; it asserts nothing about the peer, so it is not judged (DESIGN
        §3.1 step 4).  But the backend reads its addresses: one reading each, and 'to' must be
        a domain served here (XEP-0220 §2.1.2: the originating server's own domain)."""
        sender, target = el.attrs.get("from"), el.attrs.get("to")
        if not sender or not target or not el.attrs.get("id"):
            self._end_backend_stream()
            self._error("improper-addressing", "<db:verify> needs 'from', 'to' and 'id' (XEP-0220 §2.1.2)")
            return
        readings = self._read_dialback_pair(el, sender, target)
        if readings is None:
            return
        if readings[1] not in self.local_domains:
            reason = clip(f"{readings[1]!r} is not a domain served here")
            if self.dialback_errors:
                self._count_rejection()
                if not self.closed:
                    self._out.append(SendToPeer(dialback_error(
                        readings[0], readings[1], "item-not-found", reason, name="verify", id=el.attrs["id"])))
            else:
                self._end_backend_stream()
                self._error("host-unknown", reason)
            return
        # DESIGN §3.3: a key the proxy's outbound side minted for our domain on a stream to
        # this peer is answered here; the backend never saw it and could not.
        answer = self.keys.answer(el, *readings) if self.keys is not None else None
        if answer is not None:
            self._out.append(SendToPeer(answer))
            return
        self._out.append(SendToBackend(el.raw))

    def _result_for_backend(self, el: Element, pair: tuple[str, str]) -> bytes:
        """What the backend gets for the peer's accepted `<db:result>`: a key of the proxy's
        own when a certificate proved the pair (DESIGN §3.3, XEP-0344 §2: the backend's check
        is then answered by the proxy's outbound side with no connection to the peer), the
        peer's bytes when dialback itself is the proof (prooftype `tls`) or no stream id is
        known to bind a key to."""
        if not (self._sasl_external and self.backend_stream_id and certificate_proved(self.accepted.get(pair))):
            return el.raw
        assert self.keys is not None
        return proxy_db_result(self.keys, pair[0], pair[1], self.backend_stream_id)

    def _reject_dialback(self, sender: str, target: str, reason: str) -> None:
        text = clip(f"{sender} not authenticated: {reason}")
        if self.dialback_errors:
            # XEP-0220 §2.4: a dialback error is not fatal for the stream; other domain
            # pairs on it keep working.
            self._count_rejection()
            if not self.closed:
                self._out.append(SendToPeer(dialback_error(sender, target, "not-authorized", text)))
        else:
            self._end_backend_stream()
            self._error("not-authorized", text)

    def _count_rejection(self) -> None:
        self.rejections += 1
        if self.rejections >= MAX_DIALBACK_REJECTIONS:
            self._end_backend_stream()
            self._error("policy-violation", f"{self.rejections} dialback requests rejected on this stream")

    # ------------------------------------------------------------------ SASL EXTERNAL (DESIGN §3.3)

    def _on_sasl_auth(self, el: Element) -> None:
        """RFC 6120 §6.4.2 / XEP-0178 §3: the peer asks to be authenticated as a domain by its
        certificate.  Judged exactly as a `<db:result>` for that domain (`CheckDialback`)."""
        if self.state != "relay":
            self._resume_peer_stream()   # the stream is ending: no new authentication
            return
        if not self.sasl.offered:
            self._end_backend_stream()
            self._error("policy-violation", "<auth/> but SASL was not offered on this stream (EXTERNAL is offered "
                                            "after TLS with a client certificate when inbound.sasl_external is on)")
            return
        try:
            sender = external_identity(el, self.peer_domain)
        except SaslError as exc:
            self._sasl_failed(exc.condition, exc.text)
            return
        assert self.local_domain is not None
        self._pending_result = el
        self._waiting = CheckDialback(sender, self.local_domain)
        self._out.append(self._waiting)

    def _sasl_failed(self, condition: str, text: str) -> None:
        """RFC 6120 §6.4.5: `<failure/>`; the peer may try again (bounded) on the same stream."""
        self.sasl.failures += 1
        self._out.append(Note("sasl-external-failure", f"{condition}: {clip(text)}"))
        self._out.append(SendToPeer(failure(condition, clip(text))))
        self._count_rejection()
        if self.closed:
            return
        if self.sasl.failures >= MAX_SASL_FAILURES:
            self._end_backend_stream()
            self._error("policy-violation", f"{self.sasl.failures} SASL failures on this stream (RFC 6120 §6.4.5)")
            return
        self._resume_peer_stream()

    def _sasl_verdict(self, pair: tuple[str, str], accepted: bool, reason: str, prooftype: str | None) -> None:
        if self.state != "relay":
            self._resume_peer_stream()   # the stream began to end meanwhile
            return
        if not accepted:
            self.rejected[pair] = reason
            self._sasl_failed("not-authorized", f"{pair[0]} not authenticated: {reason}")
            return
        assert self.keys is not None and self.backend_stream_id
        self.accepted[pair] = prooftype
        self.rejected.pop(pair, None)
        self.sasl.pair = pair
        self.sasl.awaiting_restart = True
        self._out.append(SendToPeer(success()))
        self._out.append(Note("sasl-external", f"{pair[0]} -> {pair[1]} authenticated by its certificate "
                                               f"({prooftype}); asserted to the backend with the proxy's key"))
        # The backend never restarts its stream: the pair is asserted on it by dialback, with
        # a key the proxy's outbound side will recognise when the backend checks it.
        self._out.append(SendToBackend(proxy_db_result(self.keys, pair[0], pair[1], self.backend_stream_id)))
        # RFC 6120 §6.4.6: the old stream is over on both sides; the peer's next bytes open a
        # new one, which gets our new header (`_on_restart`) before anything else.
        trailing = self._peer_parser.trailing
        self._peer_parser = self._new_peer_parser()
        self._header_sent = False
        self._peer_bound = []
        self._enqueue(self._peer_parser.feed(trailing))

    def _on_restart(self, header: StreamOpened) -> None:
        """The peer's header after `<success/>` (RFC 6120 §6.4.6): ours with a new stream id
        (§4.7.3) and empty features -- nothing is left to negotiate."""
        pair = self.sasl.pair
        assert pair is not None
        if self.peer_domain is not None and self.peer_domain != pair[0]:
            self._error("invalid-from", f"the stream restarted after SASL is from {self.peer_domain}, but "
                                        f"{pair[0]} was authenticated")
            return
        self.sasl.awaiting_restart = False
        self.dialback_errors = NS_DIALBACK in header.namespaces.values()
        self._out.append(SendToPeer(stream_header(from_=pair[1], to=pair[0], id=secrets.token_hex(8))
                                    + b"<stream:features/>"))
        self._header_sent = True
        bound, self._peer_bound = self._peer_bound or [], None
        self._out.extend(SendToPeer(data) for data in bound)
        if self.authenticated and not self._handshake_over:   # the backend confirmed meanwhile
            self._handshake_over = True
            self._out.append(Authenticated())

    def _answers_sasl(self, el: Element) -> bool:
        """Whether the backend's `<db:result type=…>` answers the one the proxy sent for the
        SASL pair (XEP-0220 §2.1.3: from/to swapped)."""
        try:
            answer = (read_domain(el.attrs.get("to", "")), read_domain(el.attrs.get("from", "")))
        except DomainReadingError:
            return False
        return answer == self.sasl.pair and el.attrs.get("type") in ("valid", "invalid", "error")

    def _on_sasl_answer(self, el: Element) -> None:
        """The backend's answer to the proxy's `<db:result>`: consumed (the peer never asked).
        Valid: the pair is authenticated and the held stanzas follow, in order."""
        pair = self.sasl.pair
        assert pair is not None
        held = self.sasl.release()
        if el.attrs.get("type") == "valid":
            self.sasl.confirmed = True
            self._confirmed(pair)
            for stanza in held:
                if self._backend_lost:
                    self._undeliverable(stanza)
                else:
                    self._out.append(SendToBackend(stanza.raw))
            if self._end_after_release:
                self._end_backend_stream()
            return
        self._out.append(Note("sasl-backend-refused", f"{pair[0]} -> {pair[1]}: {BACKEND_REFUSED_KEY}",
                              warning=True))
        for stanza in held:
            if needs_error_reply(stanza) and self._header_sent and self.state in ("relay", "peer-done"):
                self.returned += 1
                self._out.append(SendToPeer(error_reply(stanza, f"not delivered: {BACKEND_REFUSED_KEY}")))
        self._end_backend_stream()
        self._error("not-authorized", BACKEND_REFUSED_KEY)

    def _on_stanza(self, el: Element) -> None:
        sender, target = el.attrs.get("from"), el.attrs.get("to")
        if not sender or not target:
            # RFC 6120 §8.1.1.2 / §8.1.2.2: on S2S streams both addresses are required.
            self._end_backend_stream()
            self._error("improper-addressing", f"{describe_element(el)} without 'from' and 'to'")
            return
        try:
            from_domain = jid_domain(sender)
        except DomainReadingError as exc:
            self._end_backend_stream()
            self._error("invalid-from", f"{describe_element(el)} 'from': {exc}")
            return
        try:
            to_domain = jid_domain(target)
        except DomainReadingError as exc:
            self._end_backend_stream()
            self._error("improper-addressing", f"{describe_element(el)} 'to': {exc}")
            return
        pair = (from_domain, to_domain)
        if pair == self.sasl.pair and self.sasl.pending:
            if self._backend_lost:
                self._undeliverable(el)
            elif (why := self.sasl.hold(el)) is not None:
                self._end_backend_stream()
                self._error("policy-violation", why)
            return
        if pair in self.authenticated:
            if self._backend_lost:
                self._undeliverable(el)
            else:
                self._out.append(SendToBackend(el.raw))
                self._route(el.name, sender, target)
            return
        if self.authenticated:
            have = ", ".join(f"{a}->{b}" for a, b in sorted(self.authenticated))
            why = f"{describe_element(el)} from {pair[0]} to {pair[1]}, but only {have} is authenticated on this stream"
        else:
            why = f"{describe_element(el)} from {pair[0]} to {pair[1]} before any domain was authenticated"
        self._end_backend_stream()
        self._error("invalid-from", why)

__all__ = ["DomainPairs", "MAX_DIALBACK_REJECTIONS", "clip", "describe_element", "jid_domain", "local_reading"]
