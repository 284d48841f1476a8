"""How an inbound stream ends (DESIGN §3.1 step 6, §3.4, §4): the `StreamEndings` part of
`proxy.inbound_session.InboundSession`, sans-IO.

* The backend goes away: before answering (`remote-connection-failed`), while relaying (the
  peer's later stanzas are answered as undeliverable, RFC 6120 §8.3, until it falls quiet),
  after closing its stream, or silent past its deadline.
* Time runs out: the handshake deadline (the error names what hung: TLS, the backend, the
  restart after SASL, the backend's confirmation), `limits.idle_timeout`.
* The proxy stops (`system-shutdown`: drain, then stop) or a pair is revoked on
  re-verification (DESIGN §3.4).
* The plumbing every ending shares: the backend's closing tag, the peer's stream error (with
  our header first when the peer has none yet, RFC 6120 §4.9.1.1), and the `Close` that
  reports how the stream ended.

`StreamEndings` is a mixin, as `proxy.inbound_pairs.DomainPairs` is: it works on the
session's state and uses its plumbing (`_out`, `_take`, the peer header); the split is by
idea, so that the stream's life and its endings can each be read on their own.
"""
from __future__ import annotations

import secrets

from proxy.bounce import elements_in, error_reply, needs_error_reply
from proxy.inbound_actions import OUTCOMES, Action, Close, Note, PeerGrace, SendToBackend, SendToPeer
from proxy.inbound_auth import BACKEND_REFUSED_KEY
from proxy.inbound_pairs import DomainPairs, clip
from proxy.xmlstream import STREAM_CLOSE, Element, stream_error, stream_header

# The backend's connection was lost: stanzas the peer sent before it learnt of it are still
# arriving, and each is answered as undeliverable while our stream stays open.  The peer is
# taken to have sent all of them once it has been quiet for a round trip with margin (0.5 s,
# well above intercontinental RTTs); a peer that never falls quiet is closed after 5 s, so
# new traffic soon goes to a new connection (and, once the backend is back, gets delivered).
BACKEND_GONE_QUIET = 0.5
BACKEND_GONE_LIMIT = 5.0
# The `outcome` (metrics label, `stream-closed` line) of a stream error whose condition is not
# an outcome of its own: the nearest one, so the label's values stay a short fixed list.
_OUTCOME_OF_CONDITION = {
    "bad-format": "not-well-formed", "bad-namespace-prefix": "not-well-formed",
    "invalid-namespace": "not-well-formed", "unsupported-encoding": "not-well-formed",
    "improper-addressing": "invalid-from", "internal-server-error": "remote-connection-failed",
    "unsupported-stanza-type": "policy-violation",
}


