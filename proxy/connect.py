"""Reaching a peer domain's servers (DESIGN §2.1, §3.2): the targets DNS gave, in order; TCP
to the addresses *our* resolver returned, with happy eyeballs; STARTTLS or Direct TLS; the
peer's chain judged by the peer domain's policy.

The outbound proxy (`proxy.outbound`) and `xmpp-dane-proxy check` (`proxy.check`) both go
through `attempt_target`, so what `check` prints is what the proxy would do.

* `connect_peer(domain, ...)` — the whole of §3.2's "resolves the peer, connects, verifies":
  gathers the evidence, tries each target until one is accepted, returns the open TLS stream
  (`PeerConnection`) or raises `PeerUnreachable` with every target's reason.
* `attempt_target(...)` — one target: connect, negotiate, handshake, decide.  Evidence that
  already rejects (bogus/timed-out DNS) is decided without touching the network.
* `open_tcp(addresses, port)` (from `proxy.tcp_connect`, re-exported) — happy eyeballs over
  the validating resolver's IP literals.
* `StartTlsNegotiation` — the initiating side of RFC 6120 §5.4 as a sans-IO object.
"""
from __future__ import annotations

import datetime as _dt
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import unescape

import trio
from cryptography import x509
from OpenSSL import SSL

from policy.decide import decide
from policy.dns import Resolver
from policy.evidence import Evidence
from policy.peer_evidence import PeerEvidence, SrvTarget, gather
from policy.pkix import TrustStore
from policy.pkix_names import normalise_domain
from policy.policyfile import Policy
from policy.posh import PoshResult
from policy.verdict import Verdict, reject
from proxy.posh_fetch import PoshFetcher, decide_with_posh, shared_fetcher
from proxy.tcp_connect import HAPPY_EYEBALLS_DELAY, ConnectError, format_address, open_tcp, order_addresses
from proxy.tls import (ALPN_XMPP_SERVER, TlsError, TlsInfo, TlsStream, UnreadableCertificate, client_context,
                       describe_openssl_error)
from proxy.xmlstream import (
    NS_STREAM_ERRORS, NS_STREAMS, NS_TLS, DEFAULT_MAX_STANZA_BYTES, Element, StreamClosed,
    StreamOpened, XmlError, XmlStreamParser, stream_header,
)

__all__ = [
    "ConnectError", "HAPPY_EYEBALLS_DELAY", "NegotiationError", "PeerConnection", "PeerUnreachable",
    "StartTlsNegotiation", "TargetAttempt", "TlsContexts", "attempt_target", "connect_peer",
    "describe_stream_error", "format_address", "open_tcp", "order_addresses",
]

# Per target, TCP + STARTTLS + TLS handshake.  The default is limits.handshake_timeout (30 s,
# Prosody's and ejabberd's negotiation timeout); `check` and tests pass their own.
DEFAULT_ATTEMPT_TIMEOUT = 30.0
# RFC 6120 §5.4.2.1: <starttls/> in the TLS namespace.
STARTTLS = f"<starttls xmlns='{NS_TLS}'/>".encode()

MODE_STARTTLS = "starttls"
MODE_DIRECT_TLS = "direct-tls"


class NegotiationError(Exception):
    """The peer did not get us to a TLS handshake (STARTTLS refused, stream error, bad XML)."""


# ---------------------------------------------------------------------------------------------
# STARTTLS, sans-IO


_TEXT = re.compile(rb"<(?:[A-Za-z_][\w.-]*:)?text\b[^>]*>(.*?)</(?:[A-Za-z_][\w.-]*:)?text>", re.DOTALL)


def describe_stream_error(element: Element) -> str:
    """`condition: text` of a received `<stream:error>` (RFC 6120 §4.9.2)."""
    condition = next((c.name for c in element.children
                      if c.ns == NS_STREAM_ERRORS and c.name != "text"), "undefined-condition")
    m = _TEXT.search(element.raw)
    text = unescape(m.group(1).decode("utf-8", "replace"), {"&apos;": "'", "&quot;": '"'}).strip() if m else ""
    return f"{condition}: {text}" if text else condition


