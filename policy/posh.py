"""POSH — PKIX over Secure HTTP (RFC 7711) as the XMPP prooftype of RFC 7712 §5.2: the pure half.

A peer domain D that cannot get a certificate naming D onto its XMPP servers (typically a
domain hosted by a provider) publishes, on its *web* server, which certificate its XMPP
servers present:

    GET https://D/.well-known/posh/xmpp-server.json
    {"fingerprints": [{"sha-256": "<base64>", "sha-512": "<base64>"}], "expires": 604800}

or delegates to the provider with a reference document (`{"url": "https://…", "expires": …}`).
The web server's own certificate is checked with ordinary PKIX for D, so POSH is exactly as
strong as PKIX for D: it moves the proof from the XMPP server to the HTTPS server.

This module has no I/O: it parses and checks a document, matches a certificate against it,
computes how long a result may be cached, and holds the `PoshResult` value that `decide()`
consumes.  The fetch is `proxy.posh_fetch`.
"""
from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from policy.pkix_names import normalise_domain

__all__ = [
    "MAX_CACHE_SECONDS", "PoshDocument", "PoshError", "PoshReference", "PoshResult", "PoshStatus",
    "Fingerprint", "SERVICE", "cache_seconds", "certificate_digest", "is_hostname", "match_certificate",
    "parse_document", "parse_reference", "posh_url",
]

# RFC 7712 §5.2: the POSH service name for server-to-server XMPP.
SERVICE = "xmpp-server"
# RFC 7711 §3: the well-known URI is /.well-known/posh/<service>.json on the source domain.
WELL_KNOWN_PATH = f"/.well-known/posh/{SERVICE}.json"

# RFC 7711 §3.1: descriptor member names are entries of IANA's "Hash Function Textual Names"
# registry.  We use the SHA-2 members; md2/md5/sha-1 are broken and sha-224 adds nothing, so
# they are skipped like an unknown name.  Ordered strongest first: a descriptor describes one
# certificate, and of several digests only the strongest is compared (the digest-agility rule
# of RFC 7671 §9, which is also what Prosody's mod_s2s_auth_posh does).
HASHES: dict[str, tuple[object, int]] = {
    "sha-512": (hashlib.sha512, 64),
    "sha-384": (hashlib.sha384, 48),
    "sha-256": (hashlib.sha256, 32),
}
_WEAK_HASHES = ("md2", "md5", "sha-1", "sha-224")

# RFC 7711 §6 lets a client cache for less than `expires`.  A day is the longest we keep a POSH
# document, as the resolver keeps DNS answers (unbound's cache-max-ttl): a peer that changes its
# certificate and its document is believed within a day whatever `expires` it once announced.
MAX_CACHE_SECONDS = 86400


# A host name an https URL can carry and a certificate can name (LDH labels, RFC 1123 §2.1).
_HOSTNAME = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*$")


def is_hostname(name: str) -> bool:
    """Whether `name` (A-label, lower case) is a host name we may put in an https URL."""
    return len(name) <= 253 and bool(_HOSTNAME.match(name))


class PoshError(ValueError):
    """A POSH document (or `url` reference) is malformed; the message says what is wrong."""


class PoshStatus(str, enum.Enum):
    """Outcome of a POSH fetch.  Only `ok` carries fingerprints; every other status rejects."""

    OK = "ok"              # a well-formed document was retrieved
    ABSENT = "absent"      # D publishes no POSH document (HTTP 404/410)
    FAILED = "failed"      # no usable document: DNS, TCP, TLS/PKIX, HTTP or JSON failure
    TIMEOUT = "timeout"    # the fetch did not finish in time

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Fingerprint:
    """One digest from a fingerprint descriptor: hash name (`sha-256`…) and raw digest."""

    algorithm: str
    digest: bytes

    def __str__(self) -> str:
        return f"{self.algorithm}:{base64.b64encode(self.digest).decode()}"


@dataclass(frozen=True)
class PoshReference:
    """A checked `url` reference (RFC 7711 §3.2): where the fingerprints really are."""

    url: str
    host: str
    port: int
    target: str      # path and query, as sent in the request line


@dataclass(frozen=True)
class PoshDocument:
    """A parsed POSH document.

    `descriptors`: one tuple of usable fingerprints per fingerprint descriptor (each descriptor
    describes one certificate — several allow a key rollover).  `reference`: set for a
    reference document instead.  `expires`: seconds, None when absent.  `notes`: entries that
    were skipped, for the operator.
    """

    descriptors: tuple[tuple[Fingerprint, ...], ...] = ()
    reference: PoshReference | None = None
    expires: int | None = None
    notes: tuple[str, ...] = ()


