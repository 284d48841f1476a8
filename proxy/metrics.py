"""Prometheus metrics (DESIGN §6) and the trio HTTP endpoint that serves them.

The registry and the exposition format come from `prometheus_client`: it is the reference
implementation of the text format (0.0.4, and OpenMetrics when a scraper asks for it), does
the label escaping, and its counters are plain in-memory objects, so updating them from trio
code is a synchronous call of about a microsecond.  What it does *not* have is a server that
fits trio (its own servers run in threads), so the endpoint below is ours: one small HTTP/1.1
GET handler with a bounded request size and a timeout, with h11 (already used for the HTTPS
client) parsing the request and framing the response.

Every label takes values from a fixed set (the tuples below).  In particular the verdict
`reason` label is a *category* (`dane-mismatch`, `pkix-invalid`, ...), never the free-text
reason of the verdict, which names domains and certificates and would create a new time series
per peer.  An unexpected value is counted as `other` rather than raising, because a metrics
typo must never break a connection.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import h11
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from proxy import __version__
from proxy.config import parse_hostport
from proxy.listen import tcp_listeners

log = logging.getLogger("xmpp_dane_proxy.metrics")

PREFIX = "xmpp_dane_proxy"
DIRECTIONS = ("inbound", "outbound")
# How a connection ended: "ok" for a stream relayed until one side closed it, else the
# RFC 6120 §4.9 stream error condition we sent (DESIGN §3.3), or a transport-level end.
CONNECTION_OUTCOMES = (
    "ok",
    "host-unknown", "policy-violation", "not-authorized", "invalid-from", "not-well-formed",
    "restricted-xml", "connection-timeout", "remote-connection-failed", "system-shutdown",
    "tls-failed",          # TLS handshake failed (garbage, no shared version/cipher, alert)
    "closed-early",        # the other side went away before the stream was authenticated
    "over-limit",          # refused: limits.max_connections reached
    "resource-constraint", # the proxy ran out of file descriptors (EMFILE) or memory
    "internal-error",      # a bug: an exception escaped the connection handler
)
VERDICTS = ("accept", "reject")
PROOFTYPES = ("dane-ee", "dane-ta", "pkix-ee", "pkix-ta", "pkix", "posh", "tls", "-")
REASON_CATEGORIES = (
    "accepted", "blocked", "dnssec-bogus", "dns-timeout", "dane-mismatch", "no-tlsa",
    "pkix-invalid", "name-mismatch", "no-certificate", "posh-failed", "dns-unvalidated", "other",
)
DNS_RRTYPES = ("SRV", "TLSA", "A", "AAAA", "CNAME", "other")
DNS_STATUSES = ("secure", "insecure", "bogus", "timeout", "unvalidated")
DNS_SOURCES = ("resolver", "cache")
RELAY_SOURCES = ("peer", "backend")

# Handshake = TCP accepted → verdict (TLS, stream restarts, DNS lookups, path validation).
# Warm cache and a near peer: a few ms; cold DNS: 10-500 ms; a slow resolver hits dns.timeout
# (5 s); anything beyond is bounded by limits.handshake_timeout (30 s).  Buckets follow
# prometheus_client's defaults (5 ms … 10 s) and add 30 s so timed-out handshakes are visible.
HANDSHAKE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, math.inf)

# The HTTP endpoint.  A Prometheus scrape request is ~300 bytes of headers; 8 KiB is what
# nginx and most servers allow for a request head.  10 s is Prometheus's default
# scrape_timeout: a client slower than that is not a scraper.  8 concurrent scrapes are
# plenty (one Prometheus, maybe a second, an operator with curl).
MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT = 10.0
MAX_CONCURRENT_SCRAPES = 8
# Lingering close after a reply: nginx's lingering_time is 30 s for large uploads; a metrics
# client has nothing to upload, so 1 s and 64 KiB suffice to let it read an error reply.
LINGER_SECONDS = 1.0
LINGER_BYTES = 65536


def _bounded(value: str | None, allowed: Sequence[str]) -> str:
    return value if value in allowed else "other" if "other" in allowed else allowed[-1]


def reason_category(verdict) -> str:
    """The bounded metrics category of a `policy.verdict.Verdict`.

    The categories follow the branches of `policy.decide.decide`; its reason texts are
    stable, operator-facing sentences, and tests/test_metrics.py runs real decisions through
    this function so a rewording there shows up as a test failure here.
    """
    if verdict.accepted:
        return "accepted"
    reason = verdict.reason
    if "blocked by policy" in reason:
        return "blocked"
    if reason.startswith("DNSSEC evidence failed"):
        detail = reason.split("(", 1)[-1]
        if "bogus" in detail:
            return "dnssec-bogus"
        return "dns-unvalidated" if "is unvalidated" in detail else "dns-timeout"
    if "no certificate presented" in reason or "presented no certificate" in reason:
        return "no-certificate"
    if "no fallback to PKIX" in reason:
        return "dane-mismatch"
    if reason.startswith("require=dane but"):
        return "no-tlsa"
    if reason.startswith("PKIX: leaf names none of"):
        return "name-mismatch"
    if reason.startswith("PKIX: chain does not verify") or reason.startswith("no PKIX trust store"):
        return "pkix-invalid"
    if reason.startswith("POSH:"):   # require = "posh" (with `posh = true` PKIX's reason comes first)
        return "posh-failed"
    return "other"


class Metrics:
    """All of the proxy's metrics in one registry; methods are cheap and never raise."""

    def __init__(self, *, process_metrics: bool = True) -> None:
        # `_created` series double the output and no dashboard uses them for these metrics.
        # (A process-wide switch in prometheus_client; this process has no other exporter.)
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        if process_metrics:
            # process_resident_memory_bytes, process_open_fds, ... — the standard names every
            # dashboard knows; memory per stream and fd exhaustion are what an operator watches.
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        r = self.registry
        self.connections = Counter(
            f"{PREFIX}_connections", "Connections handled, by direction and how they ended "
            "(ok, or the stream error condition sent).", ["direction", "outcome"], registry=r)
        # With workers (proxy/service_metrics.py): the sum over the workers alive now.
        self.connections_open = Gauge(
            f"{PREFIX}_connections_open", "Connections open now.", ["direction"], registry=r,
            multiprocess_mode="livesum")
        self.verdicts = Counter(
            f"{PREFIX}_verdicts", "Trust decisions, by prooftype and reason category.",
            ["direction", "verdict", "prooftype", "reason"], registry=r)
        self.dns_lookups = Counter(
            f"{PREFIX}_dns_lookups", "DNS lookups by record type, DNSSEC status and whether "
            "the cache answered.", ["rrtype", "status", "source"], registry=r)
        self.handshake_seconds = Histogram(
            f"{PREFIX}_handshake_seconds", "Time from accepting/opening a connection to the "
            "verdict on the peer.", ["direction"], buckets=HANDSHAKE_BUCKETS, registry=r)
        self.relayed_bytes = Counter(
            f"{PREFIX}_relayed_bytes", "Bytes relayed, by stream direction and the side that "
            "sent them.", ["direction", "source"], registry=r)
        # The labelled series counted on every stream (or every read), by (metric, labels):
        # prometheus_client's labels() validates and locks on each call (~1 % of a stream
        # set-up, bench/).  Bounded: every label value here is from a fixed set (_bounded).
        self._series: dict[tuple[object, tuple[str, ...]], Any] = {}
        self.reloads = Counter(
            f"{PREFIX}_config_reloads", "Configuration reloads (SIGHUP) by result.", ["result"], registry=r)
        self.reload_ok = Gauge(
            f"{PREFIX}_config_last_reload_successful", "1 if the last configuration load "
            "succeeded, 0 if the running state is older than the files.", registry=r)
        self.reload_time = Gauge(
            f"{PREFIX}_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load.", registry=r)
        self.cert_expiry = Gauge(
            f"{PREFIX}_certificate_expiry_timestamp_seconds", "notAfter of each local "
            "domain's certificate, as Unix time (alert well before it).", ["domain"], registry=r)
        self.reverifications = Counter(
            f"{PREFIX}_reverifications", "Accepted pairs judged again when their evidence "
            "expired or after a reload (DESIGN §3.4): kept, revoked (stream closed), or "
            "deferred (resolver outage within dns.reverify_grace).", ["direction", "result"], registry=r)
        self.dns_validating = Gauge(
            f"{PREFIX}_dns_resolver_validating", "1 while the resolver answers dns.probe with "
            "AD, 0 while it does not (insecure answers then count as unvalidated and reject).",
            ["resolver"], registry=r)
        self.own_tlsa_match = Gauge(
            f"{PREFIX}_own_tlsa_match", "1 if the chain served for the domain matches its published "
            "usable TLSA records (or none are published), 0 if peers doing DANE reject it.",
            ["domain"], registry=r)
        self.build_info = Gauge(f"{PREFIX}_build_info", "Version of the running proxy.",
                                ["version"], registry=r)
        self.build_info.labels(__version__).set(1)
        self._init_series()

    def _init_series(self) -> None:
        # Prometheus best practice: export every known series from the start at 0, so rate()
        # and alerts see the first event instead of a series that appears from nowhere.
        for d in DIRECTIONS:
            self.connections_open.labels(d)
            self.handshake_seconds.labels(d)
            for o in CONNECTION_OUTCOMES:
                self.connections.labels(d, o)
            for p in PROOFTYPES[:-1]:
                self.verdicts.labels(d, "accept", p, "accepted")
            for c in REASON_CATEGORIES[1:]:
                self.verdicts.labels(d, "reject", "-", c)
            for s in RELAY_SOURCES:
                self.relayed_bytes.labels(d, s)
        for t in DNS_RRTYPES[:-1]:
            for s in DNS_STATUSES:
                self.dns_lookups.labels(t, s, "resolver")
        for res in ("success", "failure"):
            self.reloads.labels(res)

    # --- recording ----------------------------------------------------------------------------

    def _child(self, metric: Any, *labels: str) -> Any:
        child = self._series.get((metric, labels))
        if child is None:
            child = self._series[(metric, labels)] = metric.labels(*labels)
        return child

    def connection_opened(self, direction: str) -> None:
        self._child(self.connections_open, _bounded(direction, DIRECTIONS)).inc()

    def connection_closed(self, direction: str, outcome: str) -> None:
        """Count a finished connection; pairs with `connection_opened`."""
        d = _bounded(direction, DIRECTIONS)
        self._child(self.connections_open, d).dec()
        if outcome not in CONNECTION_OUTCOMES:
            log.debug("unknown connection outcome %r counted as internal-error", outcome)
            outcome = "internal-error"
        self._child(self.connections, d, outcome).inc()

    def connection_totals(self) -> dict[str, int]:
        """Finished connections by outcome, both directions summed (for the exit log line)."""
        totals: dict[str, int] = {}
        for family in self.connections.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    outcome = sample.labels["outcome"]
                    totals[outcome] = totals.get(outcome, 0) + int(sample.value)
        return totals

    def verdict(self, direction: str, verdict) -> str:
        """Count a `Verdict`; returns the reason category used (handy for logs and tests)."""
        category = reason_category(verdict)
        prooftype = _bounded(verdict.prooftype or "-", PROOFTYPES) if verdict.accepted else "-"
        self._child(self.verdicts, _bounded(direction, DIRECTIONS),
                    verdict.verdict if verdict.verdict in VERDICTS else "reject", prooftype, category).inc()
        return category

    def dns_lookup(self, rrtype: str, status: str, *, cached: bool = False) -> None:
        self._child(self.dns_lookups, _bounded(str(rrtype).upper(), DNS_RRTYPES), _bounded(str(status), DNS_STATUSES),
                    "cache" if cached else "resolver").inc()

    def reverification(self, direction: str, result: str) -> None:
        self.reverifications.labels(_bounded(direction, DIRECTIONS),
                                    _bounded(result, ("kept", "revoked", "deferred"))).inc()

    def dns_probe(self, resolver: str, ok: bool) -> None:
        """The DNSSEC probe's latest result for one configured resolver (DESIGN §2.1 item 5)."""
        self.dns_validating.labels(resolver).set(1 if ok else 0)

    def handshake(self, direction: str, seconds: float) -> None:
        self._child(self.handshake_seconds, _bounded(direction, DIRECTIONS)).observe(seconds)

    def relayed(self, direction: str, source: str, nbytes: int) -> None:
        """Bytes relayed on a `direction` stream that `source` ("peer"/"backend") sent."""
        self._child(self.relayed_bytes, _bounded(direction, DIRECTIONS), _bounded(source, RELAY_SOURCES)).inc(nbytes)

    def reload_result(self, ok: bool, when: float | None = None) -> None:
        self.reloads.labels("success" if ok else "failure").inc()
        self.reload_ok.set(1 if ok else 0)
        if ok:
            self.reload_time.set(time.time() if when is None else when)

    def certificates(self, not_after: dict[str, float]) -> None:
        """Replace the per-domain certificate expiry series (domains may come and go on reload)."""
        self.cert_expiry.clear()
        for domain, ts in not_after.items():
            self.cert_expiry.labels(domain).set(ts)

    def own_tlsa(self, domain: str, matches: bool) -> None:
        """Result of the own-TLSA rollover guard for one local domain (proxy/own_tlsa.py)."""
        self.own_tlsa_match.labels(domain).set(1 if matches else 0)

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """(body, content type) for a scrape with this Accept header; 0.0.4 text by default."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


# --- the HTTP endpoint (h11 parses and frames; a thin trio server around it) ----------------

class HttpError(Exception):
    def __init__(self, status: int, reason: str, text: str) -> None:
        super().__init__(text)
        self.status, self.reason, self.text = status, reason, text


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]


def request_from_h11(event: h11.Request) -> Request:
    """Our view of an h11 request: method, path without the query, lower-case headers."""
    try:
        # h11 lets obs-text (bytes >= 0x80) through in header values; nothing a scraper
        # sends needs it, and refusing it keeps every header a plain ASCII string.
        headers = {name.decode("ascii"): value.decode("ascii") for name, value in event.headers}
        method, target = event.method.decode("ascii"), event.target.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "Bad Request", "request head is not ASCII") from None
    return Request(method, target.split("?", 1)[0], headers)


def respond(request: Request, metrics: Metrics) -> tuple[int, str, list[tuple[str, str]], bytes]:
    """(status, reason, headers, body) for a parsed request."""
    if request.method not in ("GET", "HEAD"):
        return 405, "Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Type", "text/plain")], \
            b"only GET is supported\n"
    if request.path != "/metrics":
        return 404, "Not Found", [("Content-Type", "text/plain")], b"not found; metrics are at /metrics\n"
    body, content_type = metrics.exposition(request.headers.get("accept", ""))
    return 200, "OK", [("Content-Type", content_type)], body


def _render(conn: h11.Connection | None, status: int, reason: str, headers: list[tuple[str, str]],
            body: bytes, *, head_only: bool = False) -> bytes:
    """The response bytes, framed by h11 on the request's connection `conn` (None: a reply to
    no request, e.g. 503 on overload).  A HEAD reply has Content-Length and no body."""
    conn = conn or h11.Connection(h11.SERVER)
    all_headers = [*headers, ("Content-Length", str(len(body))), ("Connection", "close")]
    out = conn.send(h11.Response(status_code=status, reason=reason.encode(), headers=all_headers)) or b""
    if body and not head_only:
        out += conn.send(h11.Data(data=body)) or b""
    return out + (conn.send(h11.EndOfMessage()) or b"")


async def _next_request(stream: trio.abc.Stream, conn: h11.Connection) -> h11.Request:
    """Read until h11 has a whole request head (bounded by MAX_REQUEST_BYTES)."""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 431:
                raise HttpError(431, "Request Header Fields Too Large",
                                f"request head over {MAX_REQUEST_BYTES} bytes") from None
            raise HttpError(400, "Bad Request", f"malformed request: {exc}") from None
        if isinstance(event, h11.Request):
            return event
        if isinstance(event, h11.ConnectionClosed):
            raise HttpError(400, "Bad Request", "connection closed before the request was complete")
        # h11.NEED_DATA (nothing else can come before a request on a fresh connection)
        conn.receive_data(await stream.receive_some(4096))


async def handle_http(stream: trio.abc.Stream, metrics: Metrics) -> None:
    """Serve one request on `stream`, then close it (no keep-alive: scrapes are seconds apart)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    try:
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                event = await _next_request(stream, conn)
            request = request_from_h11(event)
            out = _render(conn, *respond(request, metrics), head_only=request.method == "HEAD")
        except HttpError as exc:
            out = _render(_fresh_if_spent(conn), exc.status, exc.reason, [("Content-Type", "text/plain")],
                          exc.text.encode() + b"\n")
        except trio.TooSlowError:
            out = _render(_fresh_if_spent(conn), 408, "Request Timeout", [("Content-Type", "text/plain")],
                          b"request not received in time\n")
        with trio.move_on_after(REQUEST_TIMEOUT):
            await stream.send_all(out)
            await _lingering_close(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.debug("metrics client went away: %s", exc)
    finally:
        await trio.aclose_forcefully(stream)


def _fresh_if_spent(conn: h11.Connection) -> h11.Connection | None:
    # An error reply goes on the request's connection while h11 still lets us answer there
    # (it does after a client protocol error); otherwise it is rendered on its own.
    return conn if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) else None


