"""Fetching POSH documents (RFC 7711) for peer domains, and deciding with them.

`PoshFetcher.fetch(D, trust=...)` runs the POSH process of RFC 7711 §3 for the XMPP
server-to-server service (RFC 7712 §5.2) and returns a `policy.posh.PoshResult`:

1. `GET https://D/.well-known/posh/xmpp-server.json` over HTTPS.  The web server's certificate
   is verified with PKIX for D against the same trust store the policy uses (`policy.ca_file`
   or the system store) — that check is what POSH's security rests on.  D's addresses come
   from our validating resolver (`policy.dns.Resolver`), never from the OS resolver.
2. 200 with a fingerprints document: done.  200 with a `url` reference (§3.2): fetch that
   https URL the same way, exactly once; a reference to a reference is refused.  404/410: D
   publishes no POSH.  Anything else — HTTP 3xx included, which is not followed because POSH
   delegates only through the document's `url` — is a failure.
3. The result is cached per domain for the lower of the documents' `expires` (§6), at most a
   day; `expires` 0 (or none) means it serves the verification it was fetched for and is not
   kept.  Failures are remembered for a few seconds; timeouts not at all.

A failed or timed-out fetch is a result with that status, never an exception and never an
accept.  `decide_with_posh` wraps `policy.decide.decide` so that a fetch happens only when the
verdict can depend on it.

The HTTPS GET is `proxy.https_get` (h11 over the stdlib `ssl` module through `trio.SSLStream`
— enough here, since only the web server's PKIX validity matters, not its chain as presented).
"""
from __future__ import annotations

import collections
import logging
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import trio
from cryptography import x509

from policy.decide import decide, posh_consulted
from policy.dns import Resolver
from policy.evidence import Evidence
from policy.pkix import TrustStore
from policy.pkix_names import normalise_domain
from policy.policyfile import Policy
from policy.posh import (
    WELL_KNOWN_PATH, PoshDocument, PoshError, PoshReference, PoshResult, PoshStatus, cache_seconds,
    is_hostname, parse_document, posh_url,
)
from policy.verdict import Verdict
from proxy.https_get import HTTPS_PORT, HttpsGetError, https_get
from proxy.logsetup import log_event

__all__ = [
    "DEFAULT_TIMEOUT", "FAILURE_CACHE_SECONDS", "MAX_BODY_BYTES", "PoshFetcher", "decide_with_posh",
    "shared_fetcher",
]

log = logging.getLogger("xmpp_dane_proxy.posh")

# The whole POSH process (DNS, TCP, TLS, request, and the one `url` hop) gets this long: a
# peer's stream waits for it.  The same budget as the resolver's default dns.timeout, and far
# inside limits.handshake_timeout (30 s).
DEFAULT_TIMEOUT = 5.0
# A POSH document is a few hundred bytes (a handful of base64 digests); 64 KiB is generous for
# any real one and bounds what a hostile web server can make us hold.
MAX_BODY_BYTES = 65536
# A failure (404, refused, bad document) is remembered briefly so that a burst of streams from
# one domain is not a burst of HTTPS requests; short, like the resolver's SERVFAIL cache (5 s),
# so a repaired web server is seen almost at once.  Timeouts are never remembered.
FAILURE_CACHE_SECONDS = 5.0
# Bounded so a stream of distinct peer domains cannot grow memory without limit (as the DNS cache).
MAX_CACHE_ENTRIES = 10000


