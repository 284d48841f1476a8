"""TLSA records (RFC 6698 §2): parsing, usability (DESIGN §2.2), digest agility (RFC 7671 §9).

Records reach us from three places: DNS wire format (via dnspython), policy files and the
command line.  The latter two are written by people, so the parser accepts what operators put
in zone files: hex in any case, split by whitespace, and the RFC 7218 mnemonics
(`DANE-EE SPKI SHA2-256`).  A record that cannot be parsed is not an error of the whole
decision: it becomes a `MalformedTlsa`, which the verdict ignores and names in its reason.
"""
from __future__ import annotations

import binascii
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from policy.spki import spki_der

# RFC 6698 §2.1.1 / RFC 7218 §2.1: certificate usages.
PKIX_TA, PKIX_EE, DANE_TA, DANE_EE = 0, 1, 2, 3
# RFC 6698 §2.1.2 / RFC 7218 §2.2: selectors.
SEL_CERT, SEL_SPKI = 0, 1
# RFC 6698 §2.1.3 / RFC 7218 §2.3: matching types.
MT_FULL, MT_SHA256, MT_SHA512 = 0, 1, 2

USAGE_NAMES = {PKIX_TA: "PKIX-TA", PKIX_EE: "PKIX-EE", DANE_TA: "DANE-TA", DANE_EE: "DANE-EE"}
_USAGE_MNEMONICS = {"PKIX-TA": 0, "PKIX-EE": 1, "DANE-TA": 2, "DANE-EE": 3, "PRIVCERT": 255}
_SELECTOR_MNEMONICS = {"CERT": 0, "SPKI": 1, "PRIVSEL": 255}
_MTYPE_MNEMONICS = {"FULL": 0, "SHA2-256": 1, "SHA2-512": 2, "PRIVMATCH": 255}

# RFC 6698 §2.1.3: the digest lengths that make a SHA2-256 / SHA2-512 record well-formed.
_DIGEST_LENGTH = {MT_SHA256: 32, MT_SHA512: 64}
# RFC 7671 §9: among digest matching types the stronger wins; Full(0) is not a digest.
_DIGEST_STRENGTH = {MT_SHA256: 1, MT_SHA512: 2}


class TlsaSyntaxError(ValueError):
    """A TLSA record in presentation form that cannot be parsed."""


@dataclass(frozen=True)
class TlsaRecord:
    """One TLSA record: certificate usage, selector, matching type, association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


@dataclass(frozen=True)
class MalformedTlsa:
    """A record that could not even be parsed; kept so the verdict's reason can name it."""

    text: str
    error: str

    def __str__(self) -> str:
        return self.text


def _field(token: str, mnemonics: dict[str, int], what: str) -> int:
    upper = token.upper()
    if upper in mnemonics:
        return mnemonics[upper]
    if not token.isdigit() or int(token) > 255:
        raise TlsaSyntaxError(f"{what} {token!r} is neither 0-255 nor a mnemonic")
    return int(token)


def parse_tlsa(text: str) -> TlsaRecord:
    """Parse `U S M HEX` (RFC 6698 §2.2); HEX may be in any case and split by whitespace."""
    tokens = text.split()
    if len(tokens) < 4:
        raise TlsaSyntaxError(f"TLSA record {text!r} needs 4 fields: usage selector mtype data")
    usage = _field(tokens[0], _USAGE_MNEMONICS, "usage")
    selector = _field(tokens[1], _SELECTOR_MNEMONICS, "selector")
    mtype = _field(tokens[2], _MTYPE_MNEMONICS, "matching type")
    hexdata = "".join(tokens[3:])
    try:
        data = binascii.unhexlify(hexdata)
    except (binascii.Error, ValueError):
        raise TlsaSyntaxError(f"TLSA data {hexdata[:20]!r}… is not hexadecimal") from None
    if not data:
        raise TlsaSyntaxError("TLSA association data is empty")
    return TlsaRecord(usage, selector, mtype, data)


def parse_tlsa_lenient(text: str) -> TlsaRecord | MalformedTlsa:
    """Parse a record; a syntax error yields a `MalformedTlsa` instead of an exception."""
    try:
        return parse_tlsa(text)
    except TlsaSyntaxError as exc:
        return MalformedTlsa(text.strip(), str(exc))


