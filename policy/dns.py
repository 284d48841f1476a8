"""DNS lookups that carry a DNSSEC status on every answer (DESIGN §2.1).

The proxy does not validate DNSSEC itself: it asks a validating resolver (unbound, normally on
loopback) with the DO bit set and reads the AD bit of the answer.  Every lookup therefore ends in
exactly one `DnsStatus`:

* ``secure``   — the AD bit is set *and* the resolver is trusted to set it (RFC 6698 §4.1 /
                 RFC 4035 §4.9.3: a stub may rely on AD only over a secure path; we take
                 loopback, or an operator listing the address in ``dns.trust_ad_from``, as that).
* ``insecure`` — answered, but not provably signed (or the resolver is not trusted).
* ``bogus``    — SERVFAIL or another error answer from the validating resolver.
* ``timeout``  — no answer within the per-lookup budget.
* ``unvalidated`` — would be ``insecure``, but the resolver failed its DNSSEC probe
                 (``dns.probe``, DESIGN §2.1 item 5): it may not validate at all, so an
                 unsigned answer cannot be told from an unchecked one.  Rejects like a timeout.

NXDOMAIN and NODATA are answers too, with a status: a *secure* NXDOMAIN is proof of absence.

Lookups run on trio (`policy.dns_wire` does the exchange and reads a TLSA RRset record by
record).  Answers are cached by TTL (negative
answers by the SOA rule of RFC 2308 §5); timeouts are never cached.
"""
from __future__ import annotations

import collections
import ipaddress
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import idna
import trio

from policy.dns_wire import exchange_tcp, exchange_udp
from policy.evidence import DnsStatus

__all__ = [
    "Answer",
    "Nameserver",
    "ProbeResult",
    "Resolver",
    "ad_trusted",
    "parse_nameserver",
    "to_dns_name",
    "name_text",
    "weakest",
]

DEFAULT_DNS_PORT = 53
# DNS Flag Day 2020 value: large enough for TLSA/DNSKEY answers of normal size, small enough to
# avoid IP fragmentation; anything larger comes back truncated and is retried over TCP.
EDNS_PAYLOAD = 1232
# RFC 1034 §3.6.2 lets CNAMEs chain; real chains are short.  Eight hops is what many stub
# resolvers allow (glibc follows a similar bound) and stops loops quickly.
MAX_CNAME_HOPS = 8
# A SERVFAIL is remembered briefly so a flood of connections from one broken domain does not
# become a flood of queries; unbound itself keeps bogus data 60 s (val-bogus-ttl), so 5 s here
# adds little delay once the zone is repaired.
BOGUS_CACHE_SECONDS = 5.0
# unbound's default cache-max-ttl: no answer is trusted for longer than a day.
MAX_CACHE_TTL = 86400
# Bounded so a stream of distinct peer domains cannot grow memory without limit.
MAX_CACHE_ENTRIES = 10000
# Each attempt at one server gets at most a third of the lookup's budget, so one lost UDP
# datagram costs a third of the timeout and two retries still fit (like glibc's attempts:2).
ATTEMPT_SHARE = 1 / 3
MIN_ATTEMPT_SECONDS = 0.5
# DESIGN §2.1 item 5: the DNSSEC probe is asked again this often (and at start and reload).
# A minute bounds how long a resolver that stopped validating goes unnoticed (answers it gave
# before are still the resolver's; those cached as secure stay secure), and costs one query
# a minute.  Postfix's dnssec_probe is asked about as rarely.
PROBE_INTERVAL = 60.0
PROBE_RDTYPE = dns.rdatatype.SOA

_STATUS_RANK = {
    DnsStatus.SECURE: 0,
    DnsStatus.INSECURE: 1,
    DnsStatus.UNVALIDATED: 2,
    DnsStatus.TIMEOUT: 3,
    DnsStatus.BOGUS: 4,
}


def weakest(*statuses: DnsStatus | None) -> DnsStatus | None:
    """The weakest of several statuses: a chain of evidence is only as good as its worst link.

    Order: secure < insecure < unvalidated < timeout < bogus.  ``None`` entries (nothing looked up) are skipped.
    """
    present = [s for s in statuses if s is not None]
    if not present:
        return None
    return max(present, key=_STATUS_RANK.__getitem__)


