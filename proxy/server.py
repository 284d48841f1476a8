"""Listeners and `serve()`: what `xmpp-dane-proxy run` runs.

`ProxyServer` owns the inbound settings (certificates, policies, trust store, DNS), accepts
connections on `inbound.listen`, hands each to `proxy.inbound.handle_inbound`, and enforces
`limits.max_connections`.  `reload(config)` builds new settings and swaps them in: streams
already running keep the settings they started with (SIGHUP drops nothing).  `serve()`
reports where it listens through `task_status`, so tests can bind port 0.
"""
from __future__ import annotations

import errno
import logging
import secrets
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio

from proxy.admission import UnauthenticatedSlots, effective_max_unauthenticated
from proxy.config import Config, parse_hostport
from proxy.listen import tcp_listeners
from proxy.logsetup import format_peer, log_event
from proxy.inbound import InboundConnection, InboundSettings
from proxy.keepalive import enable_keepalive
from proxy.tls import ServerCertificates
from proxy.xmlstream import FRAMER, stream_error, stream_header

log = logging.getLogger("xmpp_dane_proxy.server")


def _log(level: int, event: str, **fields: object) -> None:
    log_event(log, level, event, **fields)

# accept() errors that mean "out of resources right now": keep serving after a pause
# rather than crash (the same list trio.serve_listeners uses).
_ACCEPT_CAPACITY_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_BACKOFF = 0.1
_REFUSE_TIMEOUT = 2.0

ConnectionHandler = Callable[[trio.SocketStream], Awaitable[object]]
EvidenceFor = Callable[[str, object], Awaitable[object]]


@dataclass
class Listening:
    """The bound addresses, reported through `task_status.started()`."""

    inbound: list[tuple[str, int]] = field(default_factory=list)
    outbound: list[tuple[str, int]] = field(default_factory=list)
    server: "ProxyServer | None" = None
    websocket: list[tuple[str, int]] = field(default_factory=list)   # inbound.websocket_listen


def dns_evidence(resolver, *, posh=None) -> EvidenceFor:
    """The production `evidence_for`: DESIGN §2.1 lookups via `policy.peer_evidence.gather`,
    with the policy file's static SRV/TLSA (treated as secure), as seen by an inbound peer.

    The function carries `.posh`, the POSH fetcher (RFC 7711) for policies that use POSH:
    `posh`, or the one shared with everything else using `resolver`; `InboundSettings`
    picks it up."""
    from policy.evidence_cache import EvidenceCache
    from policy.peer_evidence import gather
    from proxy.posh_fetch import shared_fetcher

    # The whole evidence of a domain until its shortest TTL (policy/evidence_cache.py): a
    # warm verdict is then only decide(), not five cached lookups in two nurseries.
    cache = EvidenceCache()

    async def evidence_for(domain: str, policy) -> object:
        key = (domain, tuple(policy.srv), tuple(policy.tlsa))
        evidence = cache.get(key, resolver)
        if evidence is not None:
            return evidence     # at once, no yield: a scheduler pass per set-up for nothing
        found = await gather(domain, resolver, static_srv=policy.srv, static_tlsa=policy.tlsa, inbound=True)
        evidence = found.for_inbound()
        cache.put(key, resolver, evidence)
        return evidence

    evidence_for.posh = posh if posh is not None else shared_fetcher(resolver)  # type: ignore[attr-defined]
    evidence_for.cache = cache  # type: ignore[attr-defined]
    return evidence_for


def inbound_settings(config: Config, *, evidence_for: EvidenceFor | None = None, resolver=None,
                     policies=None, trust=None, metrics=None,
                     certificates: ServerCertificates | None = None) -> InboundSettings:
    """Everything inbound connections need, loaded from `config` (raises on bad files).

    Pieces already loaded elsewhere (the `policy.dns.Resolver` with its cache, a
    `PolicySet`, a `TrustStore`) can be passed in instead of being loaded again."""
    from policy.pkix import TrustStore
    from policy.policyfile import PolicySet

    if certificates is None:
        certificates = ServerCertificates.from_domains(config.domains)
    websocket_certificates = None
    if config.inbound.websocket_listen:
        from proxy.websocket import ALPN_HTTP_1_1

        websocket_certificates = ServerCertificates.from_domains(config.domains, alpn=(ALPN_HTTP_1_1,))
    if policies is None:
        policies = PolicySet.load(config.policy.dir or None)
    if trust is None:
        trust = TrustStore.load(config.policy.ca_file or None)
    if evidence_for is None:
        if resolver is None:
            from proxy.resolver import make_resolver

            resolver = make_resolver(config.dns)
        evidence_for = dns_evidence(resolver)
    return InboundSettings(
        certificates=certificates,
        backend=config.inbound.backend,
        policies=policies,
        trust=trust,
        evidence_for=evidence_for,
        local_domains=frozenset(d.name for d in config.domains),
        max_stanza_bytes=config.limits.max_stanza_bytes,
        handshake_timeout=config.limits.handshake_timeout,
        idle_timeout=config.limits.idle_timeout,
        proxy_protocol=config.inbound.proxy_protocol,
        metrics=metrics,
        websocket_certificates=websocket_certificates,
        sasl_external=config.inbound.offers_external(config.outbound),
    )