class _Failure(Exception):
    """One step of the process failed; becomes a PoshResult with this status and reason."""

    def __init__(self, status: PoshStatus, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class _Flight:
    done: trio.Event
    result: PoshResult | None = None


class PoshFetcher:
    """Fetches and caches POSH results (see the module docstring).

    `resolver` gives the web servers' addresses.  `overrides` maps a host name to the
    `(ip, port)` to connect to instead of asking DNS (tests; the URL, SNI and certificate
    check stay those of the host).  `https_port` is the port connected to for URLs without
    one (443; tests move it).  `timeout` bounds one whole fetch.  `clock` is monotonic seconds,
    injectable for cache tests.
    """

    def __init__(self, resolver: Resolver | None, *, timeout: float = DEFAULT_TIMEOUT,
                 overrides: Mapping[str, tuple[str, int]] | None = None, https_port: int = HTTPS_PORT,
                 clock: Callable[[], float] = time.monotonic, max_cache_entries: int = MAX_CACHE_ENTRIES,
                 happy_eyeballs_delay: float = 0.25) -> None:
        if timeout <= 0:
            raise ValueError("POSH timeout must be positive")
        self._resolver: Callable[[], Resolver | None] = (lambda: resolver)
        self.timeout = float(timeout)
        self.overrides = {normalise_domain(k): v for k, v in (overrides or {}).items()}
        self.https_port = https_port
        self._clock = clock
        self._max_entries = max_cache_entries
        self._happy_eyeballs_delay = happy_eyeballs_delay
        self._cache: collections.OrderedDict[tuple[str, str], tuple[float, PoshResult]] = collections.OrderedDict()
        self._inflight: dict[tuple[str, str], _Flight] = {}
        # Fetches that went to the network, by final status (tests and diagnostics).
        self.stats: collections.Counter[str] = collections.Counter()

    @property
    def resolver(self) -> Resolver | None:
        return self._resolver()

    def clear_cache(self) -> None:
        """Forget every cached result."""
        self._cache.clear()

    def cached(self, domain: str, trust: TrustStore | None) -> PoshResult | None:
        """The cached, still fresh result for `domain`, if any."""
        if trust is None:
            return None
        key = (normalise_domain(domain), trust.source)
        entry = self._cache.get(key)
        if entry is None:
            return None
        expires, result = entry
        if expires <= self._clock():
            # RFC 7711 §6: a stale result is never used; the whole process runs again.
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return result

    async def fetch(self, domain: str, *, trust: TrustStore | None) -> PoshResult:
        """The POSH result for peer domain `domain`; never raises for network or document
        problems (those are statuses).  `trust` verifies the HTTPS servers (PKIX)."""
        d = normalise_domain(domain)
        if not is_hostname(d):
            return PoshResult(d, PoshStatus.FAILED, reason=f"{domain!r} is not a host name an https URL can carry")
        if trust is None:
            return PoshResult(d, PoshStatus.FAILED, url=posh_url(d),
                              reason="no PKIX trust store configured to verify the HTTPS server")
        key = (d, trust.source)
        while True:
            cached = self.cached(d, trust)
            if cached is not None:
                return replace(cached, from_cache=True)
            flight = self._inflight.get(key)
            if flight is None:
                break
            # Another stream is fetching this very document: share its result.
            await flight.done.wait()
            if flight.result is not None:
                return flight.result
        flight = _Flight(trio.Event())
        self._inflight[key] = flight
        try:
            result = await self._fetch(d, trust)
            self.stats[result.status.value] += 1
            self._store(key, result)
            flight.result = result
            log_event(log, logging.INFO, "posh", domain=d, status=result.status.value,
                      url=result.source(), reason=result.describe())
            return result
        finally:
            del self._inflight[key]
            flight.done.set()

    def _store(self, key: tuple[str, str], result: PoshResult) -> None:
        if result.status is PoshStatus.TIMEOUT:
            return  # says nothing about the document; ask again next time
        lifetime = result.cache_seconds if result.ok else FAILURE_CACHE_SECONDS
        if lifetime <= 0:
            return
        self._cache[key] = (self._clock() + lifetime, result)
        self._cache.move_to_end(key)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)

    # -- the process -----------------------------------------------------------------------

    async def _fetch(self, domain: str, trust: TrustStore) -> PoshResult:
        first = posh_url(domain)
        stage = [f"fetching {first}"]
        with trio.move_on_after(self.timeout):
            try:
                return await self._process(domain, first, trust, stage)
            except _Failure as failure:
                return PoshResult(domain, failure.status, url=first, reason=failure.reason)
            except Exception as exc:   # a bug must fail closed, not end the stream's task
                log.exception("POSH fetch for %s failed unexpectedly", domain)
                return PoshResult(domain, PoshStatus.FAILED, url=first,
                                  reason=f"internal error while {stage[0]}: {type(exc).__name__}: {exc}")
        return PoshResult(domain, PoshStatus.TIMEOUT, url=first,
                          reason=f"no POSH document within {self.timeout:g} s ({stage[0]})")

    async def _process(self, domain: str, first: str, trust: TrustStore, stage: list[str]) -> PoshResult:
        # RFC 7711 §3 / RFC 7712 §5.2: the source domain's well-known URI for xmpp-server.
        status, body, location = await self._get(domain, HTTPS_PORT, WELL_KNOWN_PATH, first, trust, stage)
        if status in (404, 410):
            return PoshResult(domain, PoshStatus.ABSENT, url=first,
                              reason=f"no POSH document at {first} (HTTP {status})")
        doc = self._document(first, status, body, location)
        if doc.reference is None:
            return self._result(domain, first, None, doc, cache_seconds(doc.expires))
        ref: PoshReference = doc.reference
        # RFC 7711 §3.2: the reference is followed to where the fingerprints are, over HTTPS
        # verified for *that* host.  One hop: the referenced document must hold fingerprints.
        stage[0] = f"fetching {ref.url} (referenced by {first})"
        status, body, location = await self._get(ref.host, ref.port, ref.target, ref.url, trust, stage)
        if status in (404, 410):
            raise _Failure(PoshStatus.FAILED, f"{first} refers to {ref.url}, which is missing (HTTP {status})")
        target = self._document(ref.url, status, body, location)
        if target.reference is not None:
            raise _Failure(PoshStatus.FAILED, f"{first} refers to {ref.url}, which refers on to "
                           f"{target.reference.url}: only one reference is followed (RFC 7711 §3.2)")
        # RFC 7711 §6: with a reference, the lower of the two `expires` values applies.
        return self._result(domain, ref.url, first, target, cache_seconds(doc.expires, target.expires))

    @staticmethod
    def _document(url: str, status: int, body: bytes, location: str | None) -> PoshDocument:
        if 300 <= status < 400:
            where = f" to {location}" if location else ""
            raise _Failure(PoshStatus.FAILED, f"{url} answered HTTP {status} (redirect{where}); not followed: "
                           "POSH delegates only through the document's 'url' (RFC 7711 §3.2)")
        if status != 200:
            raise _Failure(PoshStatus.FAILED, f"{url} answered HTTP {status}")
        try:
            return parse_document(body)
        except PoshError as exc:
            raise _Failure(PoshStatus.FAILED, f"malformed POSH document at {url}: {exc}") from None

    @staticmethod
    def _result(domain: str, url: str, via: str | None, doc: PoshDocument, keep: float) -> PoshResult:
        return PoshResult(domain, PoshStatus.OK, descriptors=doc.descriptors, url=url, via=via,
                          reason=f"{len(doc.descriptors)} fingerprint descriptor(s)", cache_seconds=keep,
                          notes=doc.notes)

    # -- one HTTPS GET ---------------------------------------------------------------------

    async def _get(self, host: str, port: int, target: str, url: str, trust: TrustStore,
                   stage: list[str]) -> tuple[int, bytes, str | None]:
        """GET `target` from `host` over PKIX-verified HTTPS: (status, body, Location)."""
        try:
            response = await https_get(
                host, port, target, trust=trust, resolver=self.resolver, max_body=MAX_BODY_BYTES,
                overrides=self.overrides, happy_eyeballs_delay=self._happy_eyeballs_delay,
                headers=[("Accept", "application/json")], stage=stage,
                connect_port=self.https_port if port == HTTPS_PORT else port)
        except HttpsGetError as exc:
            raise _Failure(PoshStatus.FAILED, str(exc)) from None
        return response.status, response.body, response.location


