"""Our own TLSA records against the certificate we serve: the rollover guard (pure logic).

Peers that do DANE reject us the moment the chain we present stops matching the TLSA records
published for our domain — the most common DANE outage.  This module compares, for one of our
local domains, every TLSA RRset a peer will consult (`TlsaSite`, found by the proxy side with
the same lookups a peer makes: RFC 7673 via `policy.peer_evidence.gather`) with

* the chain the proxy serves now, and
* an optional staged next key/certificate (`next_cert` / `next_key` in `[[domain]]`),

and says what to add, what to remove and when each step is safe.  RFC 7671 §8.1 (key rollover
with "current + next"): publish a record for the next key beside the current one, wait until
every cache that may hold the old RRset has expired it — at least 2×TTL — then switch the
certificate, then remove the old record.  A record that matches neither chain is stale.

Matching is `policy.dane.authenticate`, the code that judges our peers, with the reference
identifiers a peer uses for that RRset (our domain and, for a securely delegated SRV target,
the target: RFC 7673 §4).  A bare next key (no certificate yet) can be checked against
SPKI-selector end-entity records only (`3 1 x`, `1 1 x`): those depend on the key alone.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509

from policy.dane import authenticate
from policy.evidence import DnsStatus
from policy.pkix import TrustStore
from policy.tlsa import (DANE_EE, DANE_TA, MT_FULL, MT_SHA256, MT_SHA512, PKIX_EE, PKIX_TA, SEL_SPKI,
                         MalformedTlsa, TlsaRecord, record_for, usable_records)

__all__ = ["ALL_USAGES", "NextKey", "OwnTlsaReport", "SiteAssessment", "Step", "TlsaSite", "assess"]

# Which usages a peer may apply to us is the peer's choice; a record of any usage that some
# peer applies and our chain does not match is an outage for that peer, so all four count.
ALL_USAGES = frozenset({PKIX_TA, PKIX_EE, DANE_TA, DANE_EE})
# RFC 7671 §8.1: "wait at least twice the TTL" between publishing and switching.
TTL_FACTOR = 2
# RFC 7671 §5.1 / RFC 7672 §3.1.3: the recommended record, when nothing else is published.
PREFERRED_SHAPE = (DANE_EE, SEL_SPKI, MT_SHA256)


@dataclass(frozen=True)
class TlsaSite:
    """One TLSA RRset peers consult when they connect to us, and where it applies.

    `status` None: no TLSA lookup applies there (e.g. the SRV target is not securely
    delegated); peers then use PKIX.  `ttl`: seconds, the zone's TTL for the RRset (its
    RRSIG's original TTL) where known, else what the resolver reported.
    """

    name: str
    targets: tuple[str, ...]
    references: tuple[str, ...]
    status: DnsStatus | None
    records: tuple[TlsaRecord | MalformedTlsa, ...] = ()
    ttl: int = 0
    reason: str = ""


@dataclass(frozen=True)
class NextKey:
    """The staged next identity: a chain (`next_cert`, leaf first), a bare public key
    (`next_key` alone: DER SubjectPublicKeyInfo), or both."""

    chain: tuple[x509.Certificate, ...] = ()
    spki: bytes | None = None
    source: str = ""


@dataclass(frozen=True)
class SiteAssessment:
    """One site judged: which record the served chain matches, which the next one, and the
    records to add (for the next key, or to repair the served chain) or remove."""

    site: TlsaSite
    usable: tuple[TlsaRecord, ...]
    ignored: tuple[tuple[str, str], ...]
    served: TlsaRecord | None
    served_reason: str
    next: TlsaRecord | None = None
    next_unknown: bool = False            # a bare next key cannot be checked against these records
    add_for_next: tuple[TlsaRecord, ...] = ()
    add_for_served: tuple[TlsaRecord, ...] = ()
    stale: tuple[TlsaRecord, ...] = ()    # usable, matching neither served nor next
    retire: tuple[TlsaRecord, ...] = ()   # matching only the served chain: remove after the switch

    @property
    def state(self) -> str:
        """`match`, `mismatch`, `failed` (bogus/timeout), `no-tlsa` (secure, none usable),
        `insecure` (unsigned: peers ignore it) or `not-applicable` (no lookup applies)."""
        st = self.site.status
        if st is None:
            return "not-applicable"
        if st.failed:
            return "failed"
        if st is not DnsStatus.SECURE:
            return "insecure"
        if not self.usable:
            return "no-tlsa"
        return "match" if self.served is not None else "mismatch"


@dataclass(frozen=True)
class Step:
    """One thing for the operator to do: `action` add/remove/switch, the zone-file line(s),
    and the earliest time it is safe (None: now).  `purpose`: `repair` (records the served
    chain needs now), `next` (records for the staged key), `switch`, `retire` (records only
    the old key needs, after the switch) or `stale` (records nothing matches)."""

    action: str
    lines: tuple[str, ...]
    not_before: _dt.datetime | None
    why: str
    after: str = ""     # an earlier step that must be done first ("switch")
    purpose: str = ""


@dataclass(frozen=True)
class OwnTlsaReport:
    """Everything about one local domain's own TLSA, at time `now`."""

    domain: str
    sites: tuple[SiteAssessment, ...]
    now: _dt.datetime
    next_key: NextKey | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def mismatched(self) -> tuple[SiteAssessment, ...]:
        return tuple(s for s in self.sites if s.state == "mismatch")

    @property
    def failed(self) -> tuple[SiteAssessment, ...]:
        return tuple(s for s in self.sites if s.state == "failed")

    @property
    def dane_sites(self) -> tuple[SiteAssessment, ...]:
        """Sites with usable secure records: where peers doing DANE check our chain."""
        return tuple(s for s in self.sites if s.state in ("match", "mismatch"))

    @property
    def matches(self) -> bool:
        """True unless some peer doing DANE would reject the served chain: a usable record
        set it does not match, or a TLSA lookup that fails (bogus/timeout) — peers fail
        closed on those too."""
        return not self.mismatched and not self.failed

    @property
    def next_published(self) -> bool | None:
        """None: no next key staged (or nothing to publish for it: no DANE sites); else
        whether every DANE site already carries a record for it."""
        if self.next_key is None or not self.dane_sites:
            return None
        return all(s.next is not None or s.next_unknown for s in self.dane_sites)

    @property
    def wait_seconds(self) -> int:
        """RFC 7671 §8.1: 2×TTL of the RRsets that gain a record for the next key."""
        ttls = [s.site.ttl for s in self.dane_sites if s.add_for_next]
        return TTL_FACTOR * max(ttls, default=0)

    def summary(self) -> str:
        """One line: the state and, if it is bad, what is wrong."""
        if self.failed:
            s = self.failed[0]
            return (f"the DNS lookup for {s.site.name} is {s.site.status}"
                    f"{': ' + s.site.reason if s.site.reason else ''}; peers doing DANE fail closed")
        if self.mismatched:
            s = self.mismatched[0]
            return (f"served chain matches none of the {len(s.usable)} usable record(s) at {s.site.name}: "
                    f"peers doing DANE reject it ({s.served_reason})")
        if not self.dane_sites:
            return "no usable DNSSEC-secure TLSA published: peers do not use DANE for this domain"
        names = ", ".join(s.site.name for s in self.dane_sites)
        return f"served chain matches {names}"

    def steps(self) -> list[Step]:
        """What to do, in order, with the time from which each step is safe."""
        out: list[Step] = []
        fix = [_zone_line(s.site.name, r) for s in self.sites for r in s.add_for_served]
        if fix:
            out.append(Step("add", tuple(fix), None, purpose="repair", why=(
                "the served chain matches no usable record: publish these now (peers doing DANE "
                "reject this domain until they see them; caches may hold the old RRset for up to its TTL)")))
        if self.next_key is not None and self.dane_sites:
            adds = [_zone_line(s.site.name, r) for s in self.dane_sites for r in s.add_for_next]
            wait = self.wait_seconds
            if adds:
                switch_at = self.now + _dt.timedelta(seconds=wait)
                out.append(Step("add", tuple(adds), None, purpose="next", why=(
                    f"the next key is not published yet; publish beside the current record(s) "
                    f"and keep both for at least 2×TTL = {wait} s")))
                out.append(Step("switch", (), switch_at, purpose="switch", why=(
                    f"switch cert/key to the next ones (and reload) no earlier than 2×TTL after "
                    f"publishing: {_iso(switch_at)} if published now")))
            else:
                ttl = max((s.site.ttl for s in self.dane_sites), default=0)
                out.append(Step("switch", (), None, purpose="switch", why=(
                    f"the next key is published everywhere; switch once it has been published for "
                    f"2×TTL = {TTL_FACTOR * ttl} s")))
            retire = [_zone_line(s.site.name, r) for s in self.dane_sites for r in s.retire]
            if retire:
                out.append(Step("remove", tuple(retire), out[-1].not_before, purpose="retire", after="switch",
                                why="after the switch: these match only the chain served now"))
        stale = [_zone_line(s.site.name, r) for s in self.dane_sites for r in s.stale]
        if stale:
            out.append(Step("remove", tuple(stale), None, purpose="stale",
                            why="stale: they match neither the served chain nor the next key"))
        return out


