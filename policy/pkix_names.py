"""RFC 6125 identity matching with the XMPP profile (RFC 6120 §13.7.1.2, RFC 7590, RFC 7673).

Presented identifiers come from the leaf's subjectAltName only: DNS-ID, SRV-ID
(id-on-dnsSRV) and XmppAddr (id-on-xmppAddr).  The subject CN is never consulted: RFC 9525
§6.1 retired the CN-ID fallback, and an XMPP server certificate without SANs cannot be told
apart from a client's.  DNS-ID and SRV-ID matching is service-identity's; XmppAddr is ours,
as service-identity does not know it.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import idna
from cryptography import x509
from cryptography.x509.oid import ExtensionOID, ObjectIdentifier
from service_identity.exceptions import CertificateError
from service_identity.hazmat import DNS_ID, SRV_ID, DNSPattern, SRVPattern

# RFC 6120 §13.7.1.4: id-on-xmppAddr otherName, a UTF8String holding a JID.
ID_ON_XMPPADDR = ObjectIdentifier("1.3.6.1.5.5.7.8.5")
# RFC 4985 §2: id-on-dnsSRV otherName, an IA5String "_service.name".
ID_ON_DNSSRV = ObjectIdentifier("1.3.6.1.5.5.7.8.7")
# RFC 6120 §13.7.1.2.1 names the SRV-ID service `_xmpp-server`; XEP-0368 §3 uses
# `_xmpps-server` for Direct TLS, so either proves the domain.
SRV_SERVICES = ("xmpp-server", "xmpps-server")

_DER_UTF8STRING, _DER_IA5STRING = 0x0C, 0x16


@functools.lru_cache(maxsize=4096)
def normalise_domain(domain: str) -> str:
    """IDNA A-label, lower case, no trailing dot (DESIGN §2.1)."""
    domain = domain.strip().rstrip(".")
    try:
        return idna.encode(domain, uts46=True).decode("ascii").lower()
    except idna.IDNAError:
        # Names with underscores or other non-hostname characters: compare them verbatim.
        return domain.lower()


def _der_string(value: bytes, tag: int) -> str | None:
    """Decode one DER string TLV of the given tag; None if it is anything else."""
    if len(value) < 2 or value[0] != tag:
        return None
    length, offset = value[1], 2
    if length & 0x80:
        nbytes = length & 0x7F
        if nbytes == 0 or nbytes > 4 or len(value) < 2 + nbytes:
            return None
        length, offset = int.from_bytes(value[2:2 + nbytes], "big"), 2 + nbytes
    if offset + length != len(value):
        return None
    try:
        return value[offset:].decode("utf-8" if tag == _DER_UTF8STRING else "ascii")
    except UnicodeDecodeError:
        return None


@dataclass(frozen=True)
class PresentedIds:
    """The identifiers a certificate presents, as text (for reasons and logs) and as patterns."""

    dns: tuple[str, ...]
    srv: tuple[str, ...]
    xmpp: tuple[str, ...]

    def describe(self) -> str:
        parts = [f"DNS:{d}" for d in self.dns] + [f"SRV:{s}" for s in self.srv]
        parts += [f"XmppAddr:{j}" for j in self.xmpp]
        return ", ".join(parts) or "no subjectAltName identities"


def presented_ids(cert: x509.Certificate) -> PresentedIds:
    """Collect DNS-IDs, SRV-IDs and XmppAddrs from the subjectAltName of `cert`."""
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except (x509.ExtensionNotFound, ValueError):
        return PresentedIds((), (), ())
    srv, xmpp = [], []
    for other in san.get_values_for_type(x509.OtherName):
        if other.type_id == ID_ON_DNSSRV:
            text = _der_string(other.value, _DER_IA5STRING)
            if text:
                srv.append(text)
        elif other.type_id == ID_ON_XMPPADDR:
            text = _der_string(other.value, _DER_UTF8STRING)
            if text:
                xmpp.append(text)
    return PresentedIds(tuple(san.get_values_for_type(x509.DNSName)), tuple(srv), tuple(xmpp))


def _dns_matches(pattern_text: str, reference: str) -> bool:
    # RFC 9525 §6.3 / DESIGN §2.3: a wildcard only as the whole left-most label, matching
    # exactly one label; service-identity rejects other placements and matches no partial
    # wildcard such as `x*.example.net`.
    try:
        pattern = DNSPattern.from_bytes(pattern_text.encode("ascii"))
        return DNS_ID(reference).verify(pattern)
    except (CertificateError, ValueError, UnicodeEncodeError):
        return False


def _srv_matches(pattern_text: str, service: str, reference: str) -> bool:
    # RFC 6125 §6.5.1: the service label must match exactly; the name part as a DNS-ID.
    try:
        pattern = SRVPattern.from_bytes(pattern_text.encode("ascii"))
        return SRV_ID(f"_{service}.{reference}").verify(pattern)
    except (CertificateError, ValueError, UnicodeEncodeError):
        return False


def _xmpp_matches(jid: str, reference: str) -> bool:
    # RFC 6120 §13.7.1.4: for a server, the XmppAddr is a bare domainpart, compared after
    # IDNA normalisation.  No wildcards: a JID has no wildcard syntax.
    if "@" in jid or "/" in jid or "*" in jid:
        return False
    return normalise_domain(jid) == reference


def match_identity(cert: x509.Certificate, references: Sequence[str]) -> str | None:
    """Return the first reference identifier that `cert` proves, as `TYPE:value`, else None.

    `references` are the peer domain D first, then its securely delegated SRV targets
    (RFC 7673 §4).  SRV-IDs are only checked against D: an SRV-ID names the service domain.
    """
    ids = presented_ids(cert)
    refs = [normalise_domain(r) for r in references]
    for ref in refs:
        for name in ids.dns:
            if _dns_matches(name, ref):
                return f"DNS:{name}"
        for jid in ids.xmpp:
            if _xmpp_matches(jid, ref):
                return f"XmppAddr:{jid}"
    if refs:
        for name in ids.srv:
            for service in SRV_SERVICES:
                if _srv_matches(name, service, refs[0]):
                    return f"SRV:{name}"
    return None


def references_for(domain: str, delegated: Iterable[str]) -> list[str]:
    """D first, then the securely delegated targets without duplicates."""
    out = [normalise_domain(domain)]
    for target in delegated:
        t = normalise_domain(target)
        if t not in out:
            out.append(t)
    return out