def selected_data(cert: x509.Certificate, selector: int) -> bytes:
    """The bytes a selector picks from a certificate (RFC 6698 §2.1.2)."""
    if selector == SEL_CERT:
        return cert.public_bytes(serialization.Encoding.DER)
    return spki_der(cert)   # as encoded in the certificate (policy/spki.py says why)


def association_data(cert: x509.Certificate, selector: int, mtype: int) -> bytes:
    """The association data a TLSA record of this selector/mtype has for `cert`."""
    raw = selected_data(cert, selector)
    if mtype == MT_SHA256:
        return hashlib.sha256(raw).digest()
    if mtype == MT_SHA512:
        return hashlib.sha512(raw).digest()
    return raw


def record_for(cert: x509.Certificate, usage: int = DANE_EE, selector: int = SEL_SPKI,
               mtype: int = MT_SHA256) -> TlsaRecord:
    """The TLSA record that designates `cert` (used by the `tlsa` command)."""
    return TlsaRecord(usage, selector, mtype, association_data(cert, selector, mtype))


def matches(record: TlsaRecord, cert: x509.Certificate) -> bool:
    """True if `record`'s association data designates `cert` (RFC 6698 §2.1)."""
    return association_data(cert, record.selector, record.mtype) == record.data


def unusable_reason(record: TlsaRecord | MalformedTlsa, dane_uses: Iterable[int]) -> str | None:
    """Why a record is unusable under DESIGN §2.2, or None if it is usable."""
    if isinstance(record, MalformedTlsa):
        return f"malformed ({record.error})"
    if record.usage not in dane_uses:
        name = USAGE_NAMES.get(record.usage, f"usage {record.usage}")
        return f"{name} not enabled by policy"
    if record.selector not in (SEL_CERT, SEL_SPKI):
        return f"unknown selector {record.selector}"
    if record.mtype not in (MT_FULL, MT_SHA256, MT_SHA512):
        return f"unknown matching type {record.mtype}"
    if record.mtype in _DIGEST_LENGTH and len(record.data) != _DIGEST_LENGTH[record.mtype]:
        return f"digest is {len(record.data)} bytes, expected {_DIGEST_LENGTH[record.mtype]}"
    if record.mtype == MT_FULL and full_object(record) is None:
        what = "certificate" if record.selector == SEL_CERT else "public key"
        return f"Full(0) data is not a DER {what}"
    return None


def full_object(record: TlsaRecord):
    """For a Full(0) record, the certificate (selector 0) or public key (selector 1) it holds."""
    try:
        if record.selector == SEL_CERT:
            return x509.load_der_x509_certificate(record.data)
        return serialization.load_der_public_key(record.data)
    except (ValueError, TypeError):
        return None


@dataclass(frozen=True)
class UsableSet:
    """The records that take part in matching, and the ones set aside (with why)."""

    usable: tuple[TlsaRecord, ...]
    ignored: tuple[tuple[str, str], ...]  # (record text, reason)


def usable_records(records: Sequence[TlsaRecord | MalformedTlsa], dane_uses: Iterable[int]) -> UsableSet:
    """Apply DESIGN §2.2's usability rules, then digest agility (RFC 7671 §9).

    RFC 7671 §9: a client that supports several digest algorithms uses, per usage/selector
    pair, only the records of the strongest digest it supports that are present, so a
    publisher can phase out SHA2-256 by adding SHA2-512.  Full(0) records are not digests and
    are never dropped by this rule.  Agility is applied after the usability filter: a broken
    SHA2-512 record must not suppress a good SHA2-256 one.
    """
    uses = frozenset(dane_uses)
    usable: list[TlsaRecord] = []
    ignored: list[tuple[str, str]] = []
    for rec in records:
        why = unusable_reason(rec, uses)
        if why is None:
            usable.append(rec)  # type: ignore[arg-type]
        else:
            ignored.append((str(rec), why))
    strongest: dict[tuple[int, int], int] = {}
    for rec in usable:
        if rec.mtype in _DIGEST_STRENGTH:
            key = (rec.usage, rec.selector)
            strongest[key] = max(strongest.get(key, 0), _DIGEST_STRENGTH[rec.mtype])
    kept: list[TlsaRecord] = []
    for rec in usable:
        if rec.mtype in _DIGEST_STRENGTH and _DIGEST_STRENGTH[rec.mtype] < strongest[(rec.usage, rec.selector)]:
            ignored.append((str(rec), "superseded by a stronger digest (RFC 7671 §9)"))
        else:
            kept.append(rec)
    return UsableSet(tuple(kept), tuple(ignored))