def _zone_line(name: str, record: TlsaRecord) -> str:
    return f"{name}. IN TLSA {record}"


def _iso(when: _dt.datetime) -> str:
    return when.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------- matching


def _match(chain: Sequence[x509.Certificate], usable: Sequence[TlsaRecord], references: Sequence[str],
           trust: TrustStore | None, now: _dt.datetime) -> tuple[TlsaRecord | None, str]:
    if not chain:
        return None, "no chain"
    result = authenticate(chain, usable, references, trust=trust, now=now)
    return result.matched, result.reason


def _key_match(spki: bytes, usable: Sequence[TlsaRecord]) -> tuple[TlsaRecord | None, bool]:
    """(matching record, whether some records could not be judged) for a bare key."""
    unknown = False
    for rec in usable:
        if rec.usage in (DANE_EE, PKIX_EE) and rec.selector == SEL_SPKI:
            if _digest(spki, rec.mtype) == rec.data:
                return rec, False
        else:
            unknown = True
    return None, unknown


def _digest(data: bytes, mtype: int) -> bytes:
    if mtype == MT_SHA256:
        return hashlib.sha256(data).digest()
    if mtype == MT_SHA512:
        return hashlib.sha512(data).digest()
    return data


def _records(chain: Sequence[x509.Certificate], spki: bytes | None,
             shapes: Sequence[tuple[int, int, int]]) -> tuple[TlsaRecord, ...]:
    """Records of the given shapes that designate this chain (or bare key)."""
    out: list[TlsaRecord] = []
    for usage, selector, mtype in shapes:
        if chain:
            if usage in (DANE_EE, PKIX_EE):
                cert = chain[0]
            elif len(chain) > 1:
                cert = chain[-1]    # a trust-anchor record designates the top of the chain sent
            else:
                continue
            out.append(record_for(cert, usage, selector, mtype))
        elif spki is not None and usage in (DANE_EE, PKIX_EE) and selector == SEL_SPKI:
            out.append(TlsaRecord(usage, selector, mtype, _digest(spki, mtype)))
    return tuple(dict.fromkeys(out))


