"""DNS evidence for one peer domain: SRV targets, their addresses and TLSA records, each with
its DNSSEC status (DESIGN §2.1 steps 1–3; RFC 6120 §3.2, XEP-0368, RFC 7673).

`gather()` does the lookups (concurrently, through `policy.dns.Resolver`) and returns a
`PeerEvidence`: the ordered connection targets plus everything the verdict needs.  From it,
`for_target()` builds the `policy.evidence.Evidence` for an outbound connection to one target,
`for_inbound()` the one for a peer that connected to us.

Failure is never absence: if an SRV lookup is bogus or times out the domain fails closed —
`PeerEvidence.failure` says so, there are no targets, and the failing lookup is in every
`Evidence.statuses` so the verdict rejects.  Other bogus/timeout pieces (a target's addresses,
a TLSA RRset) are carried the same way.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import dns.rdata
import trio

from policy.dns import Answer, Resolver, name_text, to_dns_name, weakest
from policy.evidence import DnsStatus, Evidence
from policy.tlsa import MalformedTlsa, TlsaRecord

__all__ = ["PeerEvidence", "SrvTarget", "gather", "order_srv", "tlsa_from_answer"]

# RFC 6120 §3.2.1 (STARTTLS) and XEP-0368 (Direct TLS) service names.
STARTTLS_SERVICE = "_xmpp-server._tcp"
DIRECT_TLS_SERVICE = "_xmpps-server._tcp"
# RFC 6120 §3.2.2 / §14.7: without SRV records the peer is reached at its domain on 5269.
DEFAULT_S2S_PORT = 5269
STATIC = "policy"  # the source named in statuses for evidence from a policy file


@dataclass(frozen=True)
class SrvTarget:
    """One place to connect to, with the evidence that belongs to it.

    `delegated`: the SRV answer was secure and so were the target's address records (RFC 7673
    §3: only then is the target's TLSA looked up; §4: and the target an extra reference
    identifier).
    `tlsa`/`tlsa_status`/`tlsa_name`: the TLSA RRset that applies when connecting here
    (`tlsa_status` None: none was looked up).  `statuses`: this target's own lookups
    (A, AAAA, TLSA) with their status.  `fallback`: no SRV existed, this is the domain itself.
    `alias`: the host is a secure CNAME alias and `tlsa` came from the fully expanded name
    (RFC 7671 §7); that name is then a DANE-TA(2) reference identifier too.
    """

    host: str
    port: int
    direct_tls: bool
    priority: int = 0
    weight: int = 0
    srv_secure: bool = False
    delegated: bool = False
    fallback: bool = False
    addresses: tuple[str, ...] = ()
    address_status: DnsStatus | None = None
    tlsa: tuple[TlsaRecord | MalformedTlsa, ...] = ()
    tlsa_status: DnsStatus | None = None
    tlsa_name: str | None = None
    statuses: Mapping[str, DnsStatus] = field(default_factory=dict)
    alias: str | None = None

    def __str__(self) -> str:
        mode = "direct-tls" if self.direct_tls else "starttls"
        return f"{self.host}:{self.port} ({mode})"


@dataclass(frozen=True)
class PeerEvidence:
    """What DNS (and the policy file) said about peer domain `domain`.

    `targets` are in connection order (priority, then RFC 2782 weighted order).  `failure` is
    the status of a failed SRV lookup (bogus/timeout): the domain fails closed and `targets`
    is empty.  `no_service`: the domain published SRV target "." (RFC 2782: the service is
    decidedly not available).  `domain_tlsa*`: the TLSA RRset at `_5269._tcp.DOMAIN`, used
    when the SRV answer is insecure or absent.
    """

    domain: str
    targets: tuple[SrvTarget, ...] = ()
    srv_statuses: Mapping[str, DnsStatus] = field(default_factory=dict)
    failure: DnsStatus | None = None
    reason: str = ""
    no_service: bool = False
    domain_tlsa: tuple[TlsaRecord | MalformedTlsa, ...] = ()
    domain_tlsa_status: DnsStatus | None = None
    domain_tlsa_name: str | None = None
    domain_statuses: Mapping[str, DnsStatus] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    ttl: int | None = None    # shortest TTL of the answers used; None: no DNS lookup made

    @property
    def failed(self) -> bool:
        """The SRV evidence is bogus or timed out: no target may be used."""
        return self.failure is not None

    @property
    def delegated_targets(self) -> tuple[str, ...]:
        """Every securely delegated target host, each once."""
        return tuple(dict.fromkeys(t.host for t in self.targets if t.delegated))

    @property
    def statuses(self) -> dict[str, DnsStatus]:
        """Every piece of evidence with its status."""
        out = dict(self.srv_statuses)
        out.update(self.domain_statuses)
        for target in self.targets:
            out.update(target.statuses)
        return out

    def for_target(self, target: SrvTarget) -> Evidence:
        """Evidence for an outbound connection to `target` (one of `self.targets`).

        Statuses: both SRV lookups and this target's own lookups, so a broken backup target
        does not spoil a good primary one.
        """
        statuses = dict(self.srv_statuses)
        statuses.update(target.statuses)
        return Evidence(
            domain=self.domain,
            tlsa=target.tlsa,
            tlsa_status=target.tlsa_status,
            delegated_targets=(target.host,) if target.delegated else (),
            statuses=statuses,
            alias_targets=(target.alias,) if target.alias else (),
            notes=self.notes,
            ttl=self.ttl,
        )

    def for_inbound(self) -> Evidence:
        """Evidence for a peer of this domain that connected to us.

        We cannot know which target the peer is, so the TLSA RRset is the union of the secure
        RRsets of all targets (each record once) and every securely delegated target is a
        reference identifier.  Every piece of evidence is in `statuses`, so any bogus/timeout
        one rejects.
        """
        statuses = self.statuses
        tlsa_sets: list[tuple[tuple[TlsaRecord | MalformedTlsa, ...], DnsStatus | None]] = []
        for target in self.targets:
            tlsa_sets.append((target.tlsa, target.tlsa_status))
        if not self.targets and self.domain_tlsa_status is not None:
            tlsa_sets.append((self.domain_tlsa, self.domain_tlsa_status))
        looked_up = [status for _, status in tlsa_sets if status is not None]
        failed = [s for s in looked_up if s.failed]
        union = tuple(dict.fromkeys(
            record for records, status in tlsa_sets if status is DnsStatus.SECURE for record in records
        ))
        if failed:
            tlsa_status: DnsStatus | None = weakest(*failed)
        elif union:
            tlsa_status = DnsStatus.SECURE
        elif looked_up:
            # Only absent or insecure RRsets: secure only if every one was a secure denial.
            tlsa_status = weakest(*looked_up)
        else:
            tlsa_status = None
        return Evidence(
            domain=self.domain,
            tlsa=union,
            tlsa_status=tlsa_status,
            delegated_targets=self.delegated_targets,
            statuses=statuses,
            alias_targets=tuple(dict.fromkeys(t.alias for t in self.targets if t.alias)),
            notes=self.notes,
            ttl=self.ttl,
        )

    def describe(self) -> list[str]:
        """Human-readable lines (for `xmpp-dane-proxy check` and logs)."""
        lines = [f"{key}: {status.value}" for key, status in self.statuses.items()]
        lines += [f"DNSSEC: {note}" for note in self.notes]
        if self.failure:
            lines.append(f"FAILED CLOSED ({self.failure.value}): {self.reason}")
        elif self.no_service:
            lines.append("no XMPP server-to-server service (SRV target '.')")
        for t in self.targets:
            lines.append(
                f"target {t}: addresses {', '.join(t.addresses) or '-'}"
                f" [{t.address_status.value if t.address_status else '-'}]"
                f", delegated={'yes' if t.delegated else 'no'}"
                f", TLSA {t.tlsa_name or '-'} [{t.tlsa_status.value if t.tlsa_status else '-'}]"
                f" {len(t.tlsa)} record(s)"
                + (f" (CNAME {t.host} -> {t.alias})" if t.alias else "")
            )
        return lines


# ---------------------------------------------------------------------------------------------
# SRV ordering


@dataclass(frozen=True)
class _Srv:
    priority: int
    weight: int
    port: int
    target: str
    direct_tls: bool
    secure: bool


def order_srv(records: Sequence[Any], rng: random.Random | None = None) -> list[Any]:
    """Order SRV records for connection attempts (RFC 2782, "Usage rules").

    Lowest priority first; within one priority a weighted random order: zero-weight records
    go first in the candidate list, then repeatedly a number 0..sum(weights) is drawn and the
    first record whose running sum reaches it is taken.  Records need `priority` and `weight`
    attributes.  XEP-0368: STARTTLS and Direct TLS records are merged into one such list.
    """
    rng = rng or random.Random()
    ordered: list[Any] = []
    for priority in sorted({r.priority for r in records}):
        remaining = sorted((r for r in records if r.priority == priority), key=lambda r: r.weight != 0)
        while remaining:
            total = sum(r.weight for r in remaining)
            pick = rng.randint(0, total)
            running = 0
            for index, record in enumerate(remaining):
                running += record.weight
                if running >= pick:
                    ordered.append(remaining.pop(index))
                    break
    return ordered


# ---------------------------------------------------------------------------------------------
# Conversion


def tlsa_from_answer(answer: Answer) -> tuple[TlsaRecord | MalformedTlsa, ...]:
    """The TLSA rdata of an answer as `TlsaRecord`s (in answer order).

    DESIGN §2.1 item 4: a record the resolver validated but dnspython could not parse arrives
    as opaque rdata (`policy.dns_wire`); it is read here field by field, so `policy.tlsa`
    names it as unusable (e.g. "digest is 20 bytes, expected 32") and the others decide."""
    out: list[TlsaRecord | MalformedTlsa] = []
    for rdata in answer.rrset:
        if isinstance(rdata, dns.rdata.GenericRdata):
            raw = bytes(rdata.data)
            if len(raw) < 3:
                out.append(MalformedTlsa(rdata.to_text(), f"rdata is {len(raw)} bytes, too short for TLSA"))
            else:
                out.append(TlsaRecord(raw[0], raw[1], raw[2], raw[3:]))
            continue
        try:
            out.append(TlsaRecord(int(rdata.usage), int(rdata.selector), int(rdata.mtype), bytes(rdata.cert)))
        except (AttributeError, TypeError, ValueError) as exc:
            out.append(MalformedTlsa(rdata.to_text(), str(exc)))
    return tuple(out)


def _static_srv(entry: Any) -> tuple[int, int, int, str]:
    """Accept a policy-file `SrvRecord` (attributes) or a plain 4-tuple."""
    if hasattr(entry, "priority"):
        return int(entry.priority), int(entry.weight), int(entry.port), str(entry.target)
    priority, weight, port, target = entry
    return int(priority), int(weight), int(port), str(target)


def _srv_records(answer: Answer, direct_tls: bool) -> tuple[list[_Srv], bool]:
    """Records of one SRV answer, and whether it said "no service" (a lone "." target)."""
    records = [
        _Srv(int(r.priority), int(r.weight), int(r.port), name_text(r.target), direct_tls,
             answer.status is DnsStatus.SECURE)
        for r in answer.rrset
    ]
    # RFC 2782: "A Target of '.' means that the service is decidedly not available at this
    # domain."  It is meaningful alone; mixed with real targets it is ignored.
    real = [r for r in records if r.target != "."]
    return real, bool(records) and not real


# ---------------------------------------------------------------------------------------------
# Gathering


async def gather(
    domain: str,
    resolver: Resolver,
    *,
    static_srv: Iterable[Any] = (),
    static_tlsa: Iterable[TlsaRecord | MalformedTlsa] = (),
    rng: random.Random | None = None,
    inbound: bool = False,
) -> PeerEvidence:
    """Collect the DNS evidence for peer domain `domain` (DESIGN §2.1).

    `static_srv` ((priority, weight, port, target) or `SrvRecord`s) and `static_tlsa` come from
    the peer's policy file: they are treated as secure and replace the SRV (both services) or
    TLSA lookups respectively.  `rng` orders equal-priority targets (RFC 2782); inject one for
    reproducible tests.  All lookups of one stage run concurrently.

    A static SRV target is securely delegated by the operator's word: the policy file is the
    signed statement DNSSEC could not give (DESIGN §2.4).  `inbound=True` (judging a peer that
    connected to us) skips address lookups for such targets — we will not connect to them,
    and their addresses would only have decided a delegation the operator already made.
    """
    d = name_text(to_dns_name(domain))
    static_srv = tuple(_static_srv(e) for e in static_srv)
    static_tlsa = tuple(static_tlsa)

    # -- step 1: SRV (RFC 6120 §3.2.1 and XEP-0368, both asked at once) ------------------------
    srv_statuses: dict[str, DnsStatus] = {}
    records: list[_Srv] = []
    no_service = False
    starttls_srv_exists = False
    answers: dict[str, Answer] = {}
    if static_srv:
        srv_statuses[f"SRV {STARTTLS_SERVICE}.{d} ({STATIC})"] = DnsStatus.SECURE
        records = [
            _Srv(p, w, port, name_text(to_dns_name(t)), False, True)
            for p, w, port, t in static_srv
        ]
        real = [r for r in records if r.target != "."]
        no_service = bool(records) and not real
        records = real
        starttls_srv_exists = True
    else:
        async def srv(service: str) -> None:
            answers[service] = await resolver.lookup(f"{service}.{d}", "SRV")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(srv, STARTTLS_SERVICE)
            nursery.start_soon(srv, DIRECT_TLS_SERVICE)
        starttls, direct = answers[STARTTLS_SERVICE], answers[DIRECT_TLS_SERVICE]
        srv_statuses = {starttls.key: starttls.status, direct.key: direct.status}
        failed = [a for a in (starttls, direct) if a.failed]
        if failed:
            # DESIGN §2.1: SRV bogus -> the domain fails closed; no fallback to anything weaker.
            return PeerEvidence(
                domain=d,
                srv_statuses=srv_statuses,
                failure=weakest(*(a.status for a in failed)),
                reason="; ".join(a.describe() for a in failed),
                notes=_notes(resolver),
            )
        starttls_records, starttls_dot = _srv_records(starttls, direct_tls=False)
        direct_records, _direct_dot = _srv_records(direct, direct_tls=True)
        records = starttls_records + direct_records
        starttls_srv_exists = bool(starttls.rrset)
        no_service = not records and starttls_dot

    ordered: list[_Srv] = order_srv(records, rng)
    fallback = not ordered and not no_service and not starttls_srv_exists
    if fallback:
        # RFC 6120 §3.2.2: no _xmpp-server SRV at all -> the domain itself, port 5269, STARTTLS.
        ordered = [_Srv(0, 0, DEFAULT_S2S_PORT, d, False, False)]

    # TLSA at _5269._tcp.D (DESIGN §2.1): for targets from an insecure SRV answer, for the
    # no-SRV fallback, and (inbound) for a domain that has no service to delegate to.
    need_domain_tlsa = not static_tlsa and (
        not ordered or any(not r.secure or fallback for r in ordered)
    )

    # -- steps 2 and 3: addresses and TLSA, every lookup at once ------------------------------
    results: dict[tuple[str, str], Answer] = {}

    async def lookup(name: str, rdtype: str) -> None:
        results[(name, rdtype)] = await resolver.lookup(name, rdtype)

    domain_tlsa_name = f"_{DEFAULT_S2S_PORT}._tcp.{d}"
    async with trio.open_nursery() as nursery:
        wanted: set[tuple[str, str]] = set()
        for r in ordered:
            if not (inbound and static_srv):
                wanted.add((r.target, "A"))
                wanted.add((r.target, "AAAA"))
            if r.secure and not fallback and not static_tlsa:
                # RFC 7673 §3.3: TLSA at _PORT._tcp.TARGET.  Asked together with the addresses
                # to save a round trip; used only if the addresses turn out secure.
                wanted.add((f"_{r.port}._tcp.{r.target}", "TLSA"))
        if need_domain_tlsa:
            wanted.add((domain_tlsa_name, "TLSA"))
        for name, rdtype in wanted:
            nursery.start_soon(lookup, name, rdtype)

    # -- DESIGN §2.1 step 3 / RFC 7671 §7: a TLSA base domain that is a CNAME alias --------
    # The address lookups followed any CNAME chain at a base domain (the no-SRV domain D, or a
    # securely delegated SRV target).  Only a chain that is secure end to end lets TLSA be
    # looked up at the fully expanded name; that RRset, when it exists, is used first, and
    # the original name's otherwise.  An insecure chain gives no DANE from the expanded name.
    aliases: dict[tuple[str, int], str] = {}
    if not static_tlsa:
        for r in ordered:
            base_is_tlsa_base = fallback or r.secure
            expanded = _secure_expansion(results, r.target)
            if base_is_tlsa_base and expanded:
                aliases[(r.target, r.port)] = expanded
    expanded_answers: dict[tuple[str, int], Answer] = {}
    if aliases:
        async def expanded_lookup(key: tuple[str, int], name: str) -> None:
            expanded_answers[key] = await resolver.lookup(f"_{key[1]}._tcp.{name}", "TLSA")

        async with trio.open_nursery() as nursery:
            for key, name in aliases.items():
                nursery.start_soon(expanded_lookup, key, name)

    domain_answer = results.get((domain_tlsa_name, "TLSA")) if need_domain_tlsa else None
    if static_tlsa:
        domain_tlsa, domain_tlsa_status, domain_tlsa_key = static_tlsa, DnsStatus.SECURE, f"TLSA {STATIC}"
    elif domain_answer is not None:
        domain_tlsa, domain_tlsa_status, domain_tlsa_key = (
            tlsa_from_answer(domain_answer), domain_answer.status, domain_answer.key
        )
    else:
        domain_tlsa, domain_tlsa_status, domain_tlsa_key = (), None, None

    targets: list[SrvTarget] = []
    for r in ordered:
        statuses: dict[str, DnsStatus] = {}
        addresses: tuple[str, ...] = ()
        address_status: DnsStatus | None = None
        if (r.target, "A") in results:
            a, aaaa = results[(r.target, "A")], results[(r.target, "AAAA")]
            address_status = weakest(a.status, aaaa.status)
            statuses = {a.key: a.status, aaaa.key: aaaa.status}
            addresses = tuple(rd.to_text() for rd in a.rrset) + tuple(rd.to_text() for rd in aaaa.rrset)
        # RFC 7673 §3.1-3.2: a target is securely delegated only when the SRV answer and the
        # target's address records are all secure — or the operator listed it (static SRV).
        delegated = not fallback and r.secure and (bool(static_srv) or address_status is DnsStatus.SECURE)
        tlsa: tuple[TlsaRecord | MalformedTlsa, ...] = ()
        tlsa_status: DnsStatus | None = None
        tlsa_name: str | None = None
        if static_tlsa:
            tlsa, tlsa_status, tlsa_name = static_tlsa, DnsStatus.SECURE, STATIC
            statuses[f"TLSA {STATIC}"] = DnsStatus.SECURE
        elif r.secure and not fallback:
            if delegated:
                answer = results[(f"_{r.port}._tcp.{r.target}", "TLSA")]
                tlsa, tlsa_status, tlsa_name = tlsa_from_answer(answer), answer.status, answer.name
                statuses[answer.key] = answer.status
            # else: RFC 7673 §3.2 — insecure target addresses: no TLSA for this target, and it
            # is no reference identifier either (DESIGN §2.1 step 2).
        elif domain_tlsa_key is not None:
            # Insecure SRV (or none): D is the only reference identifier and its TLSA applies.
            tlsa, tlsa_status, tlsa_name = domain_tlsa, domain_tlsa_status, domain_tlsa_name
            statuses[domain_tlsa_key] = domain_tlsa_status  # type: ignore[assignment]
        alias: str | None = None
        expanded_answer = expanded_answers.get((r.target, r.port))
        if expanded_answer is not None and (fallback or delegated):
            statuses[expanded_answer.key] = expanded_answer.status
            if expanded_answer.failed:
                # Failure is never absence: no falling back to the original name.
                tlsa, tlsa_status, tlsa_name = (), expanded_answer.status, expanded_answer.name
            elif expanded_answer.status is DnsStatus.SECURE and expanded_answer.rrset:
                tlsa, tlsa_status = tlsa_from_answer(expanded_answer), DnsStatus.SECURE
                tlsa_name, alias = expanded_answer.name, aliases[(r.target, r.port)]
        targets.append(SrvTarget(
            host=r.target, port=r.port, direct_tls=r.direct_tls, priority=r.priority,
            weight=r.weight, srv_secure=r.secure, delegated=delegated, fallback=fallback,
            addresses=addresses, address_status=address_status,
            tlsa=tlsa, tlsa_status=tlsa_status, tlsa_name=tlsa_name, statuses=statuses,
            alias=alias,
        ))

    domain_statuses: dict[str, DnsStatus] = {}
    if domain_tlsa_key is not None and domain_tlsa_status is not None:
        domain_statuses[domain_tlsa_key] = domain_tlsa_status
    return PeerEvidence(
        domain=d,
        targets=tuple(targets),
        srv_statuses=srv_statuses,
        no_service=no_service,
        domain_tlsa=domain_tlsa,
        domain_tlsa_status=domain_tlsa_status,
        domain_tlsa_name=(STATIC if static_tlsa else domain_tlsa_name if domain_answer is not None else None),
        domain_statuses=domain_statuses,
        notes=_notes(resolver),
        ttl=min((a.ttl for a in (*answers.values(), *results.values(), *expanded_answers.values())),
                default=None),
    )


def _secure_expansion(results: Mapping[tuple[str, str], Answer], host: str) -> str | None:
    """The fully expanded name of `host` when its address lookups went through a CNAME chain
    that is secure end to end (RFC 7671 §7); None when there is no alias or the chain is not
    secure."""
    answers = [results[(host, t)] for t in ("A", "AAAA") if (host, t) in results]
    chained = [a for a in answers if a.cname_chain]
    if not chained or any(a.status is not DnsStatus.SECURE for a in chained):
        return None
    return chained[0].canonical_name


def _notes(resolver: Resolver) -> tuple[str, ...]:
    """Why insecure answers count as unvalidated right now, if they do (DESIGN §2.1 item 5)."""
    problem = resolver.validation_problem() if hasattr(resolver, "validation_problem") else ""
    return (problem,) if problem else ()
