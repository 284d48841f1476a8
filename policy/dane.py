"""DANE authentication of a certificate chain by usable TLSA records (RFC 6698, 7671, 7672 §3, 7673).

Input is the chain as presented (leaf first) and the records that survived `tlsa.usable_records`.
Any one matching record authenticates (RFC 6698 §4.1; RFC 7671 §5).  The caller decides what a
failure means; by DESIGN §2.2 usable-but-unmatched records never fall back to PKIX.
"""
from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509

from policy import tlsa
from policy.pkix import TrustStore, signed_by_key, validate_path
from policy.pkix_names import match_identity, presented_ids
from policy.tlsa import TlsaRecord

# Try the cheapest proofs first; the first success is the verdict.
_USAGE_ORDER = (tlsa.DANE_EE, tlsa.DANE_TA, tlsa.PKIX_EE, tlsa.PKIX_TA)
PROOFTYPES = {tlsa.DANE_EE: "dane-ee", tlsa.DANE_TA: "dane-ta", tlsa.PKIX_EE: "pkix-ee", tlsa.PKIX_TA: "pkix-ta"}


@dataclass(frozen=True)
class DaneResult:
    """The record that authenticated the chain (and how), or why none did."""

    matched: TlsaRecord | None
    prooftype: str | None
    identity: str | None
    reason: str

    @property
    def ok(self) -> bool:
        return self.matched is not None


def short(record: TlsaRecord) -> str:
    """`3 1 1 0c72ac70…` — enough of a record to find it in a zone file."""
    text = str(record)
    return text if len(text) <= 24 else text[:22] + "…"


def authenticate(
    chain: Sequence[x509.Certificate],
    records: Sequence[TlsaRecord],
    references: Sequence[str],
    *,
    trust: TrustStore | None,
    now: _dt.datetime,
) -> DaneResult:
    """Authenticate `chain` against usable `records`; `references` = D then delegated targets."""
    failures: list[str] = []
    ordered = sorted(records, key=lambda r: _USAGE_ORDER.index(r.usage))
    pkix_cache: list = []
    for rec in ordered:
        if rec.usage == tlsa.DANE_EE:
            result = _dane_ee(chain, rec)
        elif rec.usage == tlsa.DANE_TA:
            result = _dane_ta(chain, rec, references, now)
        else:
            result = _pkix_usage(chain, rec, references, trust, now, pkix_cache)
        if result.ok:
            return result
        failures.append(f"{short(rec)}: {result.reason}")
    return DaneResult(None, None, None, "no usable TLSA record matches (" + "; ".join(failures) + ")")


def _dane_ee(chain: Sequence[x509.Certificate], rec: TlsaRecord) -> DaneResult:
    # RFC 7671 §5.1: DANE-EE(3) binds the leaf alone; name checks and validity dates do
    # not apply, and no chain is built.
    if tlsa.matches(rec, chain[0]):
        what = "certificate" if rec.selector == tlsa.SEL_CERT else "public key"
        return DaneResult(rec, "dane-ee", None, f"DANE-EE: leaf {what} matches {short(rec)}")
    return DaneResult(None, None, None, "leaf does not match")


def _name_check(leaf: x509.Certificate, references: Sequence[str]) -> str | None:
    return match_identity(leaf, references)


def _name_failure(leaf: x509.Certificate, references: Sequence[str]) -> str:
    return (f"leaf names none of {', '.join(references)} "
            f"(presents {presented_ids(leaf).describe()})")


def _dane_ta(chain: Sequence[x509.Certificate], rec: TlsaRecord,
             references: Sequence[str], now: _dt.datetime) -> DaneResult:
    # RFC 7671 §5.2: DANE-TA(2) designates a trust anchor that issued (perhaps via
    # intermediates) the leaf.  The anchor is a certificate of the presented chain that the
    # record matches, or — when the server did not send it — the record itself for Full(0):
    # `2 0 0` carries the certificate, `2 1 0` the bare key that signed the top of the chain
    # (RFC 7671 §5.2.2).  A digest of an anchor that was not sent cannot be used.
    # A trust anchor is an issuer: a record matching only the leaf is no DANE-TA proof
    # (OpenSSL's DANE code, the reference implementation RFC 7671 grew out of, agrees).
    anchors: list[x509.Certificate] = [c for c in chain[1:] if tlsa.matches(rec, c)]
    if not anchors and rec.mtype == tlsa.MT_FULL:
        obj = tlsa.full_object(rec)
        if rec.selector == tlsa.SEL_CERT:
            anchors = [obj] if obj != chain[0] else []
        else:
            # The anchor key is bare; the certificate it signed becomes the path's anchor,
            # once we have checked that signature ourselves.
            anchors = [c for c in chain if signed_by_key(c, obj)]
    if not anchors:
        return DaneResult(None, None, None, "no certificate in the chain matches (trust anchor not sent?)")
    # RFC 7671 §5.2.1: the path from leaf to anchor is verified as in PKIX (signatures, dates,
    # CA constraints) and the leaf must carry a reference identifier; DESIGN §2.2.
    path_error = ""
    for anchor in anchors:
        path = validate_path(chain, [anchor], now)
        if not path.ok:
            path_error = path.error or "path validation failed"
            continue
        identity = _name_check(chain[0], references)
        if identity is None:
            return DaneResult(None, None, None, "DANE-TA anchor matches but " + _name_failure(chain[0], references))
        return DaneResult(rec, "dane-ta", identity,
                          f"DANE-TA: chain verifies to anchor {short(rec)}, leaf presents {identity}")
    return DaneResult(None, None, None, f"anchor matches but the chain does not verify: {path_error}")


def _pkix_usage(chain, rec: TlsaRecord, references, trust: TrustStore | None,
                now: _dt.datetime, cache: list) -> DaneResult:
    # RFC 6698 §2.1.1: PKIX-EE(1) and PKIX-TA(0) add a DANE constraint on top of full PKIX
    # validation: the leaf (PKIX-EE) or a certificate of the validated path (PKIX-TA, the
    # anchor included) must match the record, and the usual name checks apply.
    if trust is None:
        return DaneResult(None, None, None, "no PKIX trust store")
    if not cache:
        cache.append(validate_path(chain, trust.anchors, now))
    path = cache[0]
    if not path.ok:
        return DaneResult(None, None, None, f"PKIX validation failed: {path.error}")
    candidates = [chain[0]] if rec.usage == tlsa.PKIX_EE else list(path.path)
    if not any(tlsa.matches(rec, c) for c in candidates):
        where = "leaf" if rec.usage == tlsa.PKIX_EE else "no certificate of the PKIX path"
        return DaneResult(None, None, None, f"{where} does not match")
    identity = _name_check(chain[0], references)
    if identity is None:
        return DaneResult(None, None, None, _name_failure(chain[0], references))
    name = tlsa.USAGE_NAMES[rec.usage]
    return DaneResult(rec, PROOFTYPES[rec.usage], identity,
                      f"{name}: PKIX-valid chain matches {short(rec)}, leaf presents {identity}")
