"""A certificate's SubjectPublicKeyInfo exactly as it is encoded in the certificate.

RFC 6698 §2.1.2: selector 1 matches "the DER-encoded binary structure" of the
SubjectPublicKeyInfo (RFC 5280 §4.1.2.7).  OpenSSL's DANE code hashes the encoding the
certificate carries (its X509_PUBKEY keeps the bytes it parsed), and so do the usual TLSA
generators; `cryptography` has no accessor for those bytes, and `public_key().public_bytes()`
re-encodes: it costs decoding and checking the key (an EC point) per certificate (~1 % of a stream
set-up, bench/), and an encoding the certificate did not use (an RSA AlgorithmIdentifier
without its NULL parameters, a compressed EC point) would come out different.  So the
SubjectPublicKeyInfo is cut out of the to-be-signed part by walking its DER.
"""
from __future__ import annotations

from cryptography import x509

_SEQUENCE = 0x30
_VERSION = 0xA0          # [0] EXPLICIT Version, absent in a v1 certificate
# TBSCertificate (RFC 5280 §4.1): [version,] serialNumber, signature, issuer, validity,
# subject, subjectPublicKeyInfo, ...
_BEFORE_SPKI = 5


class SpkiError(ValueError):
    """The to-be-signed certificate is not the DER this module reads."""


def _tlv(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of contents, end) of the DER element at `at`."""
    if at + 2 > len(der):
        raise SpkiError(f"a DER element at offset {at} runs past the end")
    tag, first = der[at], der[at + 1]
    if tag & 0x1F == 0x1F:
        raise SpkiError(f"a multi-byte DER tag at offset {at}")
    if first < 0x80:
        start, length = at + 2, first
    else:
        # X.690 §8.1.3.5 / §10.1: the long form, in the fewest bytes (DER), 1-4 here.
        count = first & 0x7F
        if not 1 <= count <= 4 or at + 2 + count > len(der):
            raise SpkiError(f"a DER length of {count} bytes at offset {at}")
        start, length = at + 2 + count, int.from_bytes(der[at + 2:at + 2 + count], "big")
    if start + length > len(der):
        raise SpkiError(f"a DER element at offset {at} runs past the end")
    return tag, start, start + length


def spki_der(cert: x509.Certificate) -> bytes:
    """The certificate's SubjectPublicKeyInfo, DER, byte for byte as the certificate has it."""
    tbs = cert.tbs_certificate_bytes
    tag, at, end = _tlv(tbs, 0)
    if tag != _SEQUENCE or end != len(tbs):
        raise SpkiError("the to-be-signed certificate is not one DER SEQUENCE")
    tag, start, after = _tlv(tbs, at)
    if tag == _VERSION:
        at = after
    for _ in range(_BEFORE_SPKI):
        at = _tlv(tbs, at)[2]
    tag, _, after = _tlv(tbs, at)
    if tag != _SEQUENCE or after > end:
        raise SpkiError("no SubjectPublicKeyInfo where RFC 5280 puts it")
    return tbs[at:after]


__all__ = ["SpkiError", "spki_der"]