def _shapes(usable: Sequence[TlsaRecord]) -> list[tuple[int, int, int]]:
    # Mirror what is published (a peer applies digest agility per usage/selector, so every
    # digest type in use needs its own record); Full(0) values are not suggested.
    shapes = list(dict.fromkeys((r.usage, r.selector, r.mtype) for r in usable if r.mtype != MT_FULL))
    return shapes or [PREFERRED_SHAPE]


def assess(domain: str, sites: Sequence[TlsaSite], served: Sequence[x509.Certificate], *,
           next_key: NextKey | None = None, trust: TrustStore | None = None,
           now: _dt.datetime | None = None) -> OwnTlsaReport:
    """Judge every site for the served chain (leaf first) and the staged next key."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    out: list[SiteAssessment] = []
    for site in sites:
        if site.status is not DnsStatus.SECURE:
            out.append(SiteAssessment(site, (), (), None, f"TLSA {site.status or 'not looked up'}"))
            continue
        usable_set = usable_records(site.records, ALL_USAGES)
        usable = usable_set.usable
        served_rec, served_reason = _match(served, usable, site.references, trust, now) if usable else (None, "")
        nxt: TlsaRecord | None = None
        unknown = False
        add_next: tuple[TlsaRecord, ...] = ()
        if next_key is not None and usable:
            if next_key.chain:
                nxt, _ = _match(next_key.chain, usable, site.references, trust, now)
            elif next_key.spki is not None:
                nxt, unknown = _key_match(next_key.spki, usable)
            if nxt is None and not unknown:
                add_next = _records(next_key.chain, next_key.spki, _shapes(usable))
        add_served = () if served_rec is not None or not usable else _records(served, None, _shapes(usable))
        retire: list[TlsaRecord] = []
        stale: list[TlsaRecord] = []
        for rec in usable:
            by_served = _match(served, [rec], site.references, trust, now)[0] is not None
            by_next = next_key is not None and (
                _match(next_key.chain, [rec], site.references, trust, now)[0] is not None if next_key.chain
                else next_key.spki is not None and _key_match(next_key.spki, [rec])[0] is not None)
            if by_served and not by_next and next_key is not None:
                retire.append(rec)
            elif not by_served and not by_next and served_rec is not None:
                stale.append(rec)
        out.append(SiteAssessment(site, usable, usable_set.ignored, served_rec, served_reason, nxt, unknown,
                                  add_next, add_served, tuple(stale), tuple(retire)))
    return OwnTlsaReport(domain, tuple(out), now, next_key)