# ---------------------------------------------------------------------------------------------
# Names


def to_dns_name(name: str | dns.name.Name) -> dns.name.Name:
    """Normalise a domain name: absolute, IDNA A-labels, lower case (DESIGN §2.1).

    XMPP domains are IDNA2008 (RFC 7622 §3.2), so U-labels are converted with the `idna`
    package's IDNA2008 codec after UTS #46 mapping (as browsers and libidn2 do).  Raises ValueError for a name that is
    not a valid domain name, with the offending text in the message.
    """
    if isinstance(name, dns.name.Name):
        parsed = name if name.is_absolute() else name.concatenate(dns.name.root)
    else:
        text = name.strip()
        if not text:
            raise ValueError("empty domain name")
        try:
            parsed = dns.name.from_text(_to_ascii(text))
        except (dns.exception.DNSException, UnicodeError, ValueError, idna.IDNAError) as exc:
            raise ValueError(f"not a valid domain name: {name!r} ({exc})") from None
    return parsed.canonicalize()


def _to_ascii(text: str) -> str:
    """U-labels to A-labels, label by label, so ASCII labels that IDNA would refuse (the
    underscore labels of SRV and TLSA names) pass unchanged."""
    if text.isascii():
        return text
    labels = text.split(".")
    return ".".join(
        label if label.isascii() else idna.encode(label, uts46=True, transitional=False).decode("ascii")
        for label in labels
    )


def name_text(name: dns.name.Name) -> str:
    """Presentation form used in evidence keys and logs: lower case, no trailing dot."""
    if name == dns.name.root:
        return "."
    return name.canonicalize().to_text(omit_final_dot=True)


# ---------------------------------------------------------------------------------------------
# Nameservers and the AD trust decision


@dataclass(frozen=True)
class Nameserver:
    """A resolver address: IP literal and port."""

    host: str
    port: int = DEFAULT_DNS_PORT

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_nameserver(text: str) -> Nameserver:
    """Parse "IP", "IP:PORT", "[IPv6]" or "[IPv6]:PORT" (DESIGN §4 `dns.nameservers`).

    Only IP literals: resolving the resolver's own name would need a resolver.
    """
    raw = text.strip()
    host, port_text = raw, ""
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0:
            raise ValueError(f"nameserver {text!r}: missing ']'")
        host, rest = raw[1:end], raw[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"nameserver {text!r}: expected ':PORT' after ']'")
            port_text = rest[1:]
    elif raw.count(":") == 1:
        host, port_text = raw.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"nameserver {text!r}: {host!r} is not an IP address") from None
    port = DEFAULT_DNS_PORT
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"nameserver {text!r}: port must be 1-65535")
        port = int(port_text)
    return Nameserver(str(address), port)


def ad_trusted(address: str, trust_ad_from: Iterable[str] = ()) -> bool:
    """Whether the AD bit from the resolver at `address` may be believed (DESIGN §2.1).

    RFC 4035 §4.9.3 / RFC 6698 §4.1: a stub resolver can rely on AD only when the path to the
    validating resolver is secure.  Loopback is (the resolver runs on this host); any other
    address only when the operator says so by listing it in `trust_ad_from` ("IP" or "IP:PORT";
    compared by IP).
    """
    ip = ipaddress.ip_address(address.strip("[]"))
    if ip.is_loopback:
        return True
    for entry in trust_ad_from:
        if ipaddress.ip_address(parse_nameserver(entry).host) == ip:
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Answers


