"""Outbound S2S (DESIGN §3.2): backend → proxy (`outbound.listen`) → peer.

The backend (e.g. Prosody with contrib/prosody/mod_s2s_dane_proxy.lua) opens every outgoing
S2S stream to us in plaintext.  We read its stream header — `to` is the peer domain D, `from`
the local domain L — and *hold* it.  `proxy.connect.connect_peer` then resolves D, connects to
its targets in order, does STARTTLS or Direct TLS presenting L's certificate, and judges the
peer's chain with D's policy.  Only an accepted peer gets the backend's header (after our own
pre-TLS header and `<starttls/>`, for STARTTLS); from then on the two streams are relayed
element by element, bytes as received, with the peer's `<starttls/>` (and bidi, XEP-0288)
offers removed from its features.  If no target is accepted the backend gets
`remote-connection-failed` with every target's reason, and no peer has received a byte of the
backend's stream.

`OutboundSession` is the protocol without I/O (feed it bytes, it returns what to send);
`OutboundProxy` is the trio shell, one `handle()` per backend connection, used by
`proxy.server` as its `outbound_handler`.

Choices where DESIGN is silent:
* A backend header whose `from` is not a configured `[[domain]]` gets `host-unknown`
  (DESIGN §3.3: "host-unknown — unknown local domain"): the proxy has no certificate to
  present for it.  A missing `from` or `to` gets `host-unknown` too, with its own text.
* The backend's elements must be addressed `to` D: a stream was verified for D only, so
  piggybacking another peer domain (XEP-0220 §2.6 target multiplexing) gets
  `policy-violation`; the backend opens a new stream for it instead (Prosody always does).
* What the peer sends back passes the gate's table (proxy/gate.py, Stage.OUTBOUND_PEER, deny
  by default): features (minus STARTTLS and bidi), `<stream:error>`, SASL's answers, XEP-0198,
  and dialback answers only for questions the backend asked on this stream (a `<db:result>` /
  `<db:verify>` it sent, same domains in their one reading, same id).  No stanzas: they would
  need bidi (XEP-0288), which is offered to neither side.  Anything else ends the stream
  (`unsupported-stanza-type` to the peer, `remote-connection-failed` to the backend).
* A backend that sends `<starttls/>` to us (Prosody with `s2s_require_encryption = true`)
  gets `<failure/>` (RFC 6120 §5.4.2.2) and a log line saying what to change.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import trio

from policy.dns import Resolver
from policy.domain_reading import DomainReadingError, read_domain
from policy.pkix import TrustStore
from policy.pkix_names import normalise_domain
from policy.policyfile import PolicySet
from policy.verdict import Verdict
from proxy.config import Config, parse_hostport
from proxy.listen import tcp_listeners
from proxy.gate import Passage, Refusal, Stage, admit, describe
from proxy.connect import (
    DEFAULT_ATTEMPT_TIMEOUT, HAPPY_EYEBALLS_DELAY, PeerUnreachable, TargetAttempt, TlsContexts, new_stream_id,
)
from proxy.dialback_keys import DialbackKeys
from proxy.keepalive import enable_keepalive
from proxy.logsetup import format_peer, log_decision, log_event
from proxy.streamerrors import StreamError
from proxy.websocket_outbound import connect_with_transports
from proxy.xmlstream import (
    DEFAULT_MAX_STANZA_BYTES, NS_DIALBACK, NS_SERVER, NS_STREAMS, NS_TLS, STREAM_CLOSE, Element,
    StreamClosed, StreamOpened, XmlError, XmlStreamParser, stream_error, stream_header,
)

__all__ = ["CLOSE_TIMEOUT", "Opening", "OutboundContext", "OutboundProxy", "OutboundSession", "Output",
           "jid_domain"]

log = logging.getLogger("xmpp_dane_proxy.outbound")

NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIDI_FEATURE = "urn:xmpp:features:bidi"
_STANZAS = frozenset({"message", "presence", "iq"})
_TLS_FAILURE = f"<failure xmlns='{NS_TLS}'/>".encode()
# Prosody's s2s_close_timeout default: after one side closed its stream, the other gets this
# long to send its own `</stream:stream>` before the connection is dropped.
CLOSE_TIMEOUT = 5.0
# One read from either side; the TLS layer reads 64 KiB records' worth at a time as well.
_RECEIVE_SIZE = 65536
# Bound on the best-effort goodbye (system-shutdown) when the proxy is stopped mid-stream.
_GOODBYE_TIMEOUT = 1.0


def jid_domain(jid: str) -> str:
    """The domain part of a JID (RFC 7622 §3.2), normalised; "" for an empty JID."""
    bare = jid.split("/", 1)[0]
    return normalise_domain(bare.rpartition("@")[2]) if bare else ""


# ============================================================================ sans-IO session


@dataclass(frozen=True)
class Opening:
    """The backend's stream header was accepted: connect to `peer_domain` as `local_domain`."""

    peer_domain: str
    local_domain: str
    header: StreamOpened


