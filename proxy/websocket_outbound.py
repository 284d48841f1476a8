"""Outbound XEP-0468 WebSocket S2S: discovery (XEP-0156 host-meta) and the client side.

Used by the outbound proxy only for a peer whose policy file lists it
(`transports = ["tcp", "websocket"]`; the order is the order of preference, the built-in
default is TCP only).  `connect_with_transports` is what `proxy.outbound` calls instead of
`proxy.connect.connect_peer`: for a TCP-only policy it *is* `connect_peer`.

Discovery (XEP-0468 §2 item 1 → XEP-0156 §3): `GET https://D/.well-known/host-meta.json`,
then the XRD form `https://D/.well-known/host-meta`; the links with relation
`urn:xmpp:alt-connections:s2s-websocket` and a `wss:` URL (XEP-0468 §2 item 3: wss is a
MUST) are the endpoints.  The web server is verified with PKIX for D against the policy's
trust store, D's addresses come from our validating resolver; a document that cannot be had
that way yields no endpoint.

Each endpoint is then a target like an SRV target: TCP to addresses our resolver gave (an IP
literal in the URL is used as is), TLS with our pyOpenSSL `TlsStream` (SNI = the URL's host,
ALPN `http/1.1`, the local domain's certificate as client certificate), and the chain judged
with D's policy against D's DNS evidence — the same evidence an inbound peer of D is judged
with (`PeerEvidence.for_inbound`: reference identifiers D and its securely delegated SRV
targets, TLSA of D's targets or the policy file's).  Only then is the HTTP upgrade sent
(subprotocol `xmpp` required) and the backend's stream relayed, framed by
`proxy.websocket.WebSocketFraming`.

The WebSocket client is wsproto (the sans-IO engine trio-websocket itself runs on), driven
without a background task: `connect_peer` hands back a stream that `proxy.outbound` relays
later from tasks of its own, which trio-websocket's client cannot do (its reader task must
live in a nursery that outlives the connection).
"""
from __future__ import annotations

import collections
import ipaddress
import json
import urllib.parse
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from xml.parsers import expat

import trio
from trio_websocket import CloseReason, ConnectionClosed
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection, BytesMessage, CloseConnection, Ping, RejectConnection, Request, TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from policy.decide import decide
from policy.dns import Resolver
from policy.peer_evidence import PeerEvidence, SrvTarget, gather
from policy.pkix import TrustStore
from policy.pkix_names import normalise_domain
from policy.policyfile import Policy
from proxy.connect import (
    DEFAULT_ATTEMPT_TIMEOUT, HAPPY_EYEBALLS_DELAY, ConnectError, PeerConnection, PeerUnreachable, TargetAttempt,
    TlsContexts, connect_peer, early_reject, format_address, open_tcp,
)
from proxy.https_get import HTTPS_PORT, HttpsGetError, host_addresses, https_get
from proxy.posh_fetch import decide_with_posh, shared_fetcher
from proxy.tls import TlsError, TlsStream, UnreadableCertificate, client_context
from proxy.websocket import ALPN_HTTP_1_1, SUBPROTOCOL, WS_HARD_LIMIT_FACTOR, WebSocketFraming, WebSocketStream
from proxy.xmlstream import DEFAULT_MAX_STANZA_BYTES

__all__ = [
    "Discovery", "HostMetaDiscovery", "LINK_REL", "MODE_WEBSOCKET", "WebSocketAttempt", "WsprotoClient",
    "attempt_websocket", "connect_websocket_peer", "connect_with_transports", "discoverer_for",
    "parse_host_meta_json", "parse_host_meta_xrd",
]