@dataclass(frozen=True)
class Answer:
    """One lookup result.

    `rrset` holds the rdata of the final name of the CNAME chain (empty when none exist or the
    lookup failed); `cname_chain` the names the chain went through after `name`.  `status` is
    the weakest status of every response that contributed (RFC 7671 §7: a record reached
    through CNAMEs is secure only if every hop is).  `reason` says why a lookup failed.
    """

    name: str
    rdtype: str
    status: DnsStatus
    rrset: tuple[dns.rdata.Rdata, ...] = ()
    ttl: int = 0
    nxdomain: bool = False
    nodata: bool = False
    cname_chain: tuple[str, ...] = ()
    reason: str = ""
    server: str = ""

    @property
    def key(self) -> str:
        """Evidence key, e.g. "TLSA _5269._tcp.example.org"."""
        return f"{self.rdtype} {self.name}"

    @property
    def failed(self) -> bool:
        """Bogus or timeout: no data, and no proof of absence either."""
        return self.status.failed

    @property
    def canonical_name(self) -> str:
        """The name the records actually belong to (the end of the CNAME chain)."""
        return self.cname_chain[-1] if self.cname_chain else self.name

    def describe(self) -> str:
        """One line for logs and the CLI."""
        if self.failed:
            what = self.reason or self.status.value
        elif self.nxdomain:
            what = "NXDOMAIN"
        elif self.nodata:
            what = "NODATA"
        else:
            what = ", ".join(r.to_text() for r in self.rrset)
        via = f" (via {' -> '.join(self.cname_chain)})" if self.cname_chain else ""
        return f"{self.key}{via}: {self.status.value}: {what}"


@dataclass(frozen=True)
class ProbeResult:
    """One answer to the DNSSEC probe (DESIGN §2.1 item 5) from one resolver."""

    server: str
    probe: str
    ok: bool
    detail: str

    def describe(self) -> str:
        """E.g. "resolver 127.0.0.1:53 does not validate DNSSEC: probe '.' answered without
        the AD bit"."""
        if self.ok:
            return f"resolver {self.server} validates DNSSEC (probe {self.probe!r} came back with AD)"
        return f"resolver {self.server} does not validate DNSSEC: probe {self.probe!r} {self.detail}"


@dataclass
class _Flight:
    done: trio.Event
    answer: Answer | None = None


class _Failure(Exception):
    def __init__(self, status: DnsStatus, reason: str, server: str = "") -> None:
        super().__init__(reason)
        self.status, self.reason, self.server = status, reason, server


# ---------------------------------------------------------------------------------------------
# The resolver


