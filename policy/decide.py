"""The one decision: (presented chain, DNS evidence, policy[, POSH]) → Verdict (DESIGN §2.2–§2.5).

POSH (RFC 7711, RFC 7712 §5.2) enters as an optional, already-fetched `PoshResult`:
`require = "posh"` demands a POSH match; `posh = true` lets a POSH match count wherever PKIX
would (`pkix`, and `dane-or-pkix` when no usable secure TLSA exists).  Anything but a fetched
document whose fingerprint matches the leaf is no POSH proof.
"""
from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence

from cryptography import x509

from policy.dane import authenticate
from policy.evidence import DnsStatus, Evidence
from policy.pkix import TrustStore, validate_path
from policy.pkix_names import match_identity, presented_ids, references_for
from policy.policyfile import Policy
from policy.posh import PoshResult
from policy.tlsa import UsableSet, usable_records
from policy.verdict import Verdict, accept, reject


def decide(
    chain: Sequence[x509.Certificate],
    evidence: Evidence,
    policy: Policy,
    *,
    trust: TrustStore | None,
    now: _dt.datetime | None = None,
    posh: PoshResult | None = None,
) -> Verdict:
    """Decide whether the peer that presented `chain` (leaf first) may speak for `evidence.domain`.

    `posh` is the POSH result for the domain, when the policy uses POSH and it was fetched
    (`posh_consulted` says when it is worth fetching); None means no POSH proof."""
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
    failed = _failures(evidence)
    if failed:
        # Notes name the cause where one is known (e.g. the resolver that failed its
        # DNSSEC probe, DESIGN §2.1 item 5).
        notes = "".join(f"; {note}" for note in evidence.notes)
        return no("DNSSEC evidence failed (" + ", ".join(failed) + ")" + notes + "; failing closed")

    usable = _usable(evidence, policy)
    references = references_for(domain, evidence.delegated_targets)

    if policy.require == "posh":
        # `require = "posh"`: like `pkix`, one named proof decides and TLSA are not consulted;
        # here the proof is POSH (RFC 7712 §5.2) and nothing else counts.
        return _posh(chain, domain, posh, yes, no, prefix="")

    if policy.require == "pkix":
        return _pkix_or_posh(chain, domain, references, trust, now, yes, no, policy, posh, note="")

    if usable is not None and usable.usable:
        # DESIGN §2.2 / RFC 7672 §2.2: with usable secure TLSA records, DANE alone decides.
        # Failing to match is final — no PKIX fallback, which is what stops a downgrade.
        if not chain:
            return no("usable TLSA records exist but the peer presented no certificate")
        # RFC 7671 §7: a secure CNAME expansion whose TLSA RRset is used is a reference
        # identifier for DANE-TA(2) too (in addition to the original name); PKIX never sees it.
        dane_references = references_for(domain, (*evidence.delegated_targets, *evidence.alias_targets))
        result = authenticate(chain, usable.usable, dane_references, trust=trust, now=now)
        if result.ok:
            return yes(result.prooftype, result.reason, matched=result.matched, identity=result.identity)
        return no(result.reason + _ignored_note(usable) + "; no fallback to PKIX")

    why_no_dane = _why_no_dane(evidence, usable)
    if policy.require == "dane":
        return no(f"require=dane but {why_no_dane}")
    if policy.require == "tls":
        return yes("tls", f"TLS in use; {why_no_dane}; identity left to dialback")
    return _pkix_or_posh(chain, domain, references, trust, now, yes, no, policy, posh, note=f" ({why_no_dane})")


def posh_consulted(chain: Sequence[x509.Certificate], evidence: Evidence, policy: Policy) -> bool:
    """Whether `decide()` would look at a POSH result for this input — so whether a fetch is
    worth making.  Mirrors decide's branches: never for a blocked domain, failed evidence, no
    certificate, a mode without POSH, or `dane-or-pkix` with usable secure TLSA (DANE decides)."""
    if not chain or policy.require == "block" or _failures(evidence):
        return False
    if policy.require == "posh":
        return True
    if not policy.posh or policy.require not in ("pkix", "dane-or-pkix"):
        return False
    if policy.require == "dane-or-pkix":
        usable = _usable(evidence, policy)
        return usable is None or not usable.usable
    return True


def _failures(evidence: Evidence) -> list[str]:
    failed = [f"{name} is {status}" for name, status in evidence.statuses.items() if status.failed]
    if evidence.tlsa_status is not None and evidence.tlsa_status.failed:
        failed.append(f"TLSA is {evidence.tlsa_status}")
    return failed


def _pkix_or_posh(chain, domain: str, references, trust, now, yes, no, policy: Policy,
                  posh: PoshResult | None, *, note: str) -> Verdict:
    # `posh = true`: a POSH match counts wherever PKIX would.  PKIX is tried first (it needs
    # no fetch); its reason stays first in a rejection, so the reason category is PKIX's.
    verdict = _pkix(chain, references, trust, now, yes, no, note=note)
    if verdict.accepted or not policy.posh or not chain:
        return verdict
    return _posh(chain, domain, posh, yes, no, prefix=verdict.reason + "; ", after=f" ({verdict.reason})")


def _posh(chain, domain: str, posh: PoshResult | None, yes, no, *, prefix: str, after: str = "") -> Verdict:
    # RFC 7711 §3.3 / RFC 7712 §5.2: the peer is verified for D when its end-entity
    # certificate matches a fingerprint of D's POSH document.  No name, date or chain check:
    # the document, fetched over PKIX-verified HTTPS from D, is the binding (as a DANE-EE
    # record is).  A document that could not be fetched proves nothing: never an accept.
    if not chain:
        return no(prefix + "no certificate presented; POSH needs one")
    if posh is None:
        return no(prefix + "POSH: not consulted (no POSH fetch was made)")
    if posh.domain != domain:
        return no(prefix + f"POSH: the result is for {posh.domain}, not {domain}")
    if not posh.ok:
        return no(prefix + f"POSH: {posh.status}: {posh.reason}")
    match = posh.match(chain[0])
    if match is None:
        n = len(posh.descriptors)
        return no(prefix + f"POSH: leaf certificate matches none of the {n} fingerprint"
                  f"{'s' if n != 1 else ''} at {posh.source()}")
    kept = "" if posh.cache_seconds > 0 else "; document not cached (expires 0 or absent)"
    return yes("posh", f"POSH: leaf certificate matches {match.algorithm} fingerprint at {posh.source()}"
                       f"{kept}{after}")


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