# XEP-0468 / XEP-0156 §3: the link relation naming a WebSocket S2S endpoint.
LINK_REL = "urn:xmpp:alt-connections:s2s-websocket"
NS_XRD = "http://docs.oasis-open.org/ns/xri/xrd-1.0"
# XEP-0156 §3: the JSON form (RFC 6415 §6) is asked first, the XRD form second.
HOST_META_PATHS = (("/.well-known/host-meta.json", "json"), ("/.well-known/host-meta", "xrd"))
MODE_WEBSOCKET = "websocket"
# A host-meta document lists a handful of links; 64 KiB bounds what a web server can make us hold.
MAX_HOST_META_BYTES = 65536
# The whole discovery (two GETs at most) gets the resolver's default budget: a backend
# stream waits for it, far inside limits.handshake_timeout.
DISCOVERY_TIMEOUT = 5.0
_RECEIVE_SIZE = 65536


# ================================================================================ discovery

def _wss_only(urls: Sequence[str]) -> tuple[str, ...]:
    out = []
    for url in urls:
        if isinstance(url, str) and urllib.parse.urlsplit(url.strip()).scheme.lower() == "wss":
            out.append(url.strip())
    return tuple(dict.fromkeys(out))


def parse_host_meta_json(body: bytes) -> tuple[str, ...]:
    """The `wss:` hrefs of `LINK_REL` links in a JSON host-meta document (RFC 6415 Appendix A).
    Raises ValueError for a document that is not one."""
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"host-meta.json is not JSON: {exc}") from None
    links = doc.get("links") if isinstance(doc, dict) else None
    if not isinstance(links, list):
        raise ValueError("host-meta.json has no 'links' list")
    return _wss_only([link.get("href") for link in links
                      if isinstance(link, dict) and link.get("rel") == LINK_REL])


def parse_host_meta_xrd(body: bytes) -> tuple[str, ...]:
    """The `wss:` hrefs of `LINK_REL` links in an XRD host-meta document (RFC 6415 §3).
    No DTD, entity or external reference is processed; ValueError for a bad document."""
    hrefs: list[str] = []

    def refuse(*_args) -> None:
        raise ValueError("host-meta uses a DTD or entities, which are not processed")

    def start(qname: str, attrs: dict[str, str]) -> None:
        if qname == f"{NS_XRD} Link" and attrs.get("rel") == LINK_REL:
            hrefs.append(attrs.get("href", ""))

    p = expat.ParserCreate(namespace_separator=" ")
    p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    p.StartElementHandler = start
    p.StartDoctypeDeclHandler = refuse
    p.EntityDeclHandler = refuse
    p.ExternalEntityRefHandler = refuse
    try:
        p.Parse(body, True)
    except expat.ExpatError as exc:
        raise ValueError(f"host-meta is not well-formed XML: {exc}") from None
    return _wss_only(hrefs)


@dataclass(frozen=True)
class Discovery:
    """What discovery found for `domain`: `urls` (possibly none), where from, and why not."""

    domain: str
    urls: tuple[str, ...] = ()
    source: str | None = None
    reason: str = ""