class Resolver:
    """Asks validating resolvers, classifies every answer, caches by TTL.

    `nameservers` as in DESIGN §4 ("IP", "IP:PORT", "[v6]:PORT"); tried in order, a server that
    timed out is asked again while the budget lasts.  `timeout` is the budget of one lookup
    (seconds, all retries and CNAME hops included).  `trust_ad` overrides the trust decision of
    `ad_trusted` — ``False`` makes even a loopback resolver's AD bit count for nothing (tests
    and diagnostics); ``None`` (default) decides by address.  `clock` is a monotonic clock in
    seconds, injectable for cache tests.
    """

    def __init__(
        self,
        nameservers: Sequence[str] = ("127.0.0.1",),
        trust_ad_from: Sequence[str] = (),
        timeout: float = 5.0,
        *,
        trust_ad: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_cache_entries: int = MAX_CACHE_ENTRIES,
        on_lookup: Callable[[str, str, bool], None] | None = None,
        probe: str | None = None,
        probe_interval: float = PROBE_INTERVAL,
        on_probe: Callable[["ProbeResult"], None] | None = None,
    ) -> None:
        if not nameservers:
            raise ValueError("dns.nameservers: at least one nameserver is needed")
        if timeout <= 0:
            raise ValueError("dns.timeout must be positive")
        self.nameservers = tuple(parse_nameserver(n) for n in nameservers)
        for entry in trust_ad_from:
            parse_nameserver(entry)  # reject bad config early, with the entry in the message
        self.trust_ad_from = tuple(trust_ad_from)
        self.timeout = float(timeout)
        self._trusted = {
            ns: (trust_ad if trust_ad is not None else ad_trusted(ns.host, self.trust_ad_from))
            for ns in self.nameservers
        }
        self._clock = clock
        self._max_entries = max_cache_entries
        self._cache: collections.OrderedDict[tuple[dns.name.Name, int], tuple[float, Answer]] = (
            collections.OrderedDict()
        )
        self._inflight: dict[tuple[dns.name.Name, int], _Flight] = {}
        # Lookups that went to the network, by final status (for metrics, DESIGN §6).
        self.stats: collections.Counter[str] = collections.Counter()
        # Told (rdtype, status, from_cache) of every lookup: the metrics hook.  A callback
        # rather than an import keeps `policy` free of `proxy`.
        self._on_lookup = on_lookup
        # DESIGN §2.1 item 5: `probe` is a name that must validate; None = no probe (every
        # resolver trusted as in the rules above — library use and tests).
        self.probe_name = name_text(to_dns_name(probe)) if probe is not None else None
        self.probe_interval = float(probe_interval)
        self._on_probe = on_probe
        self._probes: dict[Nameserver, ProbeResult] = {}
        self._probed_at: float | None = None
        self._probe_lock = trio.Lock()
        # Changes whenever a probe verdict changes (and with the first one): whatever was
        # read from answers under one set of probe verdicts (policy.evidence_cache) is read
        # again under the next.
        self.validation_epoch = 0

    def trusted(self, nameserver: Nameserver) -> bool:
        """Whether this resolver's AD bit is believed."""
        return self._trusted[nameserver]

    # -- DNSSEC probe (DESIGN §2.1 item 5) ----------------------------------------------------

    def probe_results(self) -> tuple["ProbeResult", ...]:
        """The last probe result of every nameserver (empty before the first probe)."""
        return tuple(self._probes[ns] for ns in self.nameservers if ns in self._probes)

    def validation_problem(self) -> str:
        """Why answers that would be insecure count as unvalidated now ("" when they do not):
        names each resolver that failed the probe, and the probe."""
        if self.probe_name is None:
            return ""
        failing = [r for r in (self._probes.get(ns) for ns in self.nameservers) if r is None or not r.ok]
        if not failing:
            return ""
        if not self._probes:
            return f"the DNSSEC probe {self.probe_name!r} has not been answered yet"
        return "; ".join(r.describe() for r in failing)

    def _validating(self, server: str) -> bool:
        if self.probe_name is None:
            return True
        for ns, result in self._probes.items():
            if str(ns) == server:
                return result.ok
        return False  # never probed successfully: fail closed

    async def probe(self) -> tuple["ProbeResult", ...]:
        """Ask every nameserver for `dns.probe` with DO now (at start, on reload, and every
        `probe_interval`); returns the results.  Without a probe name, does nothing."""
        if self.probe_name is None:
            return ()
        async with self._probe_lock:
            results: dict[Nameserver, ProbeResult] = {}

            async def one(ns: Nameserver) -> None:
                results[ns] = await self._probe_one(ns)

            async with trio.open_nursery() as nursery:
                for ns in self.nameservers:
                    nursery.start_soon(one, ns)
            for ns in self.nameservers:
                before = self._probes.get(ns)
                self._probes[ns] = results[ns]
                if before is None or before.ok != results[ns].ok:
                    self.validation_epoch += 1
                    if self._on_probe is not None:
                        self._on_probe(results[ns])
            self._probed_at = self._clock()
        return self.probe_results()

    def probe_due(self) -> bool:
        """Whether the next lookup runs the DNSSEC probe first (it is over `probe_interval`
        old, or was never made)."""
        if self.probe_name is None:
            return False
        return self._probed_at is None or self._clock() - self._probed_at >= self.probe_interval

    async def _probe_if_due(self) -> None:
        if not self.probe_due():
            return
        if self._probe_lock.locked():
            async with self._probe_lock:  # someone is probing: wait for their result
                return
        await self.probe()

    async def _probe_one(self, ns: Nameserver) -> "ProbeResult":
        assert self.probe_name is not None
        query = dns.message.make_query(
            to_dns_name(self.probe_name), PROBE_RDTYPE, use_edns=0, want_dnssec=True,
            payload=EDNS_PAYLOAD, flags=dns.flags.RD | dns.flags.AD,
        )
        with trio.move_on_after(self.timeout):
            try:
                response = await self._exchange(query, ns)
            except OSError as exc:
                return ProbeResult(str(ns), self.probe_name, False, f"got no answer ({exc})")
            except dns.exception.DNSException as exc:
                return ProbeResult(str(ns), self.probe_name, False, f"got a bad response ({exc})")
            rcode = response.rcode()
            if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                return ProbeResult(str(ns), self.probe_name, False,
                                   f"answered {dns.rcode.to_text(rcode)}{_ede_text(response)}")
            if not response.flags & dns.flags.AD:
                return ProbeResult(str(ns), self.probe_name, False, "answered without the AD bit")
            if not self._trusted[ns]:
                return ProbeResult(str(ns), self.probe_name, False,
                                   "came back with AD from a resolver whose AD bit is not trusted (not loopback, not in dns.trust_ad_from)")
            return ProbeResult(str(ns), self.probe_name, True, "validated (AD)")
        return ProbeResult(str(ns), self.probe_name, False, f"got no answer within {self.timeout:g}s")

    def _judge(self, answer: Answer) -> Answer:
        """An insecure answer from a resolver that failed the probe is unvalidated."""
        if answer.status is DnsStatus.INSECURE and not self._validating(answer.server):
            return replace(answer, status=DnsStatus.UNVALIDATED,
                           reason=self.validation_problem() or "resolver failed the DNSSEC probe")
        return answer

    def _report(self, answer: Answer, cached: bool) -> None:
        if self._on_lookup is not None:
            self._on_lookup(answer.rdtype, answer.status.value, cached)

    def clear_cache(self) -> None:
        """Forget every cached answer."""
        self._cache.clear()

    async def lookup(self, name: str | dns.name.Name, rdtype: str | int) -> Answer:
        """Look up `name`/`rdtype` and return the classified answer (never raises for DNS
        failures: those are statuses).  Raises ValueError for a malformed name or type."""
        qname = to_dns_name(name)
        try:
            qtype = dns.rdatatype.RdataType.make(rdtype)
        except dns.exception.DNSException:
            raise ValueError(f"unknown DNS record type {rdtype!r}") from None
        key = (qname, int(qtype))
        if self.probe_due():
            result: list[tuple[Answer, bool]] = []
            # The probe runs beside the lookup, so a dead resolver costs one timeout, not two.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._probe_if_due)
                result.append(await self._lookup(key, qname, qtype))
            raw, cached = result[0]
        else:
            raw, cached = await self._lookup(key, qname, qtype)
        answer = self._judge(raw)
        self._report(answer, cached)
        return answer

    async def _lookup(
        self, key: tuple[dns.name.Name, int], qname: dns.name.Name, qtype: dns.rdatatype.RdataType
    ) -> tuple[Answer, bool]:
        """The answer (as stored: before the probe's judgement) and whether it was cached."""
        while True:
            cached = self._cached(key)
            if cached is not None:
                return cached, True
            flight = self._inflight.get(key)
            if flight is None:
                break
            # Someone is already asking: share their answer instead of a second query.
            await flight.done.wait()
            if flight.answer is not None:
                return flight.answer, True
        flight = _Flight(trio.Event())
        self._inflight[key] = flight
        try:
            answer = await self._resolve(qname, qtype)
            self.stats[answer.status.value] += 1
            self._store(key, answer)
            flight.answer = answer
            return answer, False
        finally:
            del self._inflight[key]
            flight.done.set()

    # -- cache -----------------------------------------------------------------------------

    def _cached(self, key: tuple[dns.name.Name, int]) -> Answer | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        expires, answer = entry
        remaining = expires - self._clock()
        if remaining <= 0:
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return replace(answer, ttl=max(0, int(remaining)))

    def _store(self, key: tuple[dns.name.Name, int], answer: Answer) -> None:
        if answer.status is DnsStatus.TIMEOUT:
            return  # a timeout says nothing about the data; ask again next time
        if answer.status is DnsStatus.BOGUS:
            lifetime = BOGUS_CACHE_SECONDS
        else:
            lifetime = min(answer.ttl, MAX_CACHE_TTL)
        if lifetime <= 0:
            return
        self._cache[key] = (self._clock() + lifetime, answer)
        self._cache.move_to_end(key)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)

    # -- resolution ------------------------------------------------------------------------

    async def _resolve(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType) -> Answer:
        name, type_text = name_text(qname), dns.rdatatype.to_text(qtype)
        deadline = trio.current_time() + self.timeout
        chain: list[dns.name.Name] = []
        statuses: list[DnsStatus] = []
        ttl = MAX_CACHE_TTL
        current = qname
        server = ""
        for _hop in range(MAX_CNAME_HOPS + 1):
            try:
                response, ns = await self._ask(current, qtype, deadline)
            except _Failure as failure:
                return Answer(
                    name, type_text, failure.status, reason=failure.reason, server=failure.server,
                    cname_chain=tuple(name_text(n) for n in chain),
                )
            server = str(ns)
            # RFC 4035 §3.2.3 / RFC 6840 §5.7: AD covers the whole response; it counts only
            # from a resolver we trust to have validated.
            secure = bool(response.flags & dns.flags.AD) and self._trusted[ns]
            statuses.append(DnsStatus.SECURE if secure else DnsStatus.INSECURE)
            followed, rrset, hop_ttl = _follow_cnames(response, current, qtype)
            ttl = min(ttl, hop_ttl)
            for target in followed:
                if target in chain or target == qname:
                    # A loop holds no data and proves no absence: a failure, fail closed.
                    return Answer(
                        name, type_text, DnsStatus.BOGUS, reason="CNAME loop", server=server,
                        cname_chain=tuple(name_text(n) for n in chain),
                    )
                chain.append(target)
            status = weakest(*statuses)
            assert status is not None
            names = tuple(name_text(n) for n in chain)
            if rrset is not None:
                return Answer(
                    name, type_text, status, tuple(rrset), min(ttl, rrset.ttl),
                    cname_chain=names, server=server,
                )
            negative_ttl = _negative_ttl(response)
            if response.rcode() == dns.rcode.NXDOMAIN:
                return Answer(
                    name, type_text, status, (), min(ttl, negative_ttl), nxdomain=True,
                    cname_chain=names, server=server,
                )
            if not followed or _has_soa(response):
                return Answer(
                    name, type_text, status, (), min(ttl, negative_ttl), nodata=True,
                    cname_chain=names, server=server,
                )
            # The response ended on a CNAME whose target it did not resolve (a resolver may
            # stop early): ask again for the target, keeping the weakest status so far.
            current = chain[-1]
        return Answer(
            name, type_text, DnsStatus.BOGUS, reason=f"more than {MAX_CNAME_HOPS} CNAME hops",
            server=server, cname_chain=tuple(name_text(n) for n in chain),
        )

    async def _ask(
        self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType, deadline: float
    ) -> tuple[dns.message.Message, Nameserver]:
        """One question, asked of the nameservers until one answers or the budget is spent."""
        # DO (RFC 3225) asks for DNSSEC data, AD in the query (RFC 6840 §5.7) asks the resolver
        # to report its validation result; RD because the resolver does the recursion.
        query = dns.message.make_query(
            qname, qtype, use_edns=0, want_dnssec=True, payload=EDNS_PAYLOAD,
            flags=dns.flags.RD | dns.flags.AD,
        )
        failures: list[_Failure] = []
        retry = list(self.nameservers)
        attempt_budget = max(MIN_ATTEMPT_SECONDS, self.timeout * ATTEMPT_SHARE)
        while retry:
            pending, retry = retry, []
            for ns in pending:
                remaining = deadline - trio.current_time()
                if remaining <= 0:
                    break
                with trio.move_on_after(min(remaining, attempt_budget)):
                    try:
                        response = await self._exchange(query, ns)
                    except OSError as exc:
                        # ICMP port unreachable and the like: nobody is answering there.
                        failures.append(_Failure(DnsStatus.TIMEOUT, f"no answer from {ns}: {exc}", str(ns)))
                        continue
                    except dns.exception.DNSException as exc:
                        failures.append(_Failure(DnsStatus.BOGUS, f"bad response from {ns}: {exc}", str(ns)))
                        continue
                    rcode = response.rcode()
                    if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                        return response, ns
                    # SERVFAIL from a validating resolver is how DNSSEC failure shows (RFC 4035
                    # §5.5); REFUSED/FORMERR/... are failures too.  Never "no records".
                    failures.append(_Failure(
                        DnsStatus.BOGUS,
                        f"{ns} answered {dns.rcode.to_text(rcode)}{_ede_text(response)}",
                        str(ns),
                    ))
                    continue
                failures.append(_Failure(DnsStatus.TIMEOUT, f"no answer from {ns} in time", str(ns)))
                retry.append(ns)
            if deadline - trio.current_time() <= 0:
                break
        # A new exception rather than one of the list: raising one this frame still names
        # would make a frame <-> traceback cycle that only the cyclic GC frees.
        bogus = [f for f in failures if f.status is DnsStatus.BOGUS]
        if bogus:
            last = bogus[-1]
            raise _Failure(last.status, last.reason, last.server)
        if failures:
            last = failures[-1]
            raise _Failure(
                DnsStatus.TIMEOUT,
                f"no answer within {self.timeout:g}s ({last.reason})",
                last.server,
            )
        raise _Failure(DnsStatus.TIMEOUT, f"no answer within {self.timeout:g}s", "")

    async def _exchange(self, query: dns.message.Message, ns: Nameserver) -> dns.message.Message:
        # A datagram that is not a response to this query is ignored (a stray or forged one
        # must not end the wait); one that is, is read record by record (policy.dns_wire).
        response = await exchange_udp(query, ns.host, ns.port)
        if response.flags & dns.flags.TC:
            # RFC 1035 §4.2.1 / RFC 7766 §5: a truncated answer is retried over TCP.
            response = await exchange_tcp(query, ns.host, ns.port)
        return response


