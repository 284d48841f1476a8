"""PKIX path validation (RFC 5280) with cryptography's X.509 verifier.

We use cryptography's Rust verifier rather than OpenSSL's: it returns the built path, takes
any certificate as an anchor (DANE-TA needs that: the anchor may be an intermediate, or a
certificate the TLSA record itself supplies) and checks every certificate's validity dates,
including the anchor's, plus basicConstraints/keyUsage for CAs.  Name matching is not done
here: XMPP's reference identifiers (SRV-ID, XmppAddr) are beyond it, see `pkix_names`.
"""
from __future__ import annotations

import datetime as _dt
import ssl
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

# Debian's bundle; used when Python's compiled-in default is absent.
_DEBIAN_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# RFC 5280 sets no limit; 8 is OpenSSL's `-verify_depth` order of magnitude and far above any
# real XMPP chain (leaf, one or two intermediates, root).
MAX_CHAIN_DEPTH = 8


class TrustStoreError(Exception):
    """The PKIX trust store could not be loaded."""


def _ee_policy() -> ExtensionPolicy:
    # RFC 7590 / DESIGN §2.3: inbound peers present as TLS *client* certificates what are
    # often server certificates carrying only the serverAuth EKU, and some carry none; the
    # Web PKI defaults would insist on the EKU matching the verifier's role.  SAN absence is
    # not a path-validation matter either: name matching fails on its own.
    return (
        ExtensionPolicy.webpki_defaults_ee()
        .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None)
        .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    )


def load_pem_bundle(data: bytes) -> list[x509.Certificate]:
    """Parse every certificate in a PEM bundle, skipping ones cryptography cannot read.

    System bundles hold a few historic roots with encodings cryptography refuses; one of them
    must not make the whole store unusable.
    """
    certs = []
    marker = b"-----END CERTIFICATE-----"
    for block in data.split(marker):
        start = block.find(b"-----BEGIN CERTIFICATE-----")
        if start < 0:
            continue
        try:
            with warnings.catch_warnings():
                # Historic roots with non-positive serials warn on every load; not our news.
                warnings.simplefilter("ignore")
                certs.append(x509.load_pem_x509_certificate(block[start:] + marker))
        except ValueError:
            continue
    return certs


@dataclass(frozen=True)
class TrustStore:
    """PKIX anchors: the system store, or the operator's `ca_file`."""

    anchors: tuple[x509.Certificate, ...]
    source: str

    @classmethod
    def load(cls, ca_file: str | Path | None = None) -> "TrustStore":
        """Load `ca_file`, or the system store when it is empty or None."""
        path = Path(ca_file) if ca_file else Path(ssl.get_default_verify_paths().cafile or _DEBIAN_BUNDLE)
        if not ca_file and not path.exists():
            path = Path(_DEBIAN_BUNDLE)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise TrustStoreError(f"{path}: cannot read CA file: {exc.strerror}") from None
        anchors = load_pem_bundle(data)
        if not anchors:
            raise TrustStoreError(f"{path}: no PEM certificate in CA file")
        return cls(tuple(anchors), str(path))


@dataclass(frozen=True)
class PathResult:
    """Outcome of path validation: the built path (leaf first, anchor last) or why it failed."""

    path: tuple[x509.Certificate, ...]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def validate_path(
    chain: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    now: _dt.datetime,
) -> PathResult:
    """Build and verify a path from chain[0] through chain[1:] to one of `anchors`."""
    builder = (
        PolicyBuilder()
        .store(Store(list(anchors)))
        .time(now)
        .max_chain_depth(MAX_CHAIN_DEPTH)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_ee_policy())
    )
    try:
        verified = builder.build_client_verifier().verify(chain[0], list(chain[1:]))
    except VerificationError as exc:
        return PathResult((), _describe(exc))
    return PathResult(tuple(verified.chain))


def _describe(exc: VerificationError) -> str:
    text = str(exc).removeprefix("validation failed: ").removeprefix("candidates exhausted: ")
    if "no interior errors" in text:
        # The verifier's wording for "no issuer found": say it the way operators search it.
        return "no path to a trusted anchor (issuer unknown or intermediate not sent)"
    return text


def signed_by_key(cert: x509.Certificate, public_key) -> bool:
    """True if `cert`'s signature verifies with a bare public key (DANE-TA `2 1 0`, RFC 7671 §5.2.2)."""
    try:
        params = cert.signature_algorithm_parameters
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(cert.signature, cert.tbs_certificate_bytes, params, cert.signature_hash_algorithm)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(cert.signature, cert.tbs_certificate_bytes, params)
        elif isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            public_key.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
    except Exception:  # InvalidSignature, or a key/algorithm mismatch: not signed by this key
        return False
    return True
