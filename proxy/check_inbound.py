"""`xmpp-dane-proxy check DOMAIN --inbound [--cert CHAIN]` (DESIGN §5): what the *inbound*
side does with a peer of DOMAIN that connects to us, and why.

The inbound rules differ from the outbound ones (a peer that connects to us may be any of its
targets): the TLSA records are the union of every target's secure RRset, any bogus or
timed-out piece of evidence (any target) fails the domain closed, and a domain whose SRV says
"no service" (`.`) is judged by `_5269._tcp.DOMAIN`.  Nothing here re-implements them: the
evidence comes from `proxy.server.dns_evidence` (the running proxy's `evidence_for`) and the
verdict from `proxy.posh_fetch.decide_with_posh`, exactly as `proxy.inbound` calls them.  Only
the TLS-version rule (`tls_min_version`) needs a live handshake and is not applied.

Without `--cert` the verdict is the one for a peer presenting no certificate, and the output
says what a peer must present instead.  Exit status: with `--cert`, 0 accept / 1 reject;
without, 0 when some peer can be accepted, 1 when every peer is rejected whatever it presents
(blocked, failed DNS evidence, `require = "dane"` without usable TLSA).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cryptography import x509

from policy.chain_tlsa import chain_values, mismatch_lines
from policy.decide import decide
from policy.evidence import DnsStatus, Evidence
from policy.pkix import TrustStore
from policy.pkix_names import presented_ids, references_for
from policy.policyfile import Policy, PolicySet
from policy.tlsa import usable_records
from policy.verdict import Verdict
from proxy.metrics import reason_category

__all__ = ["InboundCheck", "check_inbound"]


class InboundCheck:
    """What `check --inbound` found, for printing or as JSON."""

    def __init__(self, domain: str, policy: Policy, resolver: Any, chain: Sequence[x509.Certificate],
                 chain_source: str | None) -> None:
        self.domain = domain
        self.policy = policy
        self.resolver = resolver
        self.chain = list(chain)
        self.chain_source = chain_source
        self.evidence: Evidence | None = None
        self.verdict: Verdict | None = None

    @property
    def category(self) -> str:
        return reason_category(self.verdict) if self.verdict else "other"

    @property
    def accepted(self) -> bool:
        """With a chain: the verdict.  Without: whether any peer could be accepted (a
        rejection only for the missing certificate)."""
        if self.verdict is None:
            return False
        if self.chain:
            return self.verdict.accepted
        return self.verdict.accepted or self.category == "no-certificate"

    def requirement(self) -> str:
        """In words: what a peer of DOMAIN must present to be accepted."""
        p, ev = self.policy, self.evidence
        if self.category in ("blocked", "dnssec-bogus", "dns-timeout", "no-tlsa") and not self.verdict.accepted:
            return "nothing is accepted: " + self.verdict.reason
        if ev is not None and ev.tlsa_status is DnsStatus.SECURE and p.require != "pkix" and p.require != "posh":
            usable = usable_records(ev.tlsa, p.dane_uses).usable
            if usable:
                return (f"a chain matching one of the {len(usable)} usable TLSA record(s) above (DANE decides; "
                        f"no PKIX fallback)")
        return {
            "pkix": "a PKIX-valid chain naming one of the reference identifiers",
            "dane-or-pkix": "a PKIX-valid chain naming one of the reference identifiers (no usable TLSA)",
            "tls": "any certificate, or none: identity is left to dialback",
            "posh": "a leaf certificate matching the domain's POSH document",
        }.get(p.require, self.verdict.reason)

    def as_json_obj(self) -> dict[str, Any]:
        ev = self.evidence
        v = self.verdict
        return {
            "domain": self.domain, "direction": "inbound",
            "result": self.result,
            "policy": {"require": self.policy.require, "source": self.policy.source},
            "chain": [c.subject.rfc4514_string() for c in self.chain],
            "evidence": None if ev is None else {
                "statuses": {k: str(s) for k, s in ev.statuses.items()},
                "answers": {k: _describe(self.resolver, k, s) for k, s in ev.statuses.items()},
                "tlsa_status": str(ev.tlsa_status) if ev.tlsa_status else None,
                "tlsa": [str(r) for r in ev.tlsa],
                "reference_identifiers": list(references_for(ev.domain, ev.delegated_targets)),
            },
            "verdict": v.as_json_obj() if v else None,
            "category": self.category,
            "presented_tlsa": [{"depth": c.depth, "record": str(c.record)} for c in chain_values(self.chain)]
            if self.chain and self.category == "dane-mismatch" else None,
        }

    def render(self) -> str:
        p, ev, v = self.policy, self.evidence, self.verdict
        lines = [f"check {self.domain} --inbound (a peer of {self.domain} connecting to us)",
                 f"  policy    require={p.require} tls_min_version={p.tls_min_version} ({p.source})"
                 + " (the TLS version is checked on a live handshake only)",
                 "  resolver  " + ", ".join(
                     f"{ns} ({'AD trusted' if self.resolver.trusted(ns) else 'AD NOT trusted: nothing can be secure'})"
                     for ns in self.resolver.nameservers)]
        if self.chain:
            lines.append(f"  chain     {self.chain_source}")
            for i, cert in enumerate(self.chain):
                lines.append(f"    [{i}] {cert.subject.rfc4514_string()}; SAN: {presented_ids(cert).describe()}; "
                             f"until {cert.not_valid_after_utc:%Y-%m-%d}")
        else:
            lines.append("  chain     none given (--cert PEM): the verdict is for a peer presenting none")
        if ev is not None:
            lines.append("")
            lines.append("DNS evidence (inbound: every target's lookups; any bogus/timeout rejects)")
            width = max((len(k) for k in ev.statuses), default=0)
            for key, status in ev.statuses.items():
                lines.append(f"  {key:<{width}}  {_describe(self.resolver, key, status)}")
            lines.append(f"  TLSA (union of the targets' secure RRsets) [{ev.tlsa_status or 'no lookup applies'}]:")
            lines += [f"    {r}" for r in ev.tlsa] or ["    none"]
            lines.append("  names accepted: " + ", ".join(references_for(ev.domain, ev.delegated_targets)))
        lines.append("")
        lines.append(f"A peer must present: {self.requirement()}")
        if v is not None:
            lines.append("")
            lines.append(f"verdict    {v.verdict.upper()}" + (f" ({v.prooftype})" if v.prooftype else "")
                         + (f", record {v.matched}" if v.matched else "") + f"  [{self.category}]")
            lines.append(f"reason     {v.reason}")
            if self.chain and self.category == "dane-mismatch" and ev is not None:
                lines += mismatch_lines(self.chain, ev.tlsa, indent="  ")
        lines.append("")
        lines.append(f"RESULT: {self.result}" + ("" if self.chain else (
            f" — a peer of {self.domain} presenting what is described above is accepted" if self.accepted
            else f" — no peer of {self.domain} is accepted, whatever it presents")))
        return "\n".join(lines)

    @property
    def result(self) -> str:
        """`accept`/`reject` for a given chain; without one `possible` or `reject`."""
        if not self.chain and self.accepted:
            return "possible"
        return "accept" if self.accepted else "reject"


def _describe(resolver: Any, key: str, status: object) -> str:
    describe = getattr(resolver, "describe", None)
    return describe(key, status) if describe else str(status)


async def check_inbound(domain: str, *, resolver: Any, policies: PolicySet, trust: TrustStore | None,
                        chain: Sequence[x509.Certificate] = (), chain_source: str | None = None) -> InboundCheck:
    """The inbound verdict for a peer of `domain` presenting `chain` — the running proxy's own
    evidence gathering and decision (see the module docstring)."""
    from proxy.posh_fetch import decide_with_posh
    from proxy.server import dns_evidence

    policy = policies.for_domain(domain)
    result = InboundCheck(domain, policy, resolver, chain, chain_source)
    if policy.require == "block":
        # decide() rejects a blocked domain before looking at any evidence: nothing to look up.
        result.verdict = decide(list(chain), Evidence(domain=domain), policy, trust=trust)
        return result
    from proxy.posh_fetch import shared_fetcher

    # The POSH fetcher is shared per resolver: the real one's, as the proxy uses it.
    evidence_for = dns_evidence(resolver, posh=shared_fetcher(getattr(resolver, "inner", resolver)))
    result.evidence = await evidence_for(domain, policy)
    result.verdict, _posh = await decide_with_posh(list(chain), result.evidence, policy, trust=trust,
                                                   fetcher=evidence_for.posh)
    return result
