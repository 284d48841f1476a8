"""The TLSA values a presented chain itself has, shown beside the published records when they
do not match (as posttls-finger and ldns-dane do): an operator then sees at once whether the
zone holds an old key, the wrong selector, or the digest of some other certificate.

For the leaf: the DANE-EE forms `3 1 1`, `3 1 2`, `3 0 1`, `3 0 2` (RFC 7671 §5.1 recommends
`3 1 1`); for every certificate above it: the DANE-TA forms `2 1 1`, `2 0 1`, `2 1 2`, `2 0 2`
(RFC 7671 §5.2).  Values are printed in full: a record is compared by all of its bytes.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509

from policy.tlsa import (DANE_EE, DANE_TA, MT_SHA256, MT_SHA512, SEL_CERT, SEL_SPKI, MalformedTlsa,
                         TlsaRecord, record_for)

__all__ = ["ChainValue", "chain_values", "mismatch_lines"]

# Digest forms only: a Full(0) value is a whole DER object, useless to read beside a digest.
_FORMS = ((SEL_SPKI, MT_SHA256), (SEL_SPKI, MT_SHA512), (SEL_CERT, MT_SHA256), (SEL_CERT, MT_SHA512))


@dataclass(frozen=True)
class ChainValue:
    """One TLSA record the certificate at `depth` (0 = leaf) of a chain would match."""

    depth: int
    subject: str
    record: TlsaRecord


def chain_values(chain: Sequence[x509.Certificate]) -> list[ChainValue]:
    """`3 S M` values of the leaf and `2 S M` values of each certificate above it."""
    out: list[ChainValue] = []
    for depth, cert in enumerate(chain):
        usage = DANE_EE if depth == 0 else DANE_TA
        subject = cert.subject.rfc4514_string()
        out += [ChainValue(depth, subject, record_for(cert, usage, s, m)) for s, m in _FORMS]
    return out


def mismatch_lines(chain: Sequence[x509.Certificate],
                   published: Sequence[TlsaRecord | MalformedTlsa], *, indent: str = "  ") -> list[str]:
    """Published records and the chain's own values, in full, one per line.

    A published record that equals one of the chain's values is marked `=` (it matches that
    certificate by content; if the verdict still rejects, the reason is elsewhere, e.g. a
    DANE-TA name or path check)."""
    values = chain_values(chain)
    own = {str(v.record) for v in values}
    lines = [f"{indent}published TLSA:"]
    lines += [f"{indent}  {'=' if str(r) in own else ' '} {r}" for r in published] or [f"{indent}    (none)"]
    lines.append(f"{indent}presented chain's own values:")
    last = -1
    for v in values:
        if v.depth != last:
            lines.append(f"{indent}  [{v.depth}] {v.subject}")
            last = v.depth
        lines.append(f"{indent}      {v.record}")
    return lines