class StreamEndings(DomainPairs):
    """The ending steps of `InboundSession` (see the module docstring)."""

    __slots__ = ()   # the attributes are InboundSession's

    # ------------------------------------------------------------------ inputs: backend

    def backend_eof(self, reason: str = "") -> list[Action]:
        """The backend connection ended (or broke) without `</stream:stream>`."""
        if self.closed:
            return []
        self._backend_lost = self._backend_closed_sent = True
        why = f"{self.describe_backend} closed the connection{': ' + reason if reason else ''}"
        if self.state == "draining":
            self._close(why, outcome="system-shutdown")
            return self._take()
        if not self._backend_header_seen:
            self._error("remote-connection-failed", why + " before answering the stream")
            return self._take()
        if self.state == "relay":
            # The backend is gone (crashed, or restarted without ending its stream).  What
            # the peer sends from now on cannot be delivered: each stanza is answered with an
            # error (RFC 6120 §8.3, proxy/bounce.py) while our stream stays open, until the
            # peer falls quiet (what it had under way has arrived) or a bound passes; then
            # the stream ends with remote-connection-failed.
            self.state, self._gone_reason = "backend-gone", why
            for held in self.sasl.release():
                self._undeliverable(held)
            self._out.append(PeerGrace(BACKEND_GONE_QUIET, BACKEND_GONE_LIMIT))
            return self._take()
        if self.state == "backend-done":
            return []   # already closed towards the peer; its late stanzas are counted, not sent
        self._out.append(SendToPeer(STREAM_CLOSE))
        self._close(why)
        return self._take()

    def backend_send_failed(self, data: bytes, reason: str) -> list[Action]:
        """Sending `data` to the backend failed: its connection is gone.  The stanzas in
        `data` are answered as undeliverable (where the stream to the peer is still open)."""
        if self.closed:
            return []
        lost = elements_in(data, self._peer_header.raw if self._peer_header else b"", self.backend_max_element_bytes)
        ended = self.backend_eof(reason)   # (it resets self._out: extend the new one)
        self._out.extend(ended)
        for el in lost:
            self._undeliverable(el)
        return self._take()

    def backend_silent(self, seconds: float) -> list[Action]:
        """The backend accepted the connection but sent no stream header in `seconds`."""
        if self.closed or self._backend_header_seen or self.state not in ("relay", "connecting"):
            return []
        self._end_backend_stream()
        self._error("remote-connection-failed",
                    f"{self.describe_backend} accepted the connection but sent no stream header within {seconds:g} s")
        return self._take()

    def grace_over(self) -> list[Action]:
        """The wait announced by `PeerGrace` is over: end the stream."""
        if self.state == "backend-done":
            self._end_backend_stream()
            self._close("the backend closed the stream; the peer did not close its own in time")
        elif self.state == "backend-gone":
            self._error("remote-connection-failed", self._gone_reason)
        return self._take()

    def _undeliverable(self, el: Element) -> None:
        """A stanza for a backend that is gone: an error back to its sender while our stream
        to the peer is open (RFC 6120 §8.3), else counted for the log."""
        if not needs_error_reply(el):
            return
        if self.state == "backend-gone":
            self.returned += 1
            self._out.append(SendToPeer(error_reply(
                el, f"not delivered: the receiving server is unavailable ({self._gone_reason})")))
        else:
            self.undeliverable += 1

    # ------------------------------------------------------------------ inputs: verdicts, time

    def timed_out(self, seconds: float) -> list[Action]:
        """The handshake timeout expired (normally before the stream was negotiated)."""
        if self.closed:
            return []
        if self.negotiated and not self._backend_header_seen:
            return self.backend_silent(seconds)   # the backend, not the peer, is what hangs
        if self.negotiated and self.sasl.awaiting_restart:
            self._end_backend_stream()
            self._error("connection-timeout", f"the stream was not restarted within {seconds:g} s of SASL <success/> "
                                              "(RFC 6120 §6.4.6; limits.handshake_timeout)")
            return self._take()
        if self.negotiated and self.sasl.pending:
            text = (f"the backend did not confirm {self.sasl.pair[0]} within {seconds:g} s (limits.handshake_timeout): "
                    + BACKEND_REFUSED_KEY.replace("did not accept", "did not answer"))
            self._out.append(Note("sasl-backend-silent", text, warning=True))
            self._end_backend_stream()
            self._error("connection-timeout", text)
            return self._take()
        if self.negotiated:
            # DESIGN §3.1 Deadlines: the handshake ends when the backend confirms a pair.
            self._end_backend_stream()
            self._error("connection-timeout", f"no domain pair authenticated within {seconds:g} s "
                        "(limits.handshake_timeout)")
            return self._take()
        if self.state == "tls":
            self._close(f"TLS handshake not completed within {seconds:g} s", outcome="connection-timeout")
            return self._take()
        if self.state == "connecting":
            self._error("remote-connection-failed",
                        f"{self.describe_backend} did not accept the connection within {seconds:g} s")
            return self._take()
        self._error("connection-timeout", f"stream negotiation not completed within {seconds:g} s")
        return self._take()

    def idle_timed_out(self, seconds: float) -> list[Action]:
        """No byte from the peer for `limits.idle_timeout` seconds after authentication."""
        if self.closed:
            return []
        self._end_backend_stream()
        self._error("connection-timeout", f"nothing received from the peer for {seconds:g} s (limits.idle_timeout)")
        return self._take()

    def shutdown(self, text: str = "the proxy is shutting down") -> list[Action]:
        """The proxy stops (RFC 6120 §4.9.3.19 system-shutdown)."""
        if self.closed:
            return []
        if self.state == "tls":
            self._close(text, outcome="system-shutdown")
            return self._take()
        if self.state == "relay":
            # RFC 6120 §4.4: we close our stream (system-shutdown, §4.9.3.19) but keep
            # processing what the peer sent before it saw that; the backend's stream ends
            # once the peer closes its side (or the drain time of the shell runs out).
            self._out.append(SendToPeer(stream_error("system-shutdown", text)))
            self.state = "draining"
            return self._take()
        if self.state in ("draining", "backend-done"):
            return []   # our stream to the peer is closed already; the drain bound applies
        self._end_backend_stream()
        self._error("system-shutdown", text)
        return self._take()

    def stopped(self, text: str = "the proxy stopped") -> list[Action]:
        """The proxy stops now: the drain time is over (or the task was cancelled).  The
        backend's stream always gets its closing tag; the peer gets system-shutdown unless
        our stream to it is closed already."""
        if self.closed:
            return []
        if self.state in ("draining", "backend-done"):
            self._end_backend_stream()
            self._close(f"{text}: the peer did not close its stream in time", outcome="system-shutdown")
        elif self.state == "tls":
            self._close(text, outcome="system-shutdown")
        else:
            self._end_backend_stream()
            self._error("system-shutdown", text)
        return self._take()

    def revoked(self, condition: str, text: str) -> list[Action]:
        """DESIGN §3.4: a pair accepted earlier is no longer accepted after re-verification:
        the backend's stream ends politely, the peer gets stream error `condition` with `text`."""
        if self.closed:
            return []
        self._end_backend_stream()
        self._error(condition, text)
        return self._take()

    def _finish_drain(self, why: str) -> None:
        self._end_backend_stream()
        self._close(why, outcome="system-shutdown")

    # ------------------------------------------------------------------ endings

    def _end_backend_stream_after_held(self) -> None:
        """The peer ended its stream: end the backend's, unless stanzas wait for the backend to
        confirm the pair SASL authenticated -- they were accepted and go first (DESIGN §3.1
        step 6), and the backend's stream ends after them (the shell bounds the wait)."""
        if self.sasl.held and not self._backend_lost:
            self._end_after_release = True
        else:
            self._end_backend_stream()

    def _end_backend_stream(self) -> None:
        """Close the backend's stream politely (after everything already forwarded)."""
        if self.state in ("relay", "peer-done", "draining", "backend-done") and not self._backend_closed_sent:
            self._backend_closed_sent = True
            self._out.append(SendToBackend(STREAM_CLOSE))

    def _error(self, condition: str, text: str) -> None:
        """Collect stream error `condition` for the peer (with our header first if the peer
        has not seen one: RFC 6120 §4.9.1.1) and the close."""
        if self.closed:
            return
        text = clip(text)
        if self.state in ("draining", "backend-done"):
            # Our stream to the peer is already closed: no second error on it.
            self._end_backend_stream()
            self._close(text, condition)
            return
        if self.state == "tls":
            self._close(text, condition)
            return
        header = b""
        if not self._header_sent:
            to = self._peer_header.from_ if self._peer_header else None
            frm = self.local_domain or (self._peer_header.to if self._peer_header else None)
            header = stream_header(from_=frm, to=to, id=secrets.token_hex(8))
        self._out.append(SendToPeer(header + stream_error(condition, text)))
        self._header_sent = True
        self._close(text, condition)

    def _close(self, reason: str, condition: str | None = None, outcome: str | None = None) -> None:
        if not self.closed:
            if outcome is None:
                if condition is not None:
                    outcome = _OUTCOME_OF_CONDITION.get(condition, condition)
                else:
                    outcome = "ok" if self.negotiated else "closed-early"
            if self.returned or self.undeliverable:
                reason += (f" ({self.returned} stanzas returned as undeliverable, "
                           f"{self.undeliverable} arrived too late to be answered)")
            self.state = "closed"
            self._queue = None
            self._waiting = None
            # A condition outside OUTCOMES would be a bug here, not an escaped exception.
            self.ending = Close(clip(reason), condition, outcome if outcome in OUTCOMES else "closed-early")
            self._out.append(self.ending)
