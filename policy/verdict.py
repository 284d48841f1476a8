"""The Verdict value (DESIGN §2.5): every decision the proxy takes, as data."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from policy.tlsa import TlsaRecord


@dataclass(frozen=True, slots=True)   # a stream keeps the verdicts of its pairs
class Verdict:
    """accept/reject, the prooftype that succeeded, the record and identity it rested on,
    the DNS status of each piece of evidence, and a one-line reason for a person."""

    verdict: str                       # "accept" | "reject"
    prooftype: str | None              # dane-ee, dane-ta, pkix-ee, pkix-ta, pkix, posh, tls
    matched: TlsaRecord | None
    identity: str | None               # the presented identifier that matched, "DNS:x"
    reason: str
    dns: dict[str, str] = field(default_factory=dict)
    policy_source: str = ""

    @property
    def accepted(self) -> bool:
        return self.verdict == "accept"

    def as_json_obj(self) -> dict:
        """The `verify --json` object (DESIGN §5), plus the DNS statuses."""
        return {
            "verdict": self.verdict,
            "prooftype": self.prooftype,
            "matched": str(self.matched) if self.matched else None,
            "identity": self.identity,
            "reason": self.reason,
            "dns": self.dns,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_json_obj())

    def log_fields(self) -> dict[str, str]:
        """The DESIGN §6 decision keys this verdict supplies (the caller adds direction/peer/domain)."""
        return {
            "verdict": self.verdict,
            "prooftype": self.prooftype or "-",
            "record": str(self.matched) if self.matched else "-",
            "reason": self.reason,
        }


def accept(prooftype: str, reason: str, *, matched: TlsaRecord | None = None,
           identity: str | None = None, dns: dict[str, str] | None = None,
           policy_source: str = "") -> Verdict:
    return Verdict("accept", prooftype, matched, identity, reason, dict(dns or {}), policy_source)


def reject(reason: str, *, dns: dict[str, str] | None = None, policy_source: str = "") -> Verdict:
    return Verdict("reject", None, None, None, reason, dict(dns or {}), policy_source)