# ---------------------------------------------------------------------------------------------
# One fetcher per resolver, shared by the inbound and outbound paths


_SHARED: "weakref.WeakKeyDictionary[Resolver, PoshFetcher]" = weakref.WeakKeyDictionary()


def shared_fetcher(resolver: Resolver) -> PoshFetcher:
    """The fetcher that goes with `resolver`: made once, so its cache is shared by every path
    that uses that resolver (inbound, outbound, reloads).  It holds the resolver weakly, so
    the pair goes away with the resolver."""
    fetcher = _SHARED.get(resolver)
    if fetcher is None:
        fetcher = PoshFetcher(None)
        ref = weakref.ref(resolver)
        fetcher._resolver = ref   # type: ignore[assignment]
        _SHARED[resolver] = fetcher
    return fetcher


# ---------------------------------------------------------------------------------------------
# Deciding


async def decide_with_posh(
    chain: Sequence[x509.Certificate],
    evidence: Evidence,
    policy: Policy,
    *,
    trust: TrustStore | None,
    fetcher: PoshFetcher | None,
    now=None,
) -> tuple[Verdict, PoshResult | None]:
    """`policy.decide.decide`, with D's POSH result fetched only when the verdict can depend
    on it: for `require = "posh"`, and for `posh = true` when PKIX alone did not accept (PKIX
    needs no network, so it goes first).  Returns the verdict and the POSH result used (None
    when no fetch was made)."""
    if fetcher is None or not posh_consulted(chain, evidence, policy):
        return decide(chain, evidence, policy, trust=trust, now=now), None
    if policy.require != "posh":
        first = decide(chain, evidence, policy, trust=trust, now=now)
        if first.accepted:
            return first, None
    posh = await fetcher.fetch(evidence.domain, trust=trust)
    return decide(chain, evidence, policy, trust=trust, now=now, posh=posh), posh