@dataclass
class Output:
    """What to do after feeding the session: send these bytes (peer first, then backend);
    `opening` — start connecting; `close` — tear both connections down after sending;
    `outcome` — how the stream ended (the metrics outcome, DESIGN §6), set with `close`."""

    to_peer: bytes = b""
    to_backend: bytes = b""
    opening: Opening | None = None
    close: bool = False
    outcome: str | None = None
    notes: list[str] = field(default_factory=list)   # operator hints for the log


class OutboundSession:
    """One backend stream, from its header to its end, without I/O.

    States: ``opening`` (reading the backend's header) → ``connecting`` (header held; the
    shell is finding an acceptable peer) → ``relaying`` → ``closed``.  Feed `backend_data`,
    `backend_eof`, `peer_data`, `peer_eof`; call `peer_accepted()` once the peer's verdict is
    accept (its return value is the first thing the peer may receive) or `refuse()` when no
    peer will be.  Everything returned must be sent in order.
    """

    def __init__(self, *, local_domains: Collection[str],
                 max_stanza_bytes: int = DEFAULT_MAX_STANZA_BYTES) -> None:
        self.local_domains = frozenset(normalise_domain(d) for d in local_domains)
        self.max_stanza_bytes = max_stanza_bytes
        self.state = "opening"
        self.opening: Opening | None = None
        self._backend = XmlStreamParser(max_stanza_bytes=max_stanza_bytes)
        self._peer: XmlStreamParser | None = None
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._backend_has_header = False   # the backend has received a stream header (ours or the peer's)
        self.backend_closed = False        # the backend's stream has ended (its close or EOF)
        self.peer_closed = False
        self.outcome: str | None = None
        self.sasl_restarts = 0
        # Dialback questions the backend asked on this stream (DESIGN §3.1 deny by default):
        # (from, to) of its <db:result>s, (from, to, id) of its <db:verify>s, one reading each.
        self._asked_results: set[tuple[str, str]] = set()
        self._asked_verifies: set[tuple[str, str, str]] = set()

    @property
    def closing(self) -> bool:
        """One side has ended its stream; the other has CLOSE_TIMEOUT to follow."""
        return self.state == "relaying" and (self.backend_closed or self.peer_closed)

    # ------------------------------------------------------------------ backend → us

    def backend_data(self, data: bytes) -> Output:
        """Bytes from the backend: its header (→ `Output.opening`), held elements while
        connecting, relayed elements (as received) afterwards."""
        out = Output()
        if self.state == "closed" or not data:
            return out
        events = self._backend.feed(data)
        if self.state == "relaying" and not events and not data.strip() and self._backend.buffered == 0:
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
                    out.to_peer += event.raw            # restart after SASL (RFC 6120 §6.4.6)
            elif isinstance(event, StreamClosed):
                self._backend_stream_closed(out)
            elif self.state == "connecting":
                self._hold(event, out)
            else:
                self._relay_backend_element(event, out)
        return out

    def backend_eof(self) -> Output:
        """The backend closed its TCP connection."""
        out = Output()
        if self.state == "closed":
            return out
        if self.state == "relaying" and not self.backend_closed:
            out.to_peer += STREAM_CLOSE
        self.backend_closed = True
        self._finish(out, "ok" if self.state == "relaying" else "closed-early")
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
            read_domain(to)
        except DomainReadingError as exc:
            self._fail_backend(out, "host-unknown", f"'to': {exc}")
            return
        peer, local = normalise_domain(to), normalise_domain(from_)
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
        self.state = "connecting"
        out.opening = self.opening

    def _hold(self, element: Element, out: Output) -> None:
        # Backends wait for the peer's header before sending anything; a few bytes of
        # eagerness are kept, a flood is not (memory bound: one stanza's worth).
        self._held_bytes += len(element.raw)
        if self._held_bytes > self.max_stanza_bytes:
            self._fail_backend(out, "policy-violation",
                               f"more than {self.max_stanza_bytes} bytes sent before the peer's stream header")
            return
        self._note_question(element)
        self._held.append(element.raw)

    def _note_question(self, el: Element) -> None:
        """Remember a dialback question of the backend, so the peer's answer may pass."""
        if el.ns != NS_DIALBACK or el.attrs.get("type") is not None:
            return
        try:
            frm, to = read_domain(el.attrs.get("from", "")), read_domain(el.attrs.get("to", ""))
        except DomainReadingError:
            return
        if el.name == "result":
            self._asked_results.add((frm, to))
        elif el.name == "verify":
            self._asked_verifies.add((frm, to, el.attrs.get("id", "")))

    def _answers_a_question(self, el: Element) -> bool:
        """A dialback answer (XEP-0220 §2.1.2, §2.2.1) to a question the backend asked: from
        and to swapped, `type` valid/invalid/error, the same id for <db:verify>."""
        if el.attrs.get("type") not in ("valid", "invalid", "error"):
            return False
        try:
            frm, to = read_domain(el.attrs.get("from", "")), read_domain(el.attrs.get("to", ""))
        except DomainReadingError:
            return False
        if el.name == "result":
            return (to, frm) in self._asked_results
        return (to, frm, el.attrs.get("id", "")) in self._asked_verifies

    def _relay_backend_element(self, el: Element, out: Output) -> None:
        assert self.opening is not None
        if el.is_(NS_TLS, "starttls"):
            # RFC 6120 §5.4.2.2: failure, then the stream ends.  TLS to the peer is ours.
            out.notes.append("the backend sent <starttls/> to the proxy; the hop to the proxy is plaintext "
                             "by design: set s2s_require_encryption = false (Prosody) or disable STARTTLS "
                             "for s2s to the proxy")
            out.to_backend += _TLS_FAILURE + STREAM_CLOSE
            out.to_peer += STREAM_CLOSE
            self._finish(out, "policy-violation")
            return
        if el.ns in (NS_SERVER, NS_DIALBACK) and (el.name in _STANZAS or el.ns == NS_DIALBACK):
            target = jid_domain(el.attrs.get("to", ""))
            if target and target != self.opening.peer_domain:
                self._fail_backend(out, "policy-violation",
                                   f"<{el.name}> to {target} on the stream to {self.opening.peer_domain}: "
                                   f"only {self.opening.peer_domain} was verified on it; open a new stream")
                return
        self._note_question(el)
        out.to_peer += el.raw

    def _backend_stream_closed(self, out: Output) -> None:
        if self.state in ("opening", "connecting"):
            self.backend_closed = True
            self._finish(out, "closed-early")
            return
        if not self.backend_closed:
            out.to_peer += STREAM_CLOSE
        self.backend_closed = True
        if self.peer_closed:
            self._finish(out, "ok")

    def _fail_backend(self, out: Output, condition: str, text: str) -> None:
        """A stream error to the backend (with a header first if it has none yet), the peer's
        stream (if any) closed politely, and the end."""
        out.to_backend += self._backend_error(condition, text)
        if self.state == "relaying" and not self.backend_closed:
            out.to_peer += STREAM_CLOSE
        self._finish(out, condition)

    def _backend_error(self, condition: str, text: str) -> bytes:
        head = b""
        if not self._backend_has_header:
            # RFC 6120 §4.9.1.2: an error before any header is preceded by one.
            o = self.opening
            head = stream_header(from_=o.peer_domain if o else None, to=o.local_domain if o else None,
                                 id=new_stream_id())
            self._backend_has_header = True
        return head + stream_error(condition, text)

    # ------------------------------------------------------------------ the verdict

    def peer_accepted(self) -> bytes:
        """The peer was accepted: the held header and anything after it, for the peer."""
        if self.state != "connecting":
            raise RuntimeError(f"peer_accepted() in state {self.state}")
        assert self.opening is not None
        self.state = "relaying"
        self._peer = self._new_peer_parser()
        data = self.opening.header.raw + b"".join(self._held)
        self._held.clear()
        return data

    def refuse(self, condition: str, text: str) -> bytes:
        """No peer will be connected (or the header never came): the stream error for the
        backend, preceded by a header of ours if it has none."""
        if self.state == "closed":
            return b""
        out = Output()
        self._fail_backend(out, condition, text)
        return out.to_backend

    def shutdown(self, text: str = "the proxy is shutting down") -> Output:
        """DESIGN §3.3 system-shutdown to the backend; the peer's stream is closed."""
        out = Output()
        if self.state == "closed":
            return out
        if self.state == "relaying" and not self.backend_closed:
            out.to_peer += STREAM_CLOSE
        if not self.backend_closed:
            out.to_backend += self._backend_error("system-shutdown", text)
        self._finish(out, "system-shutdown")
        return out

    # ------------------------------------------------------------------ peer → us

    def _new_peer_parser(self) -> XmlStreamParser:
        # Stop right after SASL <success/>: the bytes behind it belong to a new stream.
        return XmlStreamParser(max_stanza_bytes=self.max_stanza_bytes,
                               stop_after=lambda el: el.is_(NS_SASL, "success"))

    def peer_data(self, data: bytes) -> Output:
        """Decrypted bytes from the accepted peer, relayed element by element to the backend."""
        out = Output()
        if self.state != "relaying" or not data:
            return out
        assert self._peer is not None
        events = self._peer.feed(data)
        if not events and not data.strip() and self._peer.buffered == 0 and self._backend_has_header:
            out.to_backend += b" "
        while True:
            for event in events:
                if self.state == "closed":
                    return out
                self._peer_event(event, out)
            if self.state == "closed" or self._peer.state != "stopped":
                return out
            # SASL success: both sides restart their streams (RFC 6120 §6.4.6).
            trailing = self._peer.trailing
            self._peer = self._new_peer_parser()
            self._backend = XmlStreamParser(max_stanza_bytes=self.max_stanza_bytes)
            self.sasl_restarts += 1
            events = self._peer.feed(trailing) if trailing else []
            if not events:
                return out

    def _peer_event(self, event, out: Output) -> None:
        assert self.opening is not None
        domain = self.opening.peer_domain
        if isinstance(event, XmlError):
            out.to_peer += stream_error(event.condition, event.text)
            self.peer_closed = True
            self._to_backend_error(out, f"the peer {domain} broke the stream ({event.condition}: {event.text})")
            self._finish(out, "remote-connection-failed")
        elif isinstance(event, StreamOpened):
            out.to_backend += event.raw
            self._backend_has_header = True
        elif isinstance(event, StreamClosed):
            if not self.peer_closed:
                out.to_backend += STREAM_CLOSE if self._backend_has_header else \
                    self._backend_error("remote-connection-failed", f"the peer {domain} closed its stream at once")
            self.peer_closed = True
            if self.backend_closed:
                self._finish(out, "ok")
        elif not self._backend_has_header:
            out.to_peer += stream_error("bad-format", "an element before the stream header")
            self.peer_closed = True
            self._to_backend_error(out, f"the peer {domain} sent <{event.name}> before its stream header")
            self._finish(out, "remote-connection-failed")
        else:
            # Deny by default: the gate's table for what a peer sends back (proxy/gate.py).
            rule = admit(Stage.OUTBOUND_PEER, event.ns, event.name)
            if rule is Passage.ANSWER and not self._answers_a_question(event):
                rule = Refusal("unsupported-stanza-type", "answers no dialback question the backend asked on "
                                                          "this stream")
            if isinstance(rule, Refusal):
                what = describe(event.ns, event.name)
                text = f"{what} {rule.why}"
                if len(text) > 600:
                    text = text[:600] + "…"
                out.to_peer += stream_error(rule.condition, text)
                self.peer_closed = True
                self._to_backend_error(out, f"the peer {domain} sent {text}; stream closed")
                # Metrics count it with the nearest series (proxy/metrics.py CONNECTION_OUTCOMES).
                self._finish(out, "policy-violation" if rule.condition == "unsupported-stanza-type" else rule.condition)
            elif rule is Passage.FEATURES:
                # DESIGN §3.2: features back minus <starttls/> (TLS is the proxy's) and minus
                # bidi (XEP-0288), which would turn this verified outbound stream into an
                # inbound one that no dialback gate watches.
                out.to_backend += event.raw_without(
                    lambda c: (c.ns, c.name) in ((NS_TLS, "starttls"), (NS_BIDI_FEATURE, "bidi")))
            else:
                out.to_backend += event.raw

    def _to_backend_error(self, out: Output, text: str) -> None:
        if not self.backend_closed:
            out.to_backend += self._backend_error("remote-connection-failed", text)
            self.backend_closed = True

    def peer_error(self, condition: str, text: str) -> Output:
        """The transport found the peer's framing broken (WebSocket: RFC 7395 §3.3.3): what
        bad XML from the peer gets."""
        out = Output()
        if self.state == "relaying":
            self._peer_event(XmlError(condition, text), out)
        return out

    def peer_eof(self) -> Output:
        """The peer closed the TCP connection (or TLS ended)."""
        out = Output()
        if self.state != "relaying":
            return out
        if not self.peer_closed and not self.backend_closed:
            if self._backend_has_header:
                out.to_backend += STREAM_CLOSE
            else:
                out.to_backend += self._backend_error(
                    "remote-connection-failed",
                    f"the peer {self.opening.peer_domain if self.opening else ''} closed the connection before its stream header")
        self.peer_closed = True
        self._finish(out, "ok")
        return out

    def revoked(self, condition: str, text: str) -> Output:
        """DESIGN §3.4: the peer is no longer accepted — a stream error to it saying what
        changed, the backend's stream ended politely, the end."""
        out = Output()
        if self.state != "relaying":
            return out
        if not self.peer_closed:
            out.to_peer += stream_error(condition, text)
        if not self.backend_closed:
            out.to_backend += STREAM_CLOSE
        self._finish(out, condition)
        return out

    def lost(self, outcome: str = "ok") -> None:
        """A connection broke while sending: the session is over."""
        self._finish(Output(), outcome)

    def _finish(self, out: Output, outcome: str) -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        self.outcome = outcome
        out.close = True
        out.outcome = outcome