class StartTlsNegotiation:
    """RFC 6120 §5.4 from the initiating side, without I/O.

    `opening()` is our stream header; feed the peer's bytes to `receive()`, send what it
    returns.  `<starttls/>` is sent as soon as the features arrive, offered or not (DESIGN
    §3.2: never plaintext; RFC 7590 §3.1 — a peer that does not offer TLS is not spoken to in
    the clear).  `done` turns true at `<proceed/>`; anything else ends in NegotiationError.
    """

    def __init__(self, *, domain: str, local_domain: str | None,
                 max_stanza_bytes: int = DEFAULT_MAX_STANZA_BYTES) -> None:
        self.domain = domain
        self.local_domain = local_domain
        self.parser = XmlStreamParser(max_stanza_bytes=max_stanza_bytes,
                                      stop_after=lambda el: el.is_(NS_TLS, "proceed"))
        self.header: StreamOpened | None = None
        self.starttls_offered: bool | None = None
        self.starttls_sent = False
        self.done = False

    def opening(self) -> bytes:
        # RFC 6120 §4.7.1: from = the initiating server's domain, to = the peer domain.
        return stream_header(to=self.domain, from_=self.local_domain, id=None)

    def receive(self, data: bytes) -> bytes:
        """Feed the peer's bytes; returns bytes to send.  Raises NegotiationError."""
        out = b""
        for event in self.parser.feed(data):
            if isinstance(event, StreamOpened):
                self.header = event
            elif isinstance(event, XmlError):
                raise NegotiationError(f"peer sent bad XML before TLS ({event.condition}: {event.text})")
            elif isinstance(event, StreamClosed):
                raise NegotiationError("peer closed the stream before TLS")
            elif event.is_(NS_STREAMS, "error"):
                raise NegotiationError(f"peer sent a stream error before TLS: {describe_stream_error(event)}")
            elif event.is_(NS_STREAMS, "features") and not self.starttls_sent:
                self.starttls_offered = event.find(NS_TLS, "starttls") is not None
                self.starttls_sent = True
                out += STARTTLS
            elif event.is_(NS_TLS, "proceed") and self.starttls_sent:
                # RFC 6120 §5.4.3.3: the client speaks first in TLS; nothing may follow
                # <proceed/> until our ClientHello.
                if self.parser.trailing.strip():
                    raise NegotiationError("peer sent data after <proceed/> before the TLS handshake")
                self.done = True
            elif event.is_(NS_TLS, "failure"):
                raise NegotiationError("peer answered <starttls/> with <failure/>"
                                       + ("" if self.starttls_offered else " (it does not offer STARTTLS)"))
            else:
                raise NegotiationError(f"peer sent <{event.name}> where STARTTLS negotiation was expected")
        return out


# ---------------------------------------------------------------------------------------------
# TLS client contexts


class TlsContexts:
    """Client contexts per (local domain, TLS minimum, Direct TLS or not), made once.

    `identities` maps a local domain to its (certificate chain file, key file): the
    certificate presented as client certificate when that domain opens a stream (DESIGN
    §3.2).  A domain missing from it connects without a client certificate (`check` without
    a configuration does that).
    """

    def __init__(self, identities: Mapping[str, tuple[str | Path, str | Path]] | None = None) -> None:
        self.identities = {normalise_domain(k): v for k, v in (identities or {}).items()}
        self._cache: dict[tuple[str | None, str, bool], SSL.Context] = {}

    def get(self, local_domain: str | None, *, min_version: str = "1.2", direct_tls: bool = False) -> SSL.Context:
        key = (normalise_domain(local_domain) if local_domain else None, min_version, direct_tls)
        ctx = self._cache.get(key)
        if ctx is None:
            cert, pkey = self.identities.get(key[0], (None, None)) if key[0] else (None, None)
            # XEP-0368 §3: Direct TLS S2S offers ALPN "xmpp-server"; STARTTLS needs none.
            ctx = client_context(cert_file=cert, key_file=pkey, min_version=min_version,
                                 alpn=(ALPN_XMPP_SERVER,) if direct_tls else ())
            self._cache[key] = ctx
        return ctx