def posh_url(domain: str) -> str:
    """`https://D/.well-known/posh/xmpp-server.json` for peer domain D (A-label form)."""
    return f"https://{domain}{WELL_KNOWN_PATH}"


def _no_constants(name: str) -> float:
    # JSON has no NaN/Infinity; Python's parser accepts them unless told otherwise.
    raise PoshError(f"not JSON: {name} is not a JSON number")


def parse_document(data: bytes | str) -> PoshDocument:
    """Parse and check one POSH document (RFC 7711 §3.1 fingerprints, §3.2 reference).

    Raises PoshError for anything that is not such a document.  Unusable entries inside an
    otherwise good document (an unknown or weak hash name, bad base64, a digest of the wrong
    length) are skipped and listed in `notes`, as unusable TLSA records are (RFC 6698 §4.1).
    """
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        obj = json.loads(text, parse_constant=_no_constants)
    except PoshError:
        raise
    except UnicodeDecodeError:
        raise PoshError("not JSON: the body is not UTF-8") from None
    except ValueError as exc:   # JSONDecodeError, or an integer too long to convert
        raise PoshError(f"not JSON: {exc}") from None
    except RecursionError:
        raise PoshError("not JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise PoshError(f"a POSH document is a JSON object, not {_json_type(obj)}")
    expires = _parse_expires(obj)
    notes: list[str] = []
    if "fingerprints" in obj:
        if "url" in obj:
            notes.append("'url' ignored: the document has fingerprints")
        return PoshDocument(descriptors=_parse_fingerprints(obj["fingerprints"], notes),
                            expires=expires, notes=tuple(notes))
    if "url" in obj:
        if not isinstance(obj["url"], str):
            raise PoshError(f"'url' must be a string, not {_json_type(obj['url'])}")
        return PoshDocument(reference=parse_reference(obj["url"]), expires=expires)
    raise PoshError("the document has neither 'fingerprints' nor 'url'")


def _parse_expires(obj: dict) -> int | None:
    # RFC 7711 §3.1/§3.2: "expires" is the number of seconds after which the client ought to
    # consider the information stale (§6).
    if "expires" not in obj:
        return None
    value = obj["expires"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PoshError(f"'expires' must be a number of seconds, not {_json_type(value)}")
    if value < 0 or value != value or value == float("inf"):
        raise PoshError(f"'expires' must be a non-negative number of seconds ({value})")
    return int(value)


def _parse_fingerprints(value: object, notes: list[str]) -> tuple[tuple[Fingerprint, ...], ...]:
    # RFC 7711 §3.1: an array of fingerprint descriptors; each an object whose members are
    # hash function names with the base64 (RFC 4648 §4) digest of the certificate as value.
    if not isinstance(value, list):
        raise PoshError(f"'fingerprints' must be an array, not {_json_type(value)}")
    descriptors = []
    for i, descriptor in enumerate(value):
        if not isinstance(descriptor, dict):
            raise PoshError(f"fingerprints[{i}] must be an object, not {_json_type(descriptor)}")
        usable = []
        for name, digest_text in descriptor.items():
            algo = name.lower()
            if algo not in HASHES:
                notes.append(f"fingerprints[{i}].{name}: "
                             + ("weak hash, not used" if algo in _WEAK_HASHES else "unknown hash name, ignored"))
                continue
            if not isinstance(digest_text, str):
                notes.append(f"fingerprints[{i}].{name}: not a string")
                continue
            try:
                digest = base64.b64decode(digest_text, validate=True)
            except (binascii.Error, ValueError):
                notes.append(f"fingerprints[{i}].{name}: not base64")
                continue
            if len(digest) != HASHES[algo][1]:
                notes.append(f"fingerprints[{i}].{name}: {len(digest)} bytes, {algo} has {HASHES[algo][1]}")
                continue
            usable.append(Fingerprint(algo, digest))
        if usable:
            descriptors.append(tuple(sorted(usable, key=lambda f: list(HASHES).index(f.algorithm))))
        else:
            notes.append(f"fingerprints[{i}]: no usable digest")
    return tuple(descriptors)


def parse_reference(url: str) -> PoshReference:
    """Check a `url` reference (RFC 7711 §3.2): an https URL naming a host by domain name.

    IP literals are refused: the referenced server is authenticated by PKIX for the host
    *name*, and every address we connect to comes from our validating resolver.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise PoshError(f"'url' {url!r} is not a URL ({exc})") from None
    if parts.scheme.lower() != "https":
        raise PoshError(f"'url' {url!r} is not an https URL (RFC 7711 §3.2 requires HTTPS)")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise PoshError(f"'url' {url!r} names no host")
    if parts.username is not None or parts.password is not None:
        raise PoshError(f"'url' {url!r} carries credentials")
    if ":" in host or host.replace(".", "").isdigit():
        raise PoshError(f"'url' {url!r} names an IP address, not a domain")
    host = normalise_domain(host)
    if not is_hostname(host):
        raise PoshError(f"'url' {url!r} names no valid host")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return PoshReference(url=url.strip(), host=host, port=port or 443, target=target)


def certificate_digest(cert: x509.Certificate, algorithm: str) -> bytes:
    """The POSH fingerprint of `cert`: the hash of the whole DER certificate (RFC 7711 §3.1 —
    a fingerprint of the certificate, not of its SubjectPublicKeyInfo as TLSA selector 1 is)."""
    return HASHES[algorithm][0](cert.public_bytes(Encoding.DER)).digest()  # type: ignore[operator]


def match_certificate(cert: x509.Certificate,
                      descriptors: Sequence[Sequence[Fingerprint]]) -> Fingerprint | None:
    """The fingerprint that `cert` (the peer's end-entity certificate) matches, or None.

    RFC 7711 §3.3: the certificate is verified when it matches one of the descriptors.  In a
    descriptor the strongest digest present decides (see HASHES).
    """
    computed: dict[str, bytes] = {}
    for descriptor in descriptors:
        if not descriptor:
            continue
        strongest = descriptor[0]
        if strongest.algorithm not in computed:
            computed[strongest.algorithm] = certificate_digest(cert, strongest.algorithm)
        if computed[strongest.algorithm] == strongest.digest:
            return strongest
    return None


def cache_seconds(*expires: int | None) -> float:
    """How long a result built from documents with these `expires` values may be cached.

    RFC 7711 §6: never indefinitely; with a reference, the lower of the two values; a client
    may choose a lower value (we cap at MAX_CACHE_SECONDS).  `expires` 0 makes the result
    stale at once: it serves the verification it was fetched for and is not kept.  A document
    without `expires` gives no bound, and is not kept either.
    """
    if not expires or any(e is None for e in expires):
        return 0.0
    return float(min(min(e for e in expires if e is not None), MAX_CACHE_SECONDS))


@dataclass(frozen=True)
class PoshResult:
    """What POSH said about peer domain `domain`: the `decide()` input.

    `url` is where the fingerprints came from; `via` the first URL when a reference was
    followed.  `reason` describes a failure (or the document, when ok).  `cache_seconds` is
    how long the result may be reused (0: not at all); `from_cache` marks a reused result.
    """

    domain: str
    status: PoshStatus
    descriptors: tuple[tuple[Fingerprint, ...], ...] = ()
    url: str = ""
    via: str | None = None
    reason: str = ""
    cache_seconds: float = 0.0
    from_cache: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.status is PoshStatus.OK

    @property
    def fingerprints(self) -> tuple[Fingerprint, ...]:
        """Every usable fingerprint, flattened (for display)."""
        return tuple(f for d in self.descriptors for f in d)

    def match(self, cert: x509.Certificate) -> Fingerprint | None:
        """The fingerprint `cert` matches; None if none does or the fetch did not succeed."""
        return match_certificate(cert, self.descriptors) if self.ok else None

    def source(self) -> str:
        """`URL` or `URL (via FIRST-URL)`, for reasons and logs."""
        return f"{self.url} (via {self.via})" if self.via else self.url

    def describe(self) -> str:
        """One line for logs and `check`."""
        if not self.ok:
            return f"{self.status}: {self.reason}"
        n = len(self.descriptors)
        keep = f"cached for {self.cache_seconds:g} s" if self.cache_seconds > 0 else "not cached"
        return (f"ok: {n} certificate fingerprint{'s' if n != 1 else ''} at {self.source()}"
                f" ({keep}{', from cache' if self.from_cache else ''})")


def _json_type(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
