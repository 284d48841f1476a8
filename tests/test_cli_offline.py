"""`verify` bad input, `tlsa` against OpenSSL's own pipeline, and the console script itself."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pki import TestCA, self_signed
from policy.tlsa import record_for

DOMAIN = "xmpp.example.net"


@pytest.fixture(scope="module")
def leaf(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    issued = TestCA().intermediate().issue([DOMAIN], key_type="rsa")
    cert_path, _ = issued.write(tmp, "leaf")
    return issued, cert_path, tmp


@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    (b"", "file is empty"),
    (b"hello, not a certificate\n", "no PEM certificate"),
    (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "does not parse"),
])
def test_verify_bad_chain_file_exits_2(cli, tmp_path, content, message):
    path = tmp_path / "chain.pem"
    if content is not None:
        path.write_bytes(content)
    code, out, err = cli("verify", "--chain", path, "--domain", DOMAIN)
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1


def test_verify_unreadable_chain_is_a_directory(cli, tmp_path):
    code, _, err = cli("verify", "--chain", tmp_path, "--domain", DOMAIN)
    assert code == 2 and "is a directory" in err


@pytest.mark.parametrize("flag,value,message", [
    ("--dnssec", "maybe", "--dnssec 'maybe'"),
    ("--require", "dnssec", "--require 'dnssec'"),
    ("--dane-uses", "DANE-EE,DANE-XX", "unknown usage 'DANE-XX'"),
    ("--at", "yesterday", "not an ISO-8601 time"),
])
def test_verify_nonsense_flags_exit_2(cli, leaf, flag, value, message):
    _, cert_path, _ = leaf
    code, out, err = cli("verify", "--chain", cert_path, "--domain", DOMAIN, flag, value)
    assert code == 2 and out == "" and message in err and err.count("\n") == 1


def test_verify_missing_required_flag_exits_2(cli, leaf):
    _, cert_path, _ = leaf
    code, _, err = cli("verify", "--chain", cert_path)
    assert code == 2 and "--domain" in err


def test_malformed_tlsa_is_unusable_not_bad_input(cli, leaf):
    issued, cert_path, _ = leaf
    good = str(record_for(issued.cert))
    code, out, _ = cli("verify", "--chain", cert_path, "--domain", DOMAIN, "--json", "--require", "dane",
                       "--tlsa", "3 1 1 xyz", "--tlsa", "3 1 1", "--tlsa", "3 1 1 abcd", "--tlsa", good)
    result = json.loads(out)
    assert code == 0 and result["verdict"] == "accept" and result["matched"] == good
    code, out, _ = cli("verify", "--chain", cert_path, "--domain", DOMAIN, "--json", "--require", "dane",
                       "--tlsa", "3 1 1 xyz", "--tlsa", "3 0 0 abcd")
    result = json.loads(out)
    assert code == 1 and result["verdict"] == "reject"
    assert "not hexadecimal" in result["reason"] and "Full(0) data is not a DER certificate" in result["reason"]


def test_tlsa_mnemonics_and_whitespace_in_hex(cli, leaf):
    issued, cert_path, _ = leaf
    digest = record_for(issued.cert).data.hex().upper()
    spaced = " ".join(digest[i:i + 8] for i in range(0, len(digest), 8))
    code, out, _ = cli("verify", "--chain", cert_path, "--domain", DOMAIN, "--json", "--require", "dane",
                       "--tlsa", f"DANE-EE SPKI SHA2-256 {spaced}")
    assert code == 0 and json.loads(out)["prooftype"] == "dane-ee"


def test_verify_text_output(cli, leaf):
    issued, cert_path, _ = leaf
    code, out, _ = cli("verify", "--chain", cert_path, "--domain", DOMAIN,
                       "--tlsa", str(record_for(issued.cert)))
    assert code == 0
    assert "verdict:   accept" in out and "prooftype: dane-ee" in out


def _openssl_spki_sha256(cert_path) -> str:
    pubkey = subprocess.run(["openssl", "x509", "-in", str(cert_path), "-noout", "-pubkey"],
                            check=True, capture_output=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pubkey,
                         check=True, capture_output=True).stdout
    return subprocess.run(["sha256sum"], input=der, check=True, capture_output=True).stdout.split()[0].decode()


def test_tlsa_agrees_with_openssl_pipeline(cli, leaf):
    _, cert_path, _ = leaf
    code, out, _ = cli("tlsa", "--cert", cert_path, "--host", "xmpp.example.org")
    assert code == 0
    assert out.strip() == f"_5269._tcp.xmpp.example.org. IN TLSA 3 1 1 {_openssl_spki_sha256(cert_path)}"


def test_tlsa_other_forms(cli, leaf, tmp_path):
    issued, cert_path, _ = leaf
    code, out, _ = cli("tlsa", "--cert", cert_path, "--usage", "DANE-EE", "--selector", "0",
                       "--mtype", "2", "--port", "5270")
    assert code == 0
    assert out.strip() == f"_5270._tcp.{DOMAIN}. IN TLSA {record_for(issued.cert, 3, 0, 2)}"
    # A trust-anchor record designates the top of the chain in the file.
    code, out, _ = cli("tlsa", "--cert", cert_path, "--usage", "2")
    assert code == 0 and out.strip() == str(record_for(issued.chain[-1], 2, 1, 1))
    code, _, err = cli("tlsa", "--cert", cert_path, "--selector", "7")
    assert code == 2 and "--selector" in err
    code, _, err = cli("tlsa", "--cert", tmp_path / "missing.pem")
    assert code == 2 and "no such file" in err


def test_console_script_and_module_agree(leaf):
    """The installed entry point and `python -m proxy` run the same code with the same exit codes."""
    issued, cert_path, _ = leaf
    args = ["verify", "--chain", str(cert_path), "--domain", DOMAIN, "--json",
            "--tlsa", str(record_for(self_signed([DOMAIN]).cert))]
    out = subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True)
    assert out.returncode == 1 and json.loads(out.stdout)["verdict"] == "reject"


def test_verify_mismatch_prints_the_chains_own_values_in_full(cli, leaf):
    """As posttls-finger and ldns-dane do: beside the published record, the presented leaf's
    own `3 1 1` / `3 1 2` / `3 0 1` values and the issuer's `2 x x` values, not cut short."""
    issued, cert_path, _ = leaf
    other = self_signed([DOMAIN]).cert
    code, out, _ = cli("verify", "--chain", cert_path, "--domain", DOMAIN, "--tlsa", str(record_for(other)))
    assert code == 1 and "no fallback to PKIX" in out
    assert f"  = {record_for(other)}" not in out and f"    {record_for(other)}" in out
    for usage, selector, mtype in ((3, 1, 1), (3, 1, 2), (3, 0, 1), (3, 0, 2)):
        assert f"      {record_for(issued.cert, usage, selector, mtype)}" in out
    assert f"      {record_for(issued.chain[1], 2, 1, 1)}" in out
    # An accepted chain prints no such block.
    code, out, _ = cli("verify", "--chain", cert_path, "--domain", DOMAIN, "--tlsa", str(record_for(issued.cert)))
    assert code == 0 and "presented chain's own values" not in out