# ---------------------------------------------------------------------------------------------
# One target


@dataclass
class TargetAttempt:
    """What happened at one target: where we connected, what TLS gave, the verdict or error."""

    target: SrvTarget
    domain: str
    address: str | None = None              # "IP:PORT" connected to
    tls: TlsInfo | None = None
    chain: tuple[x509.Certificate, ...] = ()
    starttls_offered: bool | None = None    # None for Direct TLS or before features
    verdict: Verdict | None = None
    error: str | None = None                # connection/negotiation failure (no verdict)
    seconds: float = 0.0
    posh: PoshResult | None = None          # the POSH result the verdict used (RFC 7711), if fetched

    @property
    def mode(self) -> str:
        return MODE_DIRECT_TLS if self.target.direct_tls else MODE_STARTTLS

    @property
    def accepted(self) -> bool:
        return self.verdict is not None and self.verdict.accepted

    @property
    def reason(self) -> str:
        if self.verdict is not None:
            return self.verdict.reason
        return self.error or "not attempted"

    def describe(self) -> str:
        """One line: `host:port (mode) at IP:PORT: rejected: reason` (for stream errors, logs)."""
        where = f" at {self.address}" if self.address else ""
        if self.verdict is not None:
            what = "accepted" if self.verdict.accepted else "rejected"
        else:
            what = "failed"
        return f"{self.target.host}:{self.target.port} ({self.mode}){where}: {what}: {self.reason}"


def early_reject(evidence: Evidence, policy: Policy) -> bool:
    """Whether the verdict is a rejection whatever the peer presents (DESIGN §2.4: `block`,
    or bogus/timed-out evidence), so there is no reason to connect at all."""
    if policy.require == "block":
        return True
    if evidence.tlsa_status is not None and evidence.tlsa_status.failed:
        return True
    return any(status.failed for status in evidence.statuses.values())


