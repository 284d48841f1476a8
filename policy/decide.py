"""The one decision: (presented chain, DNS evidence, policy) → Verdict (DESIGN §2.2–§2.5)."""
from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence

from cryptography import x509

from policy.dane import authenticate
from policy.evidence import DnsStatus, Evidence
from policy.pkix import TrustStore, validate_path
from policy.pkix_names import match_identity, presented_ids, references_for
from policy.policyfile import Policy
from policy.tlsa import UsableSet, usable_records
from policy.verdict import Verdict, accept, reject


def decide(
    chain: Sequence[x509.Certificate],
    evidence: Evidence,
    policy: Policy,
    *,
    trust: TrustStore | None,
    now: _dt.datetime | None = None,
) -> Verdict:
    """Decide whether the peer that presented `chain` (leaf first) may speak for `evidence.domain`."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    domain = evidence.domain
    dns = {name: str(status) for name, status in evidence.statuses.items()}
    if evidence.tlsa_status is not None:
        dns["tlsa"] = str(evidence.tlsa_status)

    def no(reason: str) -> Verdict:
        return reject(reason, dns=dns, policy_source=policy.source)

    def yes(prooftype: str, reason: str, **kw) -> Verdict:
        return accept(prooftype, reason, dns=dns, policy_source=policy.source, **kw)

    if policy.require == "block":
        return no(f"{domain} is blocked by policy ({policy.source})")

    # DESIGN §2.4: bogus or timed-out evidence rejects in every mode, `pkix` and `tls`
    # included.  A validating resolver that cannot prove an answer is a sign of tampering
    # or breakage, never a reason to fall back to a weaker rule (RFC 7672 §2.1.1).
    failed = [f"{name} is {status}" for name, status in evidence.statuses.items() if status.failed]
    if evidence.tlsa_status is not None and evidence.tlsa_status.failed:
        failed.append(f"TLSA is {evidence.tlsa_status}")
    if failed:
        return no("DNSSEC evidence failed (" + ", ".join(failed) + "); failing closed")

    usable = _usable(evidence, policy)
    references = references_for(domain, evidence.delegated_targets)

    if policy.require == "pkix":
        return _pkix(chain, references, trust, now, yes, no, note="")

    if usable is not None and usable.usable:
        # DESIGN §2.2 / RFC 7672 §2.2: with usable secure TLSA records, DANE alone decides.
        # Failing to match is final — no PKIX fallback, which is what stops a downgrade.
        if not chain:
            return no("usable TLSA records exist but the peer presented no certificate")
        result = authenticate(chain, usable.usable, references, trust=trust, now=now)
        if result.ok:
            return yes(result.prooftype, result.reason, matched=result.matched, identity=result.identity)
        return no(result.reason + _ignored_note(usable) + "; no fallback to PKIX")

    why_no_dane = _why_no_dane(evidence, usable)
    if policy.require == "dane":
        return no(f"require=dane but {why_no_dane}")
    if policy.require == "tls":
        return yes("tls", f"TLS in use; {why_no_dane}; identity left to dialback")
    return _pkix(chain, references, trust, now, yes, no, note=f" ({why_no_dane})")


def _usable(evidence: Evidence, policy: Policy) -> UsableSet | None:
    # Only DNSSEC-secure TLSA records may be used (RFC 6698 §4.1, RFC 7672 §2.2): an
    # insecure RRset could have been forged and is treated as absent.
    if evidence.tlsa_status is not DnsStatus.SECURE:
        return None
    return usable_records(evidence.tlsa, policy.dane_uses)


def _ignored_note(usable: UsableSet) -> str:
    if not usable.ignored:
        return ""
    return "; ignored: " + "; ".join(f"{text[:24]}… ({why})" if len(text) > 24 else f"{text} ({why})"
                                     for text, why in usable.ignored)


def _why_no_dane(evidence: Evidence, usable: UsableSet | None) -> str:
    if evidence.tlsa_status is None:
        return "no TLSA lookup applies (no secure delegation)"
    if evidence.tlsa_status is DnsStatus.INSECURE:
        return "TLSA records are not DNSSEC-signed (insecure), ignored" if evidence.tlsa else \
            "no DNSSEC-secure TLSA (insecure answer)"
    if usable is not None and usable.ignored:
        return "no usable TLSA record" + _ignored_note(usable)
    return "no TLSA records published"


def _pkix(chain, references, trust, now, yes, no, *, note: str) -> Verdict:
    # DESIGN §2.3: full path validation to the trust store, then RFC 6125/6120 §13.7 names.
    if not chain:
        return no("no certificate presented; PKIX needs one" + note)
    if trust is None:
        return no("no PKIX trust store configured" + note)
    path = validate_path(chain, trust.anchors, now)
    if not path.ok:
        return no(f"PKIX: chain does not verify: {path.error}{note}")
    identity = match_identity(chain[0], references)
    if identity is None:
        return no(f"PKIX: leaf names none of {', '.join(references)} "
                  f"(presents {presented_ids(chain[0]).describe()}){note}")
    anchor = path.path[-1].subject.rfc4514_string()
    return yes("pkix", f"PKIX: chain verifies to {anchor}, leaf presents {identity}{note}", identity=identity)