# ============================================================================ trio shell


@dataclass
class OutboundContext:
    """Everything an outbound stream needs; one snapshot per configuration load, so a
    stream keeps the settings it started with across a reload (SIGHUP)."""

    resolver: Resolver
    policies: PolicySet
    trust: TrustStore | None
    contexts: TlsContexts
    max_stanza_bytes: int = DEFAULT_MAX_STANZA_BYTES
    handshake_timeout: float = DEFAULT_ATTEMPT_TIMEOUT
    close_timeout: float = CLOSE_TIMEOUT
    happy_eyeballs_delay: float = HAPPY_EYEBALLS_DELAY
    metrics: object | None = None   # proxy.metrics.Metrics
    reverify: object | None = None  # proxy.reverify.Reverifier (DESIGN §3.4)
    # Keys the inbound side minted for dialback on a peer's behalf (DESIGN §3.3): the
    # backend's `<db:verify>` of one is answered here, with no connection to the peer.
    dialback_keys: DialbackKeys = field(default_factory=DialbackKeys)

    @property
    def local_domains(self) -> frozenset[str]:
        return frozenset(self.contexts.identities)

    @classmethod
    def from_config(cls, config: Config, *, resolver: Resolver | None = None, metrics: object | None = None,
                    policies: PolicySet | None = None, trust: TrustStore | None = None) -> "OutboundContext":
        """Load policies, the trust store and the local certificates' paths from `config`
        (raises PolicyError / TrustStoreError / TlsConfigError on bad files)."""
        if resolver is None:
            from proxy.resolver import make_resolver

            resolver = make_resolver(config.dns)
        if policies is None:
            policies = PolicySet.load(config.policy.dir or None)
        if trust is None:
            trust = TrustStore.load(config.policy.ca_file or None)
        contexts = TlsContexts({d.name: (d.cert, d.key) for d in config.domains})
        # Load every identity now, so a bad certificate fails the (re)load, not a stream.
        for d in config.domains:
            contexts.get(d.name)
        return cls(resolver=resolver, policies=policies, trust=trust, contexts=contexts,
                   max_stanza_bytes=config.limits.max_stanza_bytes,
                   handshake_timeout=config.limits.handshake_timeout, metrics=metrics)