async def attempt_target(
    peer: PeerEvidence,
    target: SrvTarget,
    *,
    policy: Policy,
    trust: TrustStore | None,
    contexts: TlsContexts,
    local_domain: str | None,
    timeout: float = DEFAULT_ATTEMPT_TIMEOUT,
    max_stanza_bytes: int = DEFAULT_MAX_STANZA_BYTES,
    keep_open: bool = False,
    connect_anyway: bool = False,
    happy_eyeballs_delay: float = HAPPY_EYEBALLS_DELAY,
    now: _dt.datetime | None = None,
    posh: PoshFetcher | None = None,
) -> tuple[TargetAttempt, TlsStream | None]:
    """Connect to `target`, get TLS up, and decide on the chain with `policy`.

    Returns the attempt and, if it was accepted and `keep_open`, the TLS stream (positioned
    right after the handshake: nothing but our own pre-TLS header and `<starttls/>` has been
    sent).  A rejected stream is closed before returning; nothing is sent on it.  Evidence
    that rejects whatever the peer presents is decided without connecting, unless
    `connect_anyway` (for `check`, which shows the chain regardless).  `posh` fetches the
    peer domain's POSH document when the policy uses POSH and the verdict depends on it.
    """
    started = time.monotonic()
    attempt = TargetAttempt(target=target, domain=peer.domain)
    evidence = peer.for_target(target)
    doomed = early_reject(evidence, policy)
    if doomed:
        attempt.verdict = decide([], evidence, policy, trust=trust, now=now)
        if not connect_anyway:
            attempt.seconds = time.monotonic() - started
            return attempt, None
    if not target.addresses:
        status = target.address_status.value if target.address_status else "not looked up"
        attempt.error = f"no A/AAAA address for {target.host} ({status})"
        attempt.seconds = time.monotonic() - started
        return attempt, None

    stage = "TCP connect"
    tls: TlsStream | None = None
    tcp: trio.SocketStream | None = None
    try:
        with trio.move_on_after(timeout) as scope:
            tcp, ip = await open_tcp(target.addresses, target.port, delay=happy_eyeballs_delay)
            attempt.address = format_address(ip, target.port)
            ctx = contexts.get(local_domain, min_version=policy.tls_min_version, direct_tls=target.direct_tls)
            if not target.direct_tls:
                stage = "STARTTLS negotiation"
                attempt.starttls_offered = await _starttls(tcp, peer.domain, local_domain, max_stanza_bytes, attempt)
            stage = "TLS handshake"
            # SNI = the peer domain D for both modes (XEP-0368 §3; RFC 7590 §3.1 / RFC 6125).
            tls = TlsStream(tcp, ctx, server_side=False, server_hostname=peer.domain)
            await tls.do_handshake()
            attempt.tls = tls.info()
            stage = "reading the server's certificate chain"
            attempt.chain = attempt.tls.chain
        if scope.cancelled_caught:
            attempt.error = f"timed out after {timeout:g} s in {stage}"
    except ConnectError as exc:
        attempt.error = f"cannot connect: {exc}"
    except NegotiationError as exc:
        attempt.error = str(exc)
    except TlsError as exc:
        attempt.error = str(exc)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        attempt.error = f"connection lost in {stage}: {describe_openssl_error(exc) if isinstance(exc, SSL.Error) else exc}"
    except SSL.Error as exc:
        attempt.error = f"{stage} failed: {describe_openssl_error(exc)}"
    except UnreadableCertificate as exc:   # one OpenSSL took but `cryptography` cannot read
        attempt.error = f"{stage} failed: {exc}"

    if attempt.error is None:
        attempt.verdict, attempt.posh = await decide_with_posh(
            list(attempt.chain), evidence, policy, trust=trust, fetcher=posh, now=now)
    if doomed:
        keep_open = False   # decided before connecting; the connection was only to look
    attempt.seconds = time.monotonic() - started
    if attempt.accepted and keep_open and tls is not None:
        return attempt, tls
    # Rejected (or failed): close without a single byte of application data.
    if tls is not None:
        await _close_quietly(tls)
    elif tcp is not None:
        await trio.aclose_forcefully(tcp)
    return attempt, None


async def _starttls(tcp: trio.SocketStream, domain: str, local_domain: str | None,
                    max_stanza_bytes: int, attempt: TargetAttempt) -> bool | None:
    negotiation = StartTlsNegotiation(domain=domain, local_domain=local_domain,
                                      max_stanza_bytes=max_stanza_bytes)
    await tcp.send_all(negotiation.opening())
    while not negotiation.done:
        data = await tcp.receive_some(65536)
        if not data:
            raise NegotiationError("peer closed the connection during STARTTLS negotiation")
        reply = negotiation.receive(data)
        attempt.starttls_offered = negotiation.starttls_offered
        if reply:
            await tcp.send_all(reply)
    return negotiation.starttls_offered


async def _close_quietly(stream: trio.abc.AsyncResource) -> None:
    # close_notify is TLS, not application data; bounded by TlsStream itself.
    with trio.CancelScope(shield=True):
        try:
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


# ---------------------------------------------------------------------------------------------
# A whole peer domain


class PeerUnreachable(Exception):
    """No target of `domain` was accepted.  `reason` is the one-line summary naming each
    target's reason (the `<text>` of `remote-connection-failed`); `verdict` is set when the
    domain was refused as a whole (blocked, SRV bogus, no service) before any target."""

    def __init__(self, domain: str, reason: str, attempts: Sequence[TargetAttempt] = (),
                 verdict: Verdict | None = None, evidence: PeerEvidence | None = None) -> None:
        super().__init__(reason)
        self.domain = domain
        self.reason = reason
        self.attempts = list(attempts)
        self.verdict = verdict
        self.evidence = evidence