async def open_listeners(addresses: Sequence[str]) -> list[trio.SocketListener]:
    """TCP listeners for `host:port` entries.  `[::]:P` and `*:P` mean every address, IPv4
    and IPv6 alike (what an operator writing the DESIGN §4 default expects)."""
    listeners: list[trio.SocketListener] = []
    try:
        for entry in addresses:
            host, port = parse_hostport(entry)
            wildcard = host in ("::", "*", "")
            listeners += await tcp_listeners(entry, port, None if wildcard else host)
    except BaseException:
        for listener in listeners:
            await listener.aclose()
        raise
    return listeners


def _bound(listeners: Sequence[trio.SocketListener]) -> list[tuple[str, int]]:
    return [tuple(listener.socket.getsockname()[:2]) for listener in listeners]


class ProxyServer:
    """The running proxy: listeners, per-connection tasks, connection limit, reload."""

    def __init__(self, config: Config, *, evidence_for: EvidenceFor | None = None, resolver=None,
                 policies=None, trust=None, outbound_handler: ConnectionHandler | None = None,
                 metrics=None, settings: InboundSettings | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self._evidence_for = evidence_for
        if evidence_for is None and resolver is None:
            from proxy.resolver import make_resolver

            resolver = make_resolver(config.dns)
        self.resolver = resolver
        # May be replaced at any time (e.g. by a reload); each connection keeps the one it
        # started with.
        self.settings = settings or inbound_settings(config, evidence_for=evidence_for, resolver=resolver,
                                                     policies=policies, trust=trust, metrics=metrics)
        self.outbound_handler = outbound_handler
        self._share_dialback_keys()
        self.connections: set[InboundConnection] = set()
        self.active = 0
        self._idle = trio.Event()   # set whenever the last connection ends
        self.refused = 0
        self.unauthenticated = UnauthenticatedSlots()   # limits.max_unauthenticated
        self._listeners: list[trio.SocketListener] = []
        self._nursery: trio.Nursery | None = None

    def reload(self, config: Config) -> None:
        """Load certificates, policies and the trust store again; on any error keep the old
        ones and raise.  The resolver (and its cache) is kept; listen addresses are not
        re-bound (that needs a restart)."""
        self.settings = inbound_settings(config, evidence_for=self._evidence_for, resolver=self.resolver,
                                         metrics=self.metrics)
        self._share_dialback_keys()
        self.config = config
        _log(logging.INFO, "reloaded", domains=len(config.domains),
             policy_files=getattr(self.settings.policies, "files", "-"))

    def _share_dialback_keys(self) -> None:
        # DESIGN §3.3: one secret for both directions -- a key the inbound side mints is
        # answered by the outbound side, and one the outbound side sends a peer is recognised
        # when the peer checks it through the inbound side (proxy.runner does the same).
        keys = getattr(getattr(self.outbound_handler, "context", None), "dialback_keys", None)
        if keys is not None:
            self.settings.dialback_keys = keys

    async def serve(self, *, inbound_listeners: Sequence[trio.SocketListener] | None = None,
                    outbound_listeners: Sequence[trio.SocketListener] | None = None,
                    websocket_listeners: Sequence[trio.SocketListener] | None = None,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept until cancelled.  Pre-opened listeners (systemd socket activation) may be
        passed in; otherwise `inbound.listen`, `inbound.websocket_listen` (and
        `outbound.listen` when an outbound handler is set) are bound."""
        inbound = list(inbound_listeners) if inbound_listeners is not None else \
            await open_listeners(self.config.inbound.listen)
        websocket = list(websocket_listeners) if websocket_listeners is not None else \
            await open_listeners(self.config.inbound.websocket_listen)
        outbound: list[trio.SocketListener] = []
        if self.outbound_handler is not None:
            if outbound_listeners is None:
                from proxy.outbound import open_outbound_listeners

                outbound_listeners = await open_outbound_listeners(self.config.outbound.listen)
            outbound = list(outbound_listeners)
        self._listeners = inbound + websocket + outbound
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for listener in inbound:
                    nursery.start_soon(self._accept_loop, listener, self._handle_inbound, nursery)
                for listener in outbound:
                    nursery.start_soon(self._accept_loop, listener, self.outbound_handler, nursery)
                for listener in websocket:
                    nursery.start_soon(self._accept_loop, listener, self._handle_websocket, nursery)
                for host, port in _bound(inbound):
                    _log(logging.INFO, "listening", direction="inbound", address=format_peer((host, port)),
                         framer=FRAMER)
                for host, port in _bound(websocket):
                    _log(logging.INFO, "listening", direction="inbound", transport="websocket",
                         address=format_peer((host, port)))
                task_status.started(Listening(_bound(inbound), _bound(outbound), self, _bound(websocket)))
        finally:
            for listener in self._listeners:
                with trio.CancelScope(shield=True):
                    await listener.aclose()

    async def _accept_loop(self, listener: trio.SocketListener, handler: ConnectionHandler,
                           nursery: trio.Nursery) -> None:
        # Every accepted connection gets TCP keepalive, WebSocket ones too (proxy/keepalive.py).
        # Linux copies a listening socket's keepalive settings to each connection it accepts:
        # set once here, not four system calls per connection (issue 13).
        inherited = sys.platform.startswith("linux") and enable_keepalive(listener)
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_CAPACITY_ERRORS:
                    _log(logging.ERROR, "accept-failed", reason=exc.strerror)
                    await trio.sleep(_ACCEPT_BACKOFF)
                    continue
                raise
            except trio.ClosedResourceError:
                return
            limits = self.config.limits
            slot = None
            if handler != self.outbound_handler:
                slot = self.unauthenticated.take(
                    effective_max_unauthenticated(limits.max_unauthenticated, limits.max_connections))
            if self.active >= limits.max_connections or (handler != self.outbound_handler and slot is None):
                if slot is not None:
                    slot.release()
                self.refused += 1
                which = "max_connections" if self.active >= limits.max_connections else "max_unauthenticated"
                if handler == self._handle_websocket:
                    # A wss peer expects a TLS handshake first: XML would be garbage to it.
                    nursery.start_soon(trio.aclose_forcefully, stream)
                    _log(logging.WARNING, "refused", direction="inbound", reason=f"limits.{which} reached")
                else:
                    nursery.start_soon(self._refuse, stream, which)
                continue
            self.active += 1
            if not inherited:
                enable_keepalive(stream)
            nursery.start_soon(self._run_handler, handler, stream, slot)

    async def _run_handler(self, handler: ConnectionHandler, stream: trio.SocketStream, slot=None) -> None:
        try:
            if slot is not None:
                await handler(stream, admission=slot)
            else:
                await handler(stream)
        except Exception:
            # One broken stream must never take the listener down.
            log.exception("connection handler failed")
            with trio.CancelScope(shield=True):
                await stream.aclose()
        finally:
            if slot is not None:
                slot.release()
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    async def _handle_inbound(self, stream: trio.SocketStream, admission=None) -> None:
        conn = InboundConnection(stream, self.settings, admission=admission)
        self.connections.add(conn)
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)

    async def _handle_websocket(self, stream: trio.SocketStream, admission=None) -> None:
        from proxy.websocket import handle_websocket_inbound

        await handle_websocket_inbound(stream, self.settings, connections=self.connections, admission=admission)

    async def _refuse(self, stream: trio.SocketStream, which: str = "max_connections") -> None:
        """Over `limits.max_connections` or `limits.max_unauthenticated`: RFC 6120 §4.9.3.17
        resource-constraint, then close."""
        limits = self.config.limits
        limit = limits.max_connections if which == "max_connections" else \
            effective_max_unauthenticated(limits.max_unauthenticated, limits.max_connections)
        what = "connections" if which == "max_connections" else "connections not yet authenticated"
        with trio.move_on_after(_REFUSE_TIMEOUT):
            try:
                await stream.send_all(stream_header(id=secrets.token_hex(8)) + stream_error(
                    "resource-constraint", f"too many {what} (limits.{which} = {limit})"))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await stream.aclose()
        if self.metrics is not None:
            self.metrics.connection_opened("inbound")
            self.metrics.connection_closed("inbound", "over-limit")
        _log(logging.WARNING, "refused", direction="inbound", reason=f"limits.{which} reached", limit=limit)

    async def shutdown(self) -> None:
        """Stop accepting, end every stream with system-shutdown (DESIGN §3.3), and wait until
        each has relayed what its peer sent before it closed (RFC 6120 §4.4).  The caller
        bounds the wait."""
        for listener in self._listeners:
            await listener.aclose()
        async with trio.open_nursery() as nursery:
            for conn in list(self.connections):
                nursery.start_soon(conn.shutdown)
        while self.active:
            self._idle = trio.Event()
            await self._idle.wait()


async def serve(
    config: Config,
    *,
    evidence_for: EvidenceFor | None = None,
    outbound_handler: ConnectionHandler | None = None,
    inbound_listeners: Sequence[trio.SocketListener] | None = None,
    outbound_listeners: Sequence[trio.SocketListener] | None = None,
    websocket_listeners: Sequence[trio.SocketListener] | None = None,
    metrics=None,
    resolver=None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the proxy for `config` until cancelled; `task_status.started(Listening(...))`
    reports the bound addresses (and the `ProxyServer`, for reload/shutdown).

    `outbound_handler` (e.g. a `proxy.outbound.OutboundProxy`) is run for each connection on
    `outbound.listen`; `metrics` is a `proxy.metrics.Metrics`; `resolver` a shared
    `policy.dns.Resolver` (all optional)."""
    server = ProxyServer(config, evidence_for=evidence_for, resolver=resolver,
                         outbound_handler=outbound_handler, metrics=metrics)
    await server.serve(inbound_listeners=inbound_listeners, outbound_listeners=outbound_listeners,
                       websocket_listeners=websocket_listeners, task_status=task_status)


__all__ = ["Listening", "ProxyServer", "dns_evidence", "inbound_settings", "open_listeners", "serve"]