class OutboundProxy:
    """The handler for connections on `outbound.listen`: `await proxy(stream)` runs one
    backend stream to its end and never raises (a failure is logged and counted).

    `reload(config)` swaps in a new `OutboundContext` (the resolver and its cache are kept);
    streams already running keep theirs.  `shutdown()` ends every running stream with
    `system-shutdown`.
    """

    def __init__(self, config: Config | None = None, *, context: OutboundContext | None = None,
                 resolver: Resolver | None = None, metrics: object | None = None) -> None:
        if context is None:
            if config is None:
                raise ValueError("OutboundProxy needs a config or a context")
            context = OutboundContext.from_config(config, resolver=resolver, metrics=metrics)
        self.context = context
        self._running: set[trio.CancelScope] = set()
        self.sessions_started = 0

    def reload(self, config: Config) -> None:
        """New policies, trust store and certificates; keeps the resolver (and its cache)."""
        self.context = OutboundContext.from_config(config, resolver=self.context.resolver,
                                                   metrics=self.context.metrics)

    async def __call__(self, stream: trio.SocketStream) -> None:
        await self.handle(stream)

    def shutdown(self) -> None:
        """Cancel every running stream; each says `system-shutdown` to its backend."""
        for scope in list(self._running):
            scope.cancel()

    async def handle(self, stream: trio.SocketStream) -> None:
        ctx = self.context
        metrics = ctx.metrics
        self.sessions_started += 1
        try:
            backend_addr = format_peer(stream.socket.getpeername())
        except OSError:
            backend_addr = "-"
        if metrics is not None:
            metrics.connection_opened("outbound")
        enable_keepalive(stream)
        session = OutboundSession(local_domains=ctx.local_domains, max_stanza_bytes=ctx.max_stanza_bytes)
        run = _Run(stream, session, ctx, backend_addr)
        scope = trio.CancelScope()
        self._running.add(scope)
        outcome = "internal-error"
        try:
            with scope:
                outcome = await run.run()
            if scope.cancelled_caught:
                outcome = await run.goodbye()
        except Exception:
            log_event(log, logging.ERROR, "outbound-failed", backend=backend_addr, exc_info=True)
            outcome = "internal-error"
        except BaseException:
            outcome = "system-shutdown"   # cancelled from outside: the proxy stops
            raise
        finally:
            self._running.discard(scope)
            await run.close_all()
            if metrics is not None:
                metrics.connection_closed("outbound", outcome)
            opening = session.opening
            log_event(log, logging.INFO, "stream-closed", direction="outbound", backend=backend_addr,
                      peer=run.peer_addr, domain=opening.peer_domain if opening else "-", outcome=outcome)