@dataclass
class PeerConnection:
    """An accepted peer: the TLS stream, the attempt that won, and every attempt before it."""

    domain: str
    stream: TlsStream
    attempt: TargetAttempt
    attempts: list[TargetAttempt] = field(default_factory=list)
    evidence: PeerEvidence | None = None


async def connect_peer(
    domain: str,
    *,
    resolver: Resolver,
    policy: Policy,
    trust: TrustStore | None,
    contexts: TlsContexts,
    local_domain: str | None,
    timeout: float = DEFAULT_ATTEMPT_TIMEOUT,
    max_stanza_bytes: int = DEFAULT_MAX_STANZA_BYTES,
    on_attempt: Callable[[TargetAttempt], None] | None = None,
    on_domain_verdict: Callable[[Verdict], None] | None = None,
    happy_eyeballs_delay: float = HAPPY_EYEBALLS_DELAY,
    posh: PoshFetcher | None = None,
) -> PeerConnection:
    """Resolve `domain` (§2.1, with the policy's static SRV/TLSA), try its targets in order
    (§3.2: failure or rejection → next target), return the first accepted one.

    `on_attempt` is called after every target (to log the decision); `on_domain_verdict`
    when the domain is refused before any target is tried.  `posh` is the POSH fetcher
    (default: the one shared with everything else using `resolver`).  Raises PeerUnreachable.
    """
    d = normalise_domain(domain)

    def refuse(verdict: Verdict, evidence: PeerEvidence | None = None) -> PeerUnreachable:
        if on_domain_verdict is not None:
            on_domain_verdict(verdict)
        return PeerUnreachable(d, verdict.reason, verdict=verdict, evidence=evidence)

    if policy.require == "block":
        # No DNS for a domain that is never accepted: a blocked peer learns nothing from us.
        raise refuse(decide([], Evidence(domain=d), policy, trust=trust))
    try:
        peer = await gather(d, resolver, static_srv=policy.srv, static_tlsa=policy.tlsa)
    except ValueError as exc:   # not a valid DNS name (policy.dns.to_dns_name)
        raise refuse(reject(f"{d}: {exc}", policy_source=policy.source)) from None
    if peer.failed:
        # DESIGN §2.1: SRV bogus -> the domain fails closed; decide() says so in its words.
        raise refuse(decide([], Evidence(domain=d, statuses=dict(peer.srv_statuses)), policy, trust=trust), peer)
    if not peer.targets:
        why = ("it publishes no XMPP server-to-server service (SRV target '.')" if peer.no_service
               else "DNS gave no server to connect to")
        dns = {k: str(v) for k, v in peer.statuses.items()}
        raise refuse(reject(f"{d}: {why}", dns=dns, policy_source=policy.source), peer)

    attempts: list[TargetAttempt] = []
    for target in peer.targets:
        attempt, stream = await attempt_target(
            peer, target, policy=policy, trust=trust, contexts=contexts, local_domain=local_domain,
            timeout=timeout, max_stanza_bytes=max_stanza_bytes, keep_open=True,
            happy_eyeballs_delay=happy_eyeballs_delay,
            posh=posh if posh is not None else shared_fetcher(resolver),
        )
        attempts.append(attempt)
        if on_attempt is not None:
            on_attempt(attempt)
        if stream is not None:
            return PeerConnection(d, stream, attempt, attempts, peer)
    summary = "; ".join(a.describe() for a in attempts)
    raise PeerUnreachable(d, f"no server of {d} was accepted: {summary}", attempts, evidence=peer)


def new_stream_id() -> str:
    """A fresh stream id for headers the proxy itself sends (RFC 6120 §4.7.3: unpredictable)."""
    return secrets.token_hex(8)