async def _lingering_close(stream: trio.abc.Stream) -> None:
    # Closing a TCP socket with unread input makes the kernel send RST, and the client may
    # then lose the response it has not read yet (RFC 9112 §9.6 "tear-down"): after an error
    # reply to an oversized request that is exactly what happens.  So half-close, then read
    # and discard a bounded amount for a short while, as Apache and nginx do.
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()
    with trio.move_on_after(LINGER_SECONDS):
        drained = 0
        while drained < LINGER_BYTES:
            chunk = await stream.receive_some(16384)
            if not chunk:
                break
            drained += len(chunk)


def _address(listener: trio.SocketListener) -> str:
    name = listener.socket.getsockname()
    if not isinstance(name, tuple):
        return str(name)
    return f"[{name[0]}]:{name[1]}" if ":" in name[0] else f"{name[0]}:{name[1]}"


async def open_metrics_listeners(listen: str) -> list[trio.SocketListener]:
    """Listeners for `metrics.listen` ("host:port", "[v6]:port"); [] when it is "" (disabled)."""
    if not listen:
        return []
    host, port = parse_hostport(listen)
    return await tcp_listeners(listen, port, host)


async def serve_metrics(metrics: Metrics, listeners: Sequence[trio.SocketListener], *,
                        task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `GET /metrics` on `listeners` until cancelled.

    Get listeners from `open_metrics_listeners(cfg.metrics.listen)`, or wrap socket-activated
    ones (`trio.SocketListener(sock)` for each socket of role `metrics`).
    """
    limiter = trio.CapacityLimiter(MAX_CONCURRENT_SCRAPES)

    async def one(stream: trio.abc.Stream) -> None:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            # Overloaded (or someone is holding connections open): refuse cheaply.
            try:
                with trio.move_on_after(1):
                    await stream.send_all(_render(None, 503, "Service Unavailable", [("Retry-After", "1")], b""))
                    await _lingering_close(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            await trio.aclose_forcefully(stream)
            return
        try:
            await handle_http(stream, metrics)
        finally:
            limiter.release()

    async with trio.open_nursery() as nursery:
        for lst in listeners:
            log.info("metrics on http://%s/metrics", _address(lst))
        task_status.started()
        await trio.serve_listeners(one, list(listeners), handler_nursery=nursery)