def _follow_cnames(
    response: dns.message.Message, qname: dns.name.Name, qtype: dns.rdatatype.RdataType
) -> tuple[list[dns.name.Name], dns.rrset.RRset | None, int]:
    """Walk the CNAME chain in the answer section from `qname`; return the names passed,
    the final RRset of type `qtype` (or None) and the smallest TTL on the way."""
    names: list[dns.name.Name] = []
    ttl = MAX_CACHE_TTL
    current = qname
    for _ in range(MAX_CNAME_HOPS + 1):
        try:
            rrset = response.find_rrset(response.answer, current, dns.rdataclass.IN, qtype)
            return names, rrset, ttl
        except KeyError:
            pass
        if qtype == dns.rdatatype.CNAME:
            break
        try:
            cname = response.find_rrset(response.answer, current, dns.rdataclass.IN, dns.rdatatype.CNAME)
        except KeyError:
            break
        ttl = min(ttl, cname.ttl)
        current = cname[0].target.canonicalize()
        names.append(current)
        if names.count(current) > 1:
            break
    return names, None, ttl


def _has_soa(response: dns.message.Message) -> bool:
    return any(r.rdtype == dns.rdatatype.SOA for r in response.authority)


def _negative_ttl(response: dns.message.Message) -> int:
    """RFC 2308 §5: a negative answer is cached for min(SOA TTL, SOA MINIMUM); without an SOA,
    not at all."""
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return min(rrset.ttl, rrset[0].minimum)
    return 0


def _ede_text(response: dns.message.Message) -> str:
    """Extended DNS Error (RFC 8914) text, if the resolver sent one (unbound does)."""
    try:
        errors = response.extended_errors()
    except AttributeError:  # pragma: no cover - older dnspython
        return ""
    parts = []
    for ede in errors:
        try:
            code = dns.edns.EDECode.to_text(ede.code)
        except Exception:  # pragma: no cover - unknown code
            code = str(ede.code)
        parts.append(f"{code}: {ede.text}" if ede.text else code)
    return f" ({'; '.join(parts)})" if parts else ""

