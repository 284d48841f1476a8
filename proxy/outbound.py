"""Outbound S2S (DESIGN §3.2, §3.3): backend → proxy (`outbound.listen`) → peer, the trio shell.

The backend (Prosody with contrib/prosody/mod_s2s_dane_proxy.lua, ejabberd with
contrib/ejabberd/mod_s2s_dane_proxy.erl) opens every outgoing S2S stream to us in plaintext.
The protocol is `proxy.outbound_session.OutboundSession` (sans-IO): it answers the backend's
stream itself, answers `<db:verify>` of the proxy's own keys locally, and asks for a peer only
when a question needs one.  This module does the I/O around it: one `_Run` per backend
connection pumps the backend, connects to the peer when the session says so
(`proxy.connect.connect_peer` / XEP-0468 WebSocket: resolve D, its targets in order, STARTTLS or
Direct TLS presenting L's certificate, D's chain judged by its policy), pumps the peer once it
is accepted, and keeps the session's deadlines.  If no target is accepted the backend gets
`remote-connection-failed` with every target's reason, and no peer has received a byte.

`OutboundProxy` is the handler `proxy.server` runs for each connection on `outbound.listen`.

Where this changed DESIGN §3.2 ("relay the peer's header and the backend's dialback"), and
why: see `proxy.outbound_session` -- stream ids differ once the backend's stream is answered
locally, so the backend's dialback keys cannot be relayed; the proxy authenticates the local
domain itself (`proxy.outbound_auth`: SASL EXTERNAL with the certificate it presented, else
dialback with its own key, checked by its inbound side).

Choices where DESIGN is silent:
* The connection to the peer is opened by the first question that needs it and kept for the
  stream's life; a stream that only had its keys answered locally never reaches the peer.
* A question's wait for the peer's answer is bounded by `limits.handshake_timeout` (the same
  budget as one target's negotiation), counted from when it was sent.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import trio

from policy.dns import Resolver
from policy.pkix import TrustStore
from policy.policyfile import PolicySet
from policy.verdict import Verdict
from proxy import eager_io
from proxy.config import Config, parse_hostport
from proxy.listen import tcp_listeners
from proxy.connect import DEFAULT_ATTEMPT_TIMEOUT, HAPPY_EYEBALLS_DELAY, PeerUnreachable, TargetAttempt, TlsContexts
from proxy.dialback_keys import DialbackKeys
from proxy.keepalive import enable_keepalive
from proxy.logsetup import format_peer, log_decision, log_event
from proxy.outbound_session import Opening, OutboundSession, Output, jid_domain
from proxy.streamerrors import StreamError
from proxy.websocket_outbound import connect_with_transports
from proxy.xmlstream import DEFAULT_MAX_STANZA_BYTES

__all__ = ["CLOSE_TIMEOUT", "Opening", "OutboundContext", "OutboundProxy", "OutboundSession", "Output",
           "jid_domain"]

log = logging.getLogger("xmpp_dane_proxy.outbound")

# Prosody's s2s_close_timeout default: after one side closed its stream, the other gets this
# long to send its own `</stream:stream>` before the connection is dropped.
CLOSE_TIMEOUT = 5.0
# One read from either side; the TLS layer reads 64 KiB records' worth at a time as well.
_RECEIVE_SIZE = 65536
# Bound on the best-effort goodbye (system-shutdown) when the proxy is stopped mid-stream.
_GOODBYE_TIMEOUT = 1.0


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
        old = self.context
        self.context = OutboundContext.from_config(config, resolver=old.resolver, metrics=old.metrics)
        # One dialback secret for the process lifetime: keys minted before the reload (by
        # either direction) are still recognised after it.
        self.context.dialback_keys = old.dialback_keys

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
        session = OutboundSession(local_domains=ctx.local_domains, keys=ctx.dialback_keys,
                                  max_stanza_bytes=ctx.max_stanza_bytes, handshake_timeout=ctx.handshake_timeout,
                                  answer_timeout=ctx.handshake_timeout, clock=trio.current_time)
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
    """One backend connection's life, driving an OutboundSession: a task pumping the backend,
    one keeping the session's deadlines, and -- once the session asks for the peer -- one
    connecting to it and then pumping it."""

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
        # eager_io's: taken without a yield when free, as on the inbound side (issue 13).
        self._backend_lock = eager_io.Lock()
        self._peer_lock = eager_io.Lock()
        self._nursery: trio.Nursery | None = None
        self._wake = trio.Event()
        self._close_timer = False
        self.started = time.monotonic()

    # -- sending -------------------------------------------------------------------------

    async def _send(self, out: Output) -> None:
        for note in out.notes:
            log_event(log, logging.WARNING, "backend-misconfigured", backend=self.backend_addr, hint=note)
        for event, fields in out.events:
            log_event(log, logging.INFO, event, direction="outbound", backend=self.backend_addr, **fields)
        if out.to_peer and self.peer is not None:
            async with self._peer_lock:
                await self.peer.send_all(out.to_peer)
            self._count("backend", len(out.to_peer))
        if out.to_backend:
            async with self._backend_lock:
                await self.backend.send_all(out.to_backend)
            self._count("peer", len(out.to_backend))

    def _count(self, source: str, n: int) -> None:
        if self.ctx.metrics is not None and self.peer is not None:
            self.ctx.metrics.relayed("outbound", source, n)

    async def _send_quietly(self, out: Output) -> None:
        try:
            await self._send(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _perform(self, out: Output) -> None:
        """Send what the session produced, then act on it: connect, end, start the close timer."""
        try:
            await self._send(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # A destination went away: nothing more can be delivered.
            out.close = True
            self.session.lost()
        assert self._nursery is not None
        if out.close or self.session.state == "closed":
            self._nursery.cancel_scope.cancel()
            return
        if out.connect is not None:
            self._nursery.start_soon(self._peer_side, out.connect)
        if self.session.closing and not self._close_timer:
            self._close_timer = True
            self._nursery.start_soon(self._close_after_timeout)
        self._wake.set()

    # -- tasks ---------------------------------------------------------------------------

    async def run(self) -> str:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._backend_side)
            nursery.start_soon(self._deadlines)
        if self.session.outcome not in (None, "ok", "closed-early", "system-shutdown") and self.peer is None:
            log_event(log, logging.INFO, "refused", direction="outbound", backend=self.backend_addr,
                      outcome=self.session.outcome, reason=self.session.reason or "-")
        return self.session.outcome or "closed-early"

    async def _backend_side(self) -> None:
        while True:
            try:
                data = await self.backend.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            await self._perform(self.session.backend_data(data) if data else self.session.backend_eof())
            if not data:
                return

    async def _deadlines(self) -> None:
        """`tick` the session whenever its deadline passes (re-read after every step)."""
        while True:
            deadline = self.session.deadline
            with trio.move_on_at(deadline if deadline is not None else float("inf")):
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            await self._perform(self.session.tick(trio.current_time()))

    async def _close_after_timeout(self) -> None:
        # RFC 6120 §4.4: the side that closed waits a while for the other's close.
        await trio.sleep(self.ctx.close_timeout)
        self.session.lost("ok")     # one side ended politely; the other did not answer in time
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    async def _peer_side(self, opening: Opening) -> None:
        if not await self._connect(opening):
            return
        assert self.peer is not None and self._nursery is not None
        if self.ctx.reverify is not None:   # DESIGN §3.4: judged again when evidence expires
            from proxy.reverify import watch_outbound
            self._watched = watch_outbound(self, self._nursery)
        session = self.session
        while True:
            try:
                data = await self.peer.receive_some(_RECEIVE_SIZE)
                out = session.peer_data(data) if data else session.peer_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data, out = b"", session.peer_eof()
            except StreamError as exc:   # a WebSocket peer broke the framing
                data, out = b"", session.peer_error(exc.condition, exc.text)
            await self._perform(out)
            if not data:
                return

    async def _connect(self, opening: Opening) -> bool:
        """Find and judge the peer; True once it is accepted and has our stream header."""
        ctx = self.ctx
        policy = ctx.policies.for_domain(opening.peer_domain)

        def on_attempt(attempt: TargetAttempt) -> None:
            self._log_attempt(opening, attempt)

        def on_domain_verdict(verdict: Verdict) -> None:
            self._log_verdict(opening, "-", verdict)

        try:
            # policy.transports: TCP (connect_peer), or XEP-0468 WebSocket too.
            connection = await connect_with_transports(
                opening.peer_domain, resolver=ctx.resolver, policy=policy, trust=ctx.trust,
                contexts=ctx.contexts, local_domain=opening.local_domain,
                timeout=ctx.handshake_timeout, max_stanza_bytes=ctx.max_stanza_bytes,
                on_attempt=on_attempt, on_domain_verdict=on_domain_verdict,
                happy_eyeballs_delay=ctx.happy_eyeballs_delay,
            )
        except PeerUnreachable as failure:
            log_event(log, logging.INFO, "peer-unreachable", direction="outbound", backend=self.backend_addr,
                      domain=opening.peer_domain, local=opening.local_domain, reason=failure.reason)
            await self._perform(Output(to_backend=self.session.refuse("remote-connection-failed", failure.reason),
                                       close=True))
            return False
        if self.session.state == "closed":
            await trio.aclose_forcefully(connection.stream)
            return False
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
            await self._perform(Output(to_backend=self.session.refuse("remote-connection-failed", text), close=True))
            return False
        return True

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