class _Run:
    """One backend connection's life, driving an OutboundSession."""

    def __init__(self, backend: trio.SocketStream, session: OutboundSession, ctx: OutboundContext,
                 backend_addr: str) -> None:
        self.backend = backend
        self.session = session
        self.ctx = ctx
        self.backend_addr = backend_addr
        self.peer: trio.abc.Stream | None = None
        self.connection = None   # the PeerConnection once a peer is accepted
        self._watched = None     # its proxy.reverify handle while relaying
        self.peer_addr = "-"
        self._backend_lock = trio.Lock()
        self._peer_lock = trio.Lock()
        self.started = time.monotonic()

    # -- sending -------------------------------------------------------------------------

    async def _send(self, out: Output) -> None:
        for note in out.notes:
            log_event(log, logging.WARNING, "backend-misconfigured", backend=self.backend_addr, hint=note)
        if out.to_peer and self.peer is not None:
            async with self._peer_lock:
                await self.peer.send_all(out.to_peer)
            self._count("backend", len(out.to_peer))
        if out.to_backend:
            async with self._backend_lock:
                await self.backend.send_all(out.to_backend)
            self._count("peer", len(out.to_backend))

    def _count(self, source: str, n: int) -> None:
        if self.ctx.metrics is not None and self.session.state in ("relaying", "closed") and self.peer is not None:
            self.ctx.metrics.relayed("outbound", source, n)

    async def _send_quietly(self, out: Output) -> None:
        try:
            await self._send(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    # -- phases --------------------------------------------------------------------------

    async def run(self) -> str:
        opening = await self._read_header()
        if opening is None:
            return self.session.outcome or "closed-early"
        connection = await self._connect(opening)
        if connection is None:
            return self.session.outcome or "closed-early"
        return await self._relay()

    async def _backend_step(self) -> tuple[Output, bool]:
        """Read what the backend sent, feed it to the session and send what that produced;
        True when the backend's side has ended (closed, broken, or the session closed)."""
        try:
            data = await self.backend.receive_some(_RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        out = self.session.backend_data(data) if data else self.session.backend_eof()
        await self._send_quietly(out)
        return out, out.close or not data

    async def _read_header(self) -> Opening | None:
        with trio.move_on_after(self.ctx.handshake_timeout) as scope:
            while True:
                out, ended = await self._backend_step()
                if ended:
                    if out.outcome not in (None, "closed-early"):
                        log_event(log, logging.INFO, "refused", direction="outbound", backend=self.backend_addr,
                                  outcome=out.outcome, reason=_error_text(out.to_backend))
                    return None
                if out.opening is not None:
                    return out.opening
        if scope.cancelled_caught:
            text = f"no stream header within {self.ctx.handshake_timeout:g} s"
            await self._send_quietly(Output(to_backend=self.session.refuse("connection-timeout", text)))
        return None

    async def _connect(self, opening: Opening):
        ctx = self.ctx
        policy = ctx.policies.for_domain(opening.peer_domain)
        result: dict[str, object] = {}

        def on_attempt(attempt: TargetAttempt) -> None:
            self._log_attempt(opening, attempt)

        def on_domain_verdict(verdict: Verdict) -> None:
            self._log_verdict(opening, "-", verdict)

        async with trio.open_nursery() as nursery:

            async def watch_backend() -> None:
                # While we look for a peer, the backend may give up (its own connect timeout)
                # or, unusually, send more; both are handled by the session.
                while True:
                    _out, ended = await self._backend_step()
                    if ended:
                        result["backend_gone"] = True
                        nursery.cancel_scope.cancel()
                        return

            async def find_peer() -> None:
                try:
                    # policy.transports: TCP (connect_peer), or XEP-0468 WebSocket too.
                    result["connection"] = await connect_with_transports(
                        opening.peer_domain, resolver=ctx.resolver, policy=policy, trust=ctx.trust,
                        contexts=ctx.contexts, local_domain=opening.local_domain,
                        timeout=ctx.handshake_timeout, max_stanza_bytes=ctx.max_stanza_bytes,
                        on_attempt=on_attempt, on_domain_verdict=on_domain_verdict,
                        happy_eyeballs_delay=ctx.happy_eyeballs_delay,
                    )
                except PeerUnreachable as exc:
                    result["failure"] = exc
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_backend)
            nursery.start_soon(find_peer)

        connection = result.get("connection")
        if "backend_gone" in result or self.session.state == "closed":
            if connection is not None:
                await connection.stream.aclose()
            return None
        if connection is None:
            failure = result["failure"]
            assert isinstance(failure, PeerUnreachable)
            await self._send_quietly(Output(to_backend=self.session.refuse("remote-connection-failed", failure.reason)))
            log_event(log, logging.INFO, "peer-unreachable", direction="outbound", backend=self.backend_addr,
                      domain=opening.peer_domain, local=opening.local_domain, reason=failure.reason)
            return None
        self.peer = connection.stream
        enable_keepalive(self.peer)
        self.connection = connection
        self.peer_addr = connection.attempt.address or "-"
        if ctx.metrics is not None:
            ctx.metrics.handshake("outbound", time.monotonic() - self.started)
        try:
            await self._send(Output(to_peer=self.session.peer_accepted()))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            text = f"the peer {opening.peer_domain} at {self.peer_addr} closed the connection: {exc}"
            await self._send_quietly(Output(to_backend=self.session.refuse("remote-connection-failed", text)))
            return None
        return connection

    async def _relay(self) -> str:
        session = self.session
        async with trio.open_nursery() as nursery:
            timer_started = False

            async def close_timer() -> None:
                # RFC 6120 §4.4: the side that closed waits a while for the other's close.
                await trio.sleep(self.ctx.close_timeout)
                nursery.cancel_scope.cancel()

            async def pump(source: trio.abc.Stream, feed: Callable[[bytes], Output],
                           eof: Callable[[], Output]) -> None:
                nonlocal timer_started
                while True:
                    try:
                        data = await source.receive_some(_RECEIVE_SIZE)
                        out = feed(data) if data else eof()
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data, out = b"", eof()
                    except StreamError as exc:   # a WebSocket peer broke the framing
                        data, out = b"", session.peer_error(exc.condition, exc.text)
                    try:
                        await self._send(out)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        # The destination went away: nothing more can be delivered.
                        out.close = True
                        session.lost()
                    if out.close or not data:
                        nursery.cancel_scope.cancel()
                        return
                    if session.closing and not timer_started:
                        timer_started = True
                        nursery.start_soon(close_timer)

            assert self.peer is not None
            nursery.start_soon(pump, self.backend, session.backend_data, session.backend_eof)
            nursery.start_soon(pump, self.peer, session.peer_data, session.peer_eof)
            if self.ctx.reverify is not None:   # DESIGN §3.4: judged again when evidence expires
                from proxy.reverify import watch_outbound
                self._watched = watch_outbound(self, nursery)
        return session.outcome or "ok"

    async def goodbye(self) -> str:
        """The proxy is stopping: system-shutdown to the backend, close to the peer."""
        out = self.session.shutdown()
        with trio.move_on_after(_GOODBYE_TIMEOUT) as scope:
            scope.shield = True
            await self._send_quietly(out)
        return "system-shutdown"

    async def close_all(self) -> None:
        if self._watched is not None:
            self.ctx.reverify.unwatch(self._watched)  # type: ignore[union-attr]
            self._watched = None
        with trio.CancelScope(shield=True):
            if self.peer is not None:
                with trio.move_on_after(_GOODBYE_TIMEOUT):
                    try:
                        await self.peer.aclose()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
                await trio.aclose_forcefully(self.peer)
            await trio.aclose_forcefully(self.backend)

    # -- logging -------------------------------------------------------------------------

    def _log_attempt(self, opening: Opening, attempt: TargetAttempt) -> None:
        target = f"{attempt.target.host}:{attempt.target.port}"
        if attempt.verdict is None:
            log_event(log, logging.INFO, "connect-failed", direction="outbound", domain=opening.peer_domain,
                      target=target, mode=attempt.mode, peer=attempt.address or "-",
                      reason=attempt.reason)
            return
        extra = {"target": target, "mode": attempt.mode, "local": opening.local_domain}
        if attempt.tls is not None:
            extra["tls"] = attempt.tls.protocol
        self._log_verdict(opening, attempt.address or "-", attempt.verdict, **extra)

    def _log_verdict(self, opening: Opening, peer: str, verdict: Verdict, **extra: object) -> None:
        extra.setdefault("local", opening.local_domain)
        log_decision("outbound", peer, opening.peer_domain, verdict.log_fields(), **extra)
        if self.ctx.metrics is not None:
            self.ctx.metrics.verdict("outbound", verdict)


def _error_text(data: bytes) -> str:
    start, end = data.find(b"<text"), data.find(b"</text>")
    if start < 0 or end < 0:
        return "-"
    return data[data.find(b">", start) + 1:end].decode("utf-8", "replace")


async def open_outbound_listeners(addresses: list[str]) -> list[trio.SocketListener]:
    """Listeners for `outbound.listen`.  Loopback only: whoever can connect there makes the
    proxy present our domains' certificates to any peer, so it must not face a network."""
    import ipaddress

    listeners: list[trio.SocketListener] = []
    try:
        for entry in addresses:
            host, port = parse_hostport(entry)
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = host == "localhost"
            if not loopback:
                raise ValueError(f"outbound.listen {entry!r}: must be a loopback address (127.0.0.0/8 or ::1)")
            listeners += await tcp_listeners(entry, port, host)
    except BaseException:
        for listener in listeners:
            await listener.aclose()
        raise
    return listeners
