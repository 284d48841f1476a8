"""TLSA presentation parsing and RFC 6125/XMPP identity matching, in isolation."""
from __future__ import annotations

import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pki import TestCA, _der_len, self_signed
from policy.pkix_names import match_identity, normalise_domain, presented_ids
from policy.spki import spki_der
from policy.tlsa import (MalformedTlsa, TlsaRecord, TlsaSyntaxError, matches, parse_tlsa, parse_tlsa_lenient,
                         usable_records)

HEX = "0C72AC70B745AC19998811B131D662C9AC69DBDBE7CB23E5B514B56664C5D3D6"


@pytest.mark.parametrize("text", [
    f"3 1 1 {HEX}",
    f"3 1 1 {HEX.lower()}",
    f"  3   1 1 {HEX[:10]} {HEX[10:40]}\t{HEX[40:]} ",
    f"DANE-EE SPKI SHA2-256 {HEX}",
    f"dane-ee spki sha2-256 {HEX}",
])
def test_presentation_forms(text):
    assert parse_tlsa(text) == TlsaRecord(3, 1, 1, bytes.fromhex(HEX))


@pytest.mark.parametrize("text,message", [
    ("3 1 1", "needs 4 fields"),
    (f"3 1 1 {HEX}Z", "not hexadecimal"),
    (f"3 1 1 {HEX}0", "not hexadecimal"),        # odd number of digits
    (f"DANE-XX 1 1 {HEX}", "usage 'DANE-XX'"),
    (f"3 256 1 {HEX}", "selector '256'"),
])
def test_syntax_errors(text, message):
    with pytest.raises(TlsaSyntaxError, match=message):
        parse_tlsa(text)
    assert isinstance(parse_tlsa_lenient(text), MalformedTlsa)


def test_usable_set_reports_why_each_record_is_ignored():
    good = parse_tlsa(f"3 1 1 {HEX}")
    result = usable_records([good, parse_tlsa("3 1 2 abcd"), parse_tlsa_lenient("garbage")], {2, 3})
    assert result.usable == (good,)
    assert [why for _, why in result.ignored] == ["digest is 2 bytes, expected 64",
                                                  "malformed (TLSA record 'garbage' needs 4 fields: usage selector mtype data)"]


def test_identity_matching_rules():
    ca = TestCA()
    cert = ca.issue(["*.example.net", "Xmpp.Example.ORG"], xmpp=["jabber.example.com"],
                    srv=["_xmpp-server.im.example.info"]).cert
    ids = presented_ids(cert)
    assert ids.dns == ("*.example.net", "Xmpp.Example.ORG")
    assert ids.xmpp == ("jabber.example.com",) and ids.srv == ("_xmpp-server.im.example.info",)
    assert match_identity(cert, ["a.example.net"]) == "DNS:*.example.net"
    assert match_identity(cert, ["xmpp.example.org"]) == "DNS:Xmpp.Example.ORG"
    assert match_identity(cert, ["jabber.example.com"]) == "XmppAddr:jabber.example.com"
    assert match_identity(cert, ["im.example.info"]) == "SRV:_xmpp-server.im.example.info"
    # An SRV-ID names the service domain D, not a delegated target.
    assert match_identity(cert, ["other.example", "im.example.info"]) is None
    assert match_identity(cert, ["example.net"]) is None
    assert match_identity(cert, ["a.b.example.net"]) is None
    # The CN is never consulted (RFC 9525 §6.1).
    cn_only = ca.issue([], cn="cn.example.net", san=False).cert
    assert match_identity(cn_only, ["cn.example.net"]) is None


def test_idn_domains_compare_as_a_labels():
    cert = TestCA().issue(["xn--bcher-kva.example"], xmpp=["bücher.example"]).cert
    assert normalise_domain("Bücher.Example.") == "xn--bcher-kva.example"
    assert match_identity(cert, ["bücher.example"]) == "DNS:xn--bcher-kva.example"
    xmpp_only = TestCA().issue([], xmpp=["bücher.example"]).cert
    assert match_identity(xmpp_only, ["xn--bcher-kva.example"]) == "XmppAddr:bücher.example"


# ---------------------------------------------------------------- selector 1: the SPKI as encoded


@pytest.mark.parametrize("key_type", ["ec", "ec384", "rsa"])
def test_spki_is_the_certificates_own_encoding_of_its_key(key_type):
    cert = self_signed(["a.example"], key_type=key_type).cert
    reencoded = cert.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    assert spki_der(cert) == reencoded                   # the usual encoding: the same bytes
    assert spki_der(cert) in cert.tbs_certificate_bytes


def _der(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


def _elements(der: bytes) -> list[bytes]:
    """The DER elements inside the SEQUENCE `der`, each whole."""
    out, at = [], 2 + (der[1] & 0x7F if der[1] & 0x80 else 0)
    while at < len(der):
        head = 2 + (der[at + 1] & 0x7F if der[at + 1] & 0x80 else 0)
        n = der[at + 1] if der[at + 1] < 0x80 else int.from_bytes(der[at + 2:at + head], "big")
        out.append(der[at:at + head + n])
        at += head + n
    return out


def test_a_3_1_x_record_matches_the_spki_as_the_certificate_encodes_it_not_a_re_encoding():
    # RFC 3279 §2.3.1 has rsaEncryption's parameters NULL, but certificates without them exist
    # and OpenSSL reads them; OpenSSL's DANE hashes the bytes the certificate carries, a
    # re-encoding adds the NULL.  Build such a certificate (its signature no longer verifies,
    # which does not matter to selector 1) and check which bytes are matched.
    cert = self_signed(["a.example"], key_type="rsa").cert
    der = cert.public_bytes(serialization.Encoding.DER)
    tbs, sig_alg, sig = _elements(der)
    fields = _elements(tbs)
    spki = fields[6]                                      # version, serial, alg, issuer, validity, subject
    alg, bits = _elements(spki)
    assert alg.endswith(b"\x05\x00")                      # rsaEncryption, NULL
    no_null = _der(0x30, _der(0x30, alg[2:-2]) + bits)
    odd = x509.load_der_x509_certificate(
        _der(0x30, _der(0x30, b"".join(fields[:6]) + no_null + b"".join(fields[7:])) + sig_alg + sig))
    assert spki_der(odd) == no_null
    reencoded = odd.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    assert reencoded != no_null                           # what the old code hashed
    record = TlsaRecord(3, 1, 1, hashlib.sha256(no_null).digest())
    assert matches(record, odd)
    assert not matches(TlsaRecord(3, 1, 1, hashlib.sha256(reencoded).digest()), odd)
