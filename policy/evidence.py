"""DNS evidence as the verdict function consumes it: what was found, and how sure DNSSEC is of it.

DESIGN §2.1: every lookup result carries exactly one status.  The lookups themselves live in
`policy.dns`; this module only holds the values, so the verdict can be computed (and tested)
without a resolver.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from policy.tlsa import MalformedTlsa, TlsaRecord


class DnsStatus(str, enum.Enum):
    """DNSSEC status of one lookup (DESIGN §2.1)."""

    SECURE = "secure"      # AD bit set by a trusted (loopback or listed) validating resolver
    INSECURE = "insecure"  # answered, but not provably signed
    # Would be insecure, but the resolver failed its `dns.probe` (DESIGN §2.1 item 5): it
    # may not be validating at all, so "not signed" cannot be told from "not checked".
    UNVALIDATED = "unvalidated"
    BOGUS = "bogus"        # SERVFAIL or other failure from a validating resolver
    TIMEOUT = "timeout"    # no answer in time

    def __str__(self) -> str:
        return self.value

    @property
    def failed(self) -> bool:
        """Bogus, timed-out or unvalidated evidence rejects in every `require` mode (DESIGN
        §2.1, §2.4)."""
        return self in (DnsStatus.BOGUS, DnsStatus.TIMEOUT, DnsStatus.UNVALIDATED)


@dataclass(frozen=True)
class Evidence:
    """Everything DNS said about peer domain `domain` that the verdict needs.

    `tlsa` is the TLSA RRset that applies (for inbound, the union over the securely delegated
    targets' RRsets), `tlsa_status` its DNSSEC status; `tlsa_status=None` means no TLSA lookup
    was made (e.g. an insecure SRV answer pointed elsewhere and no `_5269._tcp.D` exists).
    `delegated_targets` are securely delegated SRV targets: extra reference identifiers (RFC
    7673 §4 / DESIGN §2.1).  `statuses` names every other piece of evidence (SRV, addresses,
    CNAME hops) with its status; any bogus or timeout among them rejects.
    `alias_targets` are secure CNAME expansions of a TLSA base domain whose TLSA RRset was
    used (RFC 7671 §7): reference identifiers for DANE-TA(2) only, never for PKIX.
    `notes` explain failed statuses (e.g. which resolver failed its DNSSEC probe); a
    rejection for failed evidence carries them in its reason.
    """

    domain: str
    tlsa: tuple[TlsaRecord | MalformedTlsa, ...] = ()
    tlsa_status: DnsStatus | None = None
    delegated_targets: tuple[str, ...] = ()
    statuses: dict[str, DnsStatus] = field(default_factory=dict)
    alias_targets: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    # Seconds until the shortest-lived answer this evidence rests on expires (DESIGN §2.1,
    # §3.4); None when nothing came from DNS (static policy evidence only).
    ttl: int | None = None