class HostMetaDiscovery:
    """XEP-0156 host-meta lookups over PKIX-verified HTTPS.

    `overrides` maps a host to the `(ip, port)` to connect to instead of asking DNS (tests;
    the URL, SNI and certificate check stay those of the host); `https_port` is the port for
    the host-meta URL (443).
    """

    def __init__(self, resolver: Resolver | None, *, timeout: float = DISCOVERY_TIMEOUT,
                 overrides: Mapping[str, tuple[str, int]] | None = None, https_port: int = HTTPS_PORT,
                 happy_eyeballs_delay: float = HAPPY_EYEBALLS_DELAY) -> None:
        self._resolver: Callable[[], Resolver | None] = lambda: resolver
        self.timeout = timeout
        self.overrides = {normalise_domain(k): v for k, v in (overrides or {}).items()}
        self.https_port = https_port
        self.happy_eyeballs_delay = happy_eyeballs_delay

    @property
    def resolver(self) -> Resolver | None:
        return self._resolver()

    async def discover(self, domain: str, *, trust: TrustStore | None) -> Discovery:
        """The WebSocket S2S endpoints `domain` advertises; never raises for network or
        document problems (they are the `reason` of an empty result)."""
        d = normalise_domain(domain)
        if trust is None:
            return Discovery(d, reason="no PKIX trust store to verify the host-meta server with")
        reasons = []
        with trio.move_on_after(self.timeout) as scope:
            for path, form in HOST_META_PATHS:
                url = f"https://{d}{'' if self.https_port == HTTPS_PORT else f':{self.https_port}'}{path}"
                try:
                    status, body = await self._get(d, self.https_port, path, trust)
                except _FetchError as exc:
                    reasons.append(f"{url}: {exc}")
                    continue
                if status != 200:
                    reasons.append(f"{url}: HTTP {status}")
                    continue
                try:
                    urls = parse_host_meta_json(body) if form == "json" else parse_host_meta_xrd(body)
                except ValueError as exc:
                    reasons.append(f"{url}: {exc}")
                    continue
                if urls:
                    return Discovery(d, urls, source=url)
                reasons.append(f"{url}: no {LINK_REL} link with a wss: URL")
        if scope.cancelled_caught:
            reasons.append(f"discovery timed out after {self.timeout:g} s")
        return Discovery(d, reason="; ".join(reasons))

    async def _get(self, host: str, port: int, target: str, trust: TrustStore) -> tuple[int, bytes]:
        try:
            response = await https_get(host, port, target, trust=trust, resolver=self.resolver,
                                       max_body=MAX_HOST_META_BYTES, overrides=self.overrides,
                                       happy_eyeballs_delay=self.happy_eyeballs_delay)
        except HttpsGetError as exc:
            raise _FetchError(str(exc)) from None
        return response.status, response.body


class _FetchError(Exception):
    pass


async def _addresses(host: str, port: int, resolver: Resolver | None,
                     overrides: Mapping[str, tuple[str, int]]) -> tuple[list[str], int]:
    """Where to connect for `host`: an override (tests), or our validating resolver's answer."""
    override = overrides.get(normalise_domain(host))
    if override is not None:
        return [override[0]], override[1]
    return await host_addresses(host, resolver), port


_SHARED: "weakref.WeakKeyDictionary[Resolver, HostMetaDiscovery]" = weakref.WeakKeyDictionary()


def discoverer_for(resolver: Resolver) -> HostMetaDiscovery:
    """The discovery that goes with `resolver` (one per resolver, holding it weakly)."""
    found = _SHARED.get(resolver)
    if found is None:
        found = HostMetaDiscovery(None)
        found._resolver = weakref.ref(resolver)   # type: ignore[assignment]
        _SHARED[resolver] = found
    return found


# ================================================================================ the client

