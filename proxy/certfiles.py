"""Reading certificate chains and private keys from PEM files, with messages an operator can act on.

Used by `verify`/`tlsa` (a peer's chain), `check-config` and every (re)load of a local domain's
certificate and key.  Error messages name files and problems, never key material: a key
parser's own message could quote the key, so only the exception type is passed on.
"""
from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from policy.pkix import load_pem_bundle

_BEGIN = b"-----BEGIN CERTIFICATE-----"


class CertFileError(Exception):
    """A certificate or key file that cannot be used; the message says which and why."""


def read_chain(path: str | Path) -> list[x509.Certificate]:
    """The certificates of a PEM file, in file order; CertFileError if there are none."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CertFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CertFileError(f"{path}: is a directory, not a PEM file") from None
    except OSError as exc:
        raise CertFileError(f"{path}: cannot read: {exc.strerror}") from None
    if not data.strip():
        raise CertFileError(f"{path}: file is empty")
    if _BEGIN not in data:
        raise CertFileError(f"{path}: no PEM certificate (expected {_BEGIN.decode()})")
    certs = load_pem_bundle(data)
    if len(certs) != data.count(_BEGIN):
        raise CertFileError(f"{path}: a PEM certificate block does not parse")
    return certs


def load_identity(cert_path: str | Path, key_path: str | Path):
    """A local domain's chain (leaf first) and the private key that belongs to its leaf."""
    chain = read_chain(cert_path)
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except OSError as exc:
        raise CertFileError(f"{key_path}: cannot read: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise CertFileError(f"{key_path}: not an unencrypted PEM private key ({type(exc).__name__})") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        raise CertFileError(f"{key_path} does not belong to the first certificate of {cert_path}")
    return chain, key
