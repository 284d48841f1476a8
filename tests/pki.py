"""A throw-away X.509 PKI for tests, built with `cryptography`.

Certificates are made to order: any validity window, any SAN mix (DNS-ID, SRV-ID,
XmppAddr), EC or RSA keys, chains of any depth.  Nothing here touches the network.
"""
from __future__ import annotations

import datetime as _dt
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

# RFC 6120 §13.7.1.4: id-on-xmppAddr, an otherName holding a UTF8String JID.
ID_ON_XMPPADDR = ObjectIdentifier("1.3.6.1.5.5.7.8.5")
# RFC 4985: id-on-dnsSRV, an otherName holding an IA5String "_service.domain".
ID_ON_DNSSRV = ObjectIdentifier("1.3.6.1.5.5.7.8.7")

NOW = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
DAY = _dt.timedelta(days=1)


def _der_utf8(text: str) -> bytes:
    raw = text.encode("utf-8")
    return b"\x0c" + _der_len(len(raw)) + raw


def _der_ia5(text: str) -> bytes:
    raw = text.encode("ascii")
    return b"\x16" + _der_len(len(raw)) + raw


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def new_key(kind: str = "ec"):
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ec384":
        return ec.generate_private_key(ec.SECP384R1())
    return ec.generate_private_key(ec.SECP256R1())


@dataclass
class Issued:
    """A certificate with its key and the chain a server would send (leaf first, no root)."""

    cert: x509.Certificate
    key: object
    chain: list[x509.Certificate] = field(default_factory=list)

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Write `<name>.pem` (full chain) and `<name>.key`; return both paths."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
        cert_path.write_bytes(self.chain_pem())
        key_path.write_bytes(self.key_pem())
        return cert_path, key_path


class TestCA:
    """A certification authority; `TestCA()` is a root, `.intermediate()` a sub-CA."""

    __test__ = False  # not a pytest class

    def __init__(
        self,
        name: str = "Test Root CA",
        *,
        key_type: str = "ec",
        not_before: _dt.datetime | None = None,
        not_after: _dt.datetime | None = None,
        parent: "TestCA | None" = None,
        path_length: int | None = None,
        is_ca: bool = True,
    ) -> None:
        self.name = name
        self.key = new_key(key_type)
        self.parent = parent
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        issuer_name = parent.cert.subject if parent else subject
        signer = parent.key if parent else self.key
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or NOW - 30 * DAY)
            .not_valid_after(not_after or NOW + 3650 * DAY)
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=path_length), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=is_ca,
                    crl_sign=is_ca, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
        )
        if parent:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()), critical=False
            )
        self.cert = builder.sign(signer, _hash_for(signer))

    @property
    def chain(self) -> list[x509.Certificate]:
        """This CA's certificate and its parents' up to but excluding the root."""
        out, ca = [], self
        while ca.parent is not None:
            out.append(ca.cert)
            ca = ca.parent
        return out

    @property
    def root(self) -> "TestCA":
        ca = self
        while ca.parent is not None:
            ca = ca.parent
        return ca

    def root_pem(self) -> bytes:
        return self.root.cert.public_bytes(serialization.Encoding.PEM)

    def write_root(self, path: Path) -> Path:
        path.write_bytes(self.root_pem())
        return path

    def intermediate(self, name: str = "Test Intermediate CA", **kwargs) -> "TestCA":
        return TestCA(name, parent=self, **kwargs)

    def issue(
        self,
        dns: list[str] | tuple[str, ...] = (),
        *,
        srv: list[str] | tuple[str, ...] = (),
        xmpp: list[str] | tuple[str, ...] = (),
        ips: list[str] | tuple[str, ...] = (),
        cn: str | None = None,
        key_type: str = "ec",
        key: object | None = None,
        not_before: _dt.datetime | None = None,
        not_after: _dt.datetime | None = None,
        eku: tuple[ObjectIdentifier, ...] | None = (
            ExtendedKeyUsageOID.SERVER_AUTH,
            ExtendedKeyUsageOID.CLIENT_AUTH,
        ),
        san: bool = True,
    ) -> Issued:
        """Issue an end-entity certificate.

        `srv` takes SRV-IDs as "_xmpp-server.example.org"; `xmpp` takes bare domain JIDs.
        """
        key = key or new_key(key_type)
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.OtherName(ID_ON_DNSSRV, _der_ia5(s)) for s in srv]
        names += [x509.OtherName(ID_ON_XMPPADDR, _der_utf8(j)) for j in xmpp]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        subject_cn = cn if cn is not None else (dns[0] if dns else (xmpp[0] if xmpp else "test"))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or NOW - DAY)
            .not_valid_after(not_after or NOW + 365 * DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False,
                    key_encipherment=isinstance(key, rsa.RSAPrivateKey), data_encipherment=False,
                    key_agreement=False, key_cert_sign=False, crl_sign=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if eku:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        if san and names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, _hash_for(self.key))
        return Issued(cert=cert, key=key, chain=[cert, *self.chain])


def self_signed(dns: list[str] | tuple[str, ...] = (), **kwargs) -> Issued:
    """A self-signed end-entity certificate, as DANE-EE deployments often use."""
    key = kwargs.pop("key", None) or new_key(kwargs.pop("key_type", "ec"))
    fake = TestCA.__new__(TestCA)
    fake.key, fake.parent, fake.name = key, None, "self"
    subject_cn = kwargs.pop("cn", None) or (dns[0] if dns else "self-signed")
    fake.cert = _NameOnly(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
    issued = TestCA.issue(fake, dns, key=key, cn=subject_cn, **kwargs)
    return Issued(cert=issued.cert, key=key, chain=[issued.cert])


class _NameOnly:
    def __init__(self, subject: x509.Name) -> None:
        self.subject = subject


def _hash_for(key) -> hashes.HashAlgorithm:
    return hashes.SHA384() if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256 else hashes.SHA256()