class WsprotoClient:
    """A client WebSocket over any trio stream, sans background task.

    Offers what `proxy.websocket.WebSocketStream` uses of a trio-websocket connection:
    `get_message()`, `send_message()`, `aclose()`, raising trio-websocket's
    `ConnectionClosed` once the WebSocket is closed.  Pings are answered while reading.
    """

    def __init__(self, stream: trio.abc.Stream, *, max_message_size: int) -> None:
        self.stream = stream
        self.max_message_size = max_message_size
        self.subprotocol: str | None = None
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._send_lock = trio.Lock()
        self._closed: CloseReason | None = None
        # Events wsproto parsed but we have not handled yet: one read may carry several
        # messages (or the upgrade answer and the first message).
        self._events: collections.deque = collections.deque()
        self._eof = False

    def _next_event(self):
        """The next parsed event, or None when more bytes are needed."""
        if not self._events:
            self._events.extend(self._ws.events())
        return self._events.popleft() if self._events else None

    async def _send(self, event) -> None:
        try:
            data = self._ws.send(event)
        except LocalProtocolError as exc:
            raise ConnectionClosed(self._closed or CloseReason(1006, str(exc))) from None
        async with self._send_lock:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._closed = self._closed or CloseReason(1006, f"connection lost: {exc}")
                raise ConnectionClosed(self._closed) from None

    async def _receive(self) -> None:
        try:
            data = await self.stream.receive_some(_RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self._eof = True
        try:
            self._ws.receive_data(data or None)
        except LocalProtocolError:   # data after wsproto considers the connection closed
            self._eof = True

    async def handshake(self, host: str, path: str, subprotocols: Sequence[str]) -> None:
        """Send the upgrade request; raises ConnectionError naming why it was not accepted."""
        await self._send(Request(host=host, target=path, subprotocols=list(subprotocols)))
        while True:
            try:
                event = self._next_event()
            except RemoteProtocolError as exc:
                raise ConnectionError(f"bad WebSocket handshake response ({exc})") from None
            if isinstance(event, AcceptConnection):
                self.subprotocol = event.subprotocol
                return
            if isinstance(event, RejectConnection):
                raise ConnectionError(f"WebSocket upgrade refused with HTTP {event.status_code}")
            if event is not None:
                continue
            if self._eof or self._ws.state.name == "CLOSED":
                raise ConnectionError("connection closed during the WebSocket upgrade")
            await self._receive()

    async def get_message(self) -> str | bytes:
        parts: list = []
        size = 0
        while True:
            if self._closed is not None:
                raise ConnectionClosed(self._closed)
            try:
                event = self._next_event()
            except RemoteProtocolError as exc:
                self._closed = CloseReason(1002, str(exc))
                raise ConnectionClosed(self._closed) from None
            if event is None:
                if self._eof:   # the transport ended and wsproto has nothing more to say
                    self._closed = CloseReason(1006, "connection closed without a close frame")
                    continue
                await self._receive()
                continue
            if isinstance(event, (TextMessage, BytesMessage)):
                parts.append(event.data)
                size += len(event.data)
                if size > self.max_message_size:
                    # RFC 6455 §7.4.1: 1009, as trio-websocket's server does.
                    reason = f"Exceeded maximum message size: {self.max_message_size} bytes"
                    try:
                        await self._send(CloseConnection(code=1009, reason=reason))
                    except ConnectionClosed:
                        pass
                    self._closed = CloseReason(1009, reason)
                    raise ConnectionClosed(self._closed)
                if event.message_finished:
                    return ("" if isinstance(event, TextMessage) else b"").join(parts)
            elif isinstance(event, Ping):
                await self._send(event.response())
            elif isinstance(event, CloseConnection):
                self._closed = CloseReason(event.code, event.reason or None)
                try:
                    await self._send(event.response())
                except ConnectionClosed:
                    pass
                raise ConnectionClosed(self._closed)

    async def send_message(self, message: str) -> None:
        if self._closed is not None:
            raise ConnectionClosed(self._closed)
        await self._send(TextMessage(data=message))

    async def aclose(self) -> None:
        if self._closed is None and self._ws.state.name == "OPEN":
            self._closed = CloseReason(1000, None)
            with trio.move_on_after(1.0):
                try:
                    await self._send(CloseConnection(code=1000))
                except ConnectionClosed:
                    pass
        await self.stream.aclose()


# ================================================================================ one endpoint

@dataclass
class WebSocketAttempt(TargetAttempt):
    """A `TargetAttempt` at a WebSocket endpoint; `mode` is "websocket"."""

    url: str = ""

    @property
    def mode(self) -> str:   # type: ignore[override]
        return MODE_WEBSOCKET

    def describe(self) -> str:
        where = f" at {self.address}" if self.address else ""
        what = ("accepted" if self.verdict.accepted else "rejected") if self.verdict is not None else "failed"
        return f"{self.url} (websocket){where}: {what}: {self.reason}"


_CLIENT_CONTEXTS: "weakref.WeakKeyDictionary[TlsContexts, dict]" = weakref.WeakKeyDictionary()


def _tls_context(contexts: TlsContexts, local_domain: str | None, min_version: str):
    """`contexts`' identity for `local_domain`, with ALPN http/1.1 (RFC 6455 is HTTP/1.1)."""
    cache = _CLIENT_CONTEXTS.setdefault(contexts, {})
    key = (normalise_domain(local_domain) if local_domain else None, min_version)
    ctx = cache.get(key)
    if ctx is None:
        cert, pkey = contexts.identities.get(key[0], (None, None)) if key[0] else (None, None)
        ctx = cache[key] = client_context(cert_file=cert, key_file=pkey, min_version=min_version,
                                          alpn=(ALPN_HTTP_1_1,))
    return ctx


async def attempt_websocket(
    peer: PeerEvidence, url: str, *, policy: Policy, trust: TrustStore | None, contexts: TlsContexts,
    local_domain: str | None, resolver: Resolver | None, timeout: float = DEFAULT_ATTEMPT_TIMEOUT,
    max_stanza_bytes: int = DEFAULT_MAX_STANZA_BYTES, happy_eyeballs_delay: float = HAPPY_EYEBALLS_DELAY,
    overrides: Mapping[str, tuple[str, int]] | None = None, keep_open: bool = True,
) -> tuple[WebSocketAttempt, WebSocketStream | None]:
    """Connect to one `wss:` endpoint of `peer.domain`, judge its chain, and (if accepted and
    `keep_open`) upgrade to WebSocket.  Nothing of the backend's stream is sent here; a
    rejected endpoint receives no application data at all (not even the HTTP request)."""
    started = trio.current_time()
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or HTTPS_PORT
    attempt = WebSocketAttempt(target=SrvTarget(host=host, port=port, direct_tls=True), domain=peer.domain, url=url)
    evidence = peer.for_inbound()
    if early_reject(evidence, policy):
        attempt.verdict = decide([], evidence, policy, trust=trust)
        return attempt, None
    tls: TlsStream | None = None
    stage = "address lookup"
    with trio.move_on_after(timeout) as scope:
        try:
            addresses, port = await _addresses(host, port, resolver, overrides or {})
            stage = "TCP connect"
            tcp, ip = await open_tcp(addresses, port, delay=happy_eyeballs_delay)
            attempt.address = format_address(ip, port)
            stage = "TLS handshake"
            sni = None if _is_ip(host) else host
            tls = TlsStream(tcp, _tls_context(contexts, local_domain, policy.tls_min_version),
                            server_side=False, server_hostname=sni)
            await tls.do_handshake()
            attempt.tls = tls.info()
            stage = "reading the server's certificate chain"
            attempt.chain = attempt.tls.chain
        except (HttpsGetError, ConnectError, TlsError, UnreadableCertificate) as exc:
            attempt.error = f"{stage}: {exc}"
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            attempt.error = f"connection lost in {stage}: {exc}"
    if scope.cancelled_caught:
        attempt.error = f"timed out after {timeout:g} s in {stage}"
    if attempt.error is None:
        attempt.verdict, attempt.posh = await decide_with_posh(
            list(attempt.chain), evidence, policy, trust=trust, fetcher=shared_fetcher(resolver))
    stream = None
    if attempt.accepted and keep_open and tls is not None:
        client = WsprotoClient(tls, max_message_size=WS_HARD_LIMIT_FACTOR * max_stanza_bytes)
        authority = host if port == HTTPS_PORT else f"{host}:{port}"
        if ":" in host:
            authority = f"[{host}]" + ("" if port == HTTPS_PORT else f":{port}")
        with trio.move_on_after(max(0.0, timeout - (trio.current_time() - started))) as upgrade:
            try:
                await client.handshake(authority, (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                                       [SUBPROTOCOL])
                if client.subprotocol != SUBPROTOCOL:
                    raise ConnectionError("the server did not accept the subprotocol 'xmpp' (RFC 7395 §3.1)")
                stream = WebSocketStream(client, WebSocketFraming(max_message_bytes=max_stanza_bytes))
            except (ConnectionError, ConnectionClosed) as exc:
                attempt.error = f"WebSocket upgrade: {exc}"
        if upgrade.cancelled_caught:
            attempt.error = f"timed out after {timeout:g} s in the WebSocket upgrade"
        if stream is None:
            # An accepted certificate but no WebSocket: the endpoint failed, not the verdict.
            attempt.verdict = None
    attempt.seconds = trio.current_time() - started
    if stream is None and tls is not None:
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            await trio.aclose_forcefully(tls)
    return attempt, stream


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# ================================================================================ a peer domain

async def connect_websocket_peer(
    domain: str, *, resolver: Resolver, policy: Policy, trust: TrustStore | None, contexts: TlsContexts,
    local_domain: str | None, timeout: float = DEFAULT_ATTEMPT_TIMEOUT,
    max_stanza_bytes: int = DEFAULT_MAX_STANZA_BYTES,
    on_attempt: Callable[[TargetAttempt], None] | None = None,
    happy_eyeballs_delay: float = HAPPY_EYEBALLS_DELAY, discovery: HostMetaDiscovery | None = None,
    **_not_applicable: object,
) -> PeerConnection:
    """`domain`'s WebSocket endpoints in advertised order, the first accepted one returned
    (as a `PeerConnection` whose `stream` is a `WebSocketStream`).  Raises PeerUnreachable.
    Arguments of `connect_peer` that have no WebSocket meaning (`on_domain_verdict`, ...) are
    accepted and ignored, so both take the same call."""
    d = normalise_domain(domain)
    discovery = discovery or discoverer_for(resolver)
    peer = await gather(d, resolver, static_srv=policy.srv, static_tlsa=policy.tlsa)
    if peer.failed:
        raise PeerUnreachable(d, f"{d}: {peer.reason or 'SRV lookup failed'}; failing closed", evidence=peer)
    found = await discovery.discover(d, trust=trust)
    if not found.urls:
        raise PeerUnreachable(d, f"no WebSocket endpoint of {d}: {found.reason}", evidence=peer)
    attempts: list[TargetAttempt] = []
    for url in found.urls:
        attempt, stream = await attempt_websocket(
            peer, url, policy=policy, trust=trust, contexts=contexts, local_domain=local_domain,
            resolver=discovery.resolver, timeout=timeout, max_stanza_bytes=max_stanza_bytes,
            happy_eyeballs_delay=happy_eyeballs_delay, overrides=discovery.overrides)
        attempts.append(attempt)
        if on_attempt is not None:
            on_attempt(attempt)
        if stream is not None:
            return PeerConnection(d, stream, attempt, attempts, peer)   # type: ignore[arg-type]
    summary = "; ".join(a.describe() for a in attempts)
    raise PeerUnreachable(d, f"no WebSocket endpoint of {d} was accepted: {summary}", attempts, evidence=peer)


async def connect_with_transports(domain: str, *, resolver: Resolver, policy: Policy, **kwargs) -> PeerConnection:
    """`proxy.connect.connect_peer`, or WebSocket, in the order `policy.transports` lists
    them.  A domain refused as a whole (blocked, SRV bogus, not a DNS name) is never retried
    over another transport: failing closed must not depend on the transport."""
    if MODE_WEBSOCKET not in policy.transports or policy.require == "block":
        return await connect_peer(domain, resolver=resolver, policy=policy, **kwargs)
    failures: list[PeerUnreachable] = []
    for transport in policy.transports:
        try:
            if transport == "tcp":
                return await connect_peer(domain, resolver=resolver, policy=policy, **kwargs)
            return await connect_websocket_peer(domain, resolver=resolver, policy=policy, **kwargs)
        except PeerUnreachable as exc:
            if exc.evidence is None or exc.evidence.failed:
                raise
            # Without its traceback (which holds this frame, whose list holds it: a cycle
            # only the cyclic GC would free); its reason and attempts are what is reported.
            failures.append(exc.with_traceback(None))
    d = failures[0].domain
    raise PeerUnreachable(d, "; ".join(f.reason for f in failures),
                          [a for f in failures for a in f.attempts], evidence=failures[0].evidence)
