"""`verify` on a wide matrix of chains, records and policies, with OpenSSL's DANE as an oracle.

Each case states the verdict the RFCs require (RFC 6698, 7671, 7672 §3, 7673; DESIGN §2).
Where OpenSSL's own DANE code can judge the case (DNS-IDs, well-formed DANE-EE/DANE-TA
records), the same records are handed to `openssl s_client -dane_tlsa_rrdata` against an
`openssl s_server` presenting the same chain, and it must agree.
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from openssl_oracle import OpenSSLServer
from pki import DAY, NOW, TestCA, self_signed
from policy.tlsa import record_for

DOMAIN = "xmpp.example.net"


def rec(cert, u, s, m) -> str:
    return str(record_for(cert, u, s, m))


def off_by_one(record: str) -> str:
    """The same record with its last hex digit changed: a one-digit mismatch."""
    last = record[-1]
    return record[:-1] + ("0" if last != "0" else "1")


def mismatch(record: str, stranger) -> str:
    """A usable record that does not match: a one-digit change for digests; for Full(0),
    whose data must parse to be usable at all, the same fields over a stranger certificate."""
    u, s, m, _ = record.split()
    return rec(stranger, int(u), int(s), 0) if m == "0" else off_by_one(record)


@dataclass
class World:
    ca: TestCA
    inter: TestCA
    servers: dict = field(default_factory=dict)   # name -> (chain, key)
    files: dict = field(default_factory=dict)     # name -> chain PEM path
    ca_file: Path | None = None
    oracles: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("matrix")
    ca = TestCA("Matrix Root")
    inter = ca.intermediate("Matrix Intermediate")
    expired_inter = ca.intermediate("Expired Intermediate", not_before=NOW - 400 * DAY, not_after=NOW - DAY)
    w = World(ca, inter)
    std = inter.issue([DOMAIN])
    rsa = inter.issue([DOMAIN], key_type="rsa")
    chains = {
        "std": (std.chain, std.key),
        "full": (std.chain + [ca.cert], std.key),
        "rsa": (rsa.chain, rsa.key),
        "expired_leaf": None,
        "expired_inter": None,
        "wrong_name": None,
        "self_signed": None,
        "wildcard": None,
        "partial_wildcard": None,
        "xmppaddr_only": None,
        "srvid_only": None,
        "target_name": None,
    }
    e = inter.issue([DOMAIN], not_before=NOW - 400 * DAY, not_after=NOW - DAY)
    chains["expired_leaf"] = (e.chain, e.key)
    x = expired_inter.issue([DOMAIN])
    chains["expired_inter"] = (x.chain, x.key)
    wn = inter.issue(["other.example.org"])
    chains["wrong_name"] = (wn.chain, wn.key)
    ss = self_signed([DOMAIN])
    chains["self_signed"] = (ss.chain, ss.key)
    wc = inter.issue(["*.example.net"])
    chains["wildcard"] = (wc.chain, wc.key)
    pw = inter.issue(["x*.example.net"])
    chains["partial_wildcard"] = (pw.chain, pw.key)
    xo = inter.issue([], xmpp=[DOMAIN])
    chains["xmppaddr_only"] = (xo.chain, xo.key)
    so = inter.issue([], srv=[f"_xmpp-server.{DOMAIN}"])
    chains["srvid_only"] = (so.chain, so.key)
    tn = inter.issue(["xmpp-host.example.net"])
    chains["target_name"] = (tn.chain, tn.key)
    for name, (chain, key) in chains.items():
        path = tmp / f"{name}.pem"
        path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
        w.servers[name] = (chain, key)
        w.files[name] = path
    w.ca_file = tmp / "root.pem"
    w.ca_file.write_bytes(ca.root_pem())
    w.tmp = tmp
    yield w
    for server in w.oracles.values():
        server.close()


def oracle(world: World, server: str) -> OpenSSLServer:
    if server not in world.oracles:
        chain, key = world.servers[server]
        world.oracles[server] = OpenSSLServer(world.tmp / "oracle", server, chain, key)
    return world.oracles[server]


def run_verify(cli, world, server, records, *, domain=DOMAIN, require=None, uses=None,
               dnssec=None, ca=False, at=None, targets=()):
    args = ["verify", "--chain", world.files[server], "--domain", domain, "--json"]
    for r in records:
        args += ["--tlsa", r]
    for t in targets:
        args += ["--srv-target", t]
    if require:
        args += ["--require", require]
    if uses:
        args += ["--dane-uses", uses]
    if dnssec:
        args += ["--dnssec", dnssec]
    # Without ca_file PKIX has no anchor for the test PKI: the system store does not know it.
    args += ["--ca-file", world.ca_file if ca else world.tmp / "unrelated-root.pem"]
    if not ca and not (world.tmp / "unrelated-root.pem").exists():
        (world.tmp / "unrelated-root.pem").write_bytes(TestCA("Unrelated Root").root_pem())
    if at:
        args += ["--at", at]
    code, out, err = cli(*args)
    assert code in (0, 1), err
    result = json.loads(out)
    assert code == (0 if result["verdict"] == "accept" else 1)
    return result


# --- DANE-EE and DANE-TA over every selector and matching type, with OpenSSL as oracle ------

SELECTORS, MTYPES = (0, 1), (0, 1, 2)


@pytest.mark.parametrize("server", ["std", "rsa", "self_signed"])
@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("mtype", MTYPES)
def test_dane_ee_every_combination(cli, world, server, selector, mtype):
    leaf = world.servers[server][0][0]
    good = rec(leaf, 3, selector, mtype)
    got = run_verify(cli, world, server, [good], require="dane")
    assert (got["verdict"], got["prooftype"], got["matched"]) == ("accept", "dane-ee", good)
    assert oracle(world, server).dane_verifies(DOMAIN, [good])
    bad = mismatch(good, world.inter.cert)
    got = run_verify(cli, world, server, [bad], require="dane")
    assert got["verdict"] == "reject" and "leaf does not match" in got["reason"]
    assert not oracle(world, server).dane_verifies(DOMAIN, [bad])


@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("mtype", MTYPES)
def test_dane_ta_intermediate_in_chain(cli, world, selector, mtype):
    good = rec(world.inter.cert, 2, selector, mtype)
    got = run_verify(cli, world, "std", [good], require="dane")
    assert (got["verdict"], got["prooftype"], got["identity"]) == ("accept", "dane-ta", f"DNS:{DOMAIN}")
    assert oracle(world, "std").dane_verifies(DOMAIN, [good])
    bad = mismatch(good, world.servers["wrong_name"][0][0])
    got = run_verify(cli, world, "std", [bad], require="dane")
    assert got["verdict"] == "reject"
    assert not oracle(world, "std").dane_verifies(DOMAIN, [bad])


@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("mtype", MTYPES)
def test_dane_ta_root_sent_by_server(cli, world, selector, mtype):
    good = rec(world.ca.cert, 2, selector, mtype)
    got = run_verify(cli, world, "full", [good], require="dane")
    assert (got["verdict"], got["prooftype"]) == ("accept", "dane-ta")
    assert oracle(world, "full").dane_verifies(DOMAIN, [good])


@pytest.mark.parametrize("selector,mtype,accepted", [
    (0, 1, False), (0, 2, False), (1, 1, False), (1, 2, False),  # a digest of an anchor not sent
    (0, 0, True), (1, 0, True),                                  # the record supplies the anchor
])
def test_dane_ta_anchor_not_sent(cli, world, selector, mtype, accepted):
    record = rec(world.ca.cert, 2, selector, mtype)
    got = run_verify(cli, world, "std", [record], require="dane")
    assert (got["verdict"] == "accept") is accepted, got
    if accepted:
        assert got["prooftype"] == "dane-ta" and got["matched"] == record
    else:
        assert "trust anchor not sent" in got["reason"]
    assert oracle(world, "std").dane_verifies(DOMAIN, [record]) is accepted


@pytest.mark.parametrize("selector,mtype", [(0, 0), (0, 1), (1, 1), (1, 2)])
def test_dane_ta_matching_only_the_leaf_is_no_anchor(cli, world, selector, mtype):
    leaf = world.servers["self_signed"][0][0]
    record = rec(leaf, 2, selector, mtype)
    got = run_verify(cli, world, "self_signed", [record], require="dane")
    assert got["verdict"] == "reject"
    assert not oracle(world, "self_signed").dane_verifies(DOMAIN, [record])


def test_expired_leaf_dane_ee_accepts_but_dane_ta_and_pkix_reject(cli, world):
    leaf = world.servers["expired_leaf"][0][0]
    ee = rec(leaf, 3, 1, 1)
    got = run_verify(cli, world, "expired_leaf", [ee], require="dane")
    assert (got["verdict"], got["prooftype"]) == ("accept", "dane-ee")
    assert oracle(world, "expired_leaf").dane_verifies(DOMAIN, [ee])
    ta = rec(world.inter.cert, 2, 1, 1)
    got = run_verify(cli, world, "expired_leaf", [ta], require="dane")
    assert got["verdict"] == "reject" and "not valid at validation time" in got["reason"]
    assert not oracle(world, "expired_leaf").dane_verifies(DOMAIN, [ta])
    got = run_verify(cli, world, "expired_leaf", [], require="pkix", ca=True)
    assert got["verdict"] == "reject" and "PKIX" in got["reason"]


def test_dane_ta_with_expired_intermediate_rejects(cli, world):
    root_ta = rec(world.ca.cert, 2, 0, 0)
    got = run_verify(cli, world, "expired_inter", [root_ta], require="dane")
    assert got["verdict"] == "reject" and "not valid at validation time" in got["reason"]
    assert not oracle(world, "expired_inter").dane_verifies(DOMAIN, [root_ta])


def test_dane_ta_wrong_name_rejects_dane_ee_ignores_names(cli, world):
    ta = rec(world.inter.cert, 2, 1, 1)
    got = run_verify(cli, world, "wrong_name", [ta], require="dane")
    assert got["verdict"] == "reject"
    assert f"leaf names none of {DOMAIN}" in got["reason"] and "other.example.org" in got["reason"]
    assert not oracle(world, "wrong_name").dane_verifies(DOMAIN, [ta])
    ee = rec(world.servers["wrong_name"][0][0], 3, 1, 1)
    got = run_verify(cli, world, "wrong_name", [ee], require="dane")
    assert (got["verdict"], got["prooftype"]) == ("accept", "dane-ee")
    assert oracle(world, "wrong_name").dane_verifies(DOMAIN, [ee])


@pytest.mark.parametrize("server,domain,accepted", [
    ("wildcard", "a.example.net", True),
    ("wildcard", "a.b.example.net", False),   # one label only
    ("wildcard", "example.net", False),
    ("partial_wildcard", "xa.example.net", False),  # RFC 9525 §6.3: no partial wildcards
])
def test_wildcards_only_as_whole_leftmost_label(cli, world, server, domain, accepted):
    ta = rec(world.inter.cert, 2, 1, 1)
    got = run_verify(cli, world, server, [ta], domain=domain, require="dane")
    assert (got["verdict"] == "accept") is accepted, got
    if server != "partial_wildcard":
        # s_client does not set X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS, so OpenSSL would match
        # `x*.example.net`; RFC 9525 §6.3 and DESIGN §2.3 forbid it.  No oracle for that case.
        assert oracle(world, server).dane_verifies(domain, [ta]) is accepted


@pytest.mark.parametrize("server,identity", [
    ("xmppaddr_only", f"XmppAddr:{DOMAIN}"),
    ("srvid_only", f"SRV:_xmpp-server.{DOMAIN}"),
])
def test_xmpp_identities_satisfy_dane_ta_and_pkix(cli, world, server, identity):
    ta = rec(world.inter.cert, 2, 1, 1)
    got = run_verify(cli, world, server, [ta], require="dane")
    assert (got["verdict"], got["identity"]) == ("accept", identity)
    got = run_verify(cli, world, server, [], require="pkix", ca=True)
    assert (got["verdict"], got["prooftype"], got["identity"]) == ("accept", "pkix", identity)
    got = run_verify(cli, world, server, [ta], domain="elsewhere.example.net", require="dane")
    assert got["verdict"] == "reject"


def test_securely_delegated_srv_target_is_a_reference_identifier(cli, world):
    ta = rec(world.inter.cert, 2, 1, 1)
    got = run_verify(cli, world, "target_name", [ta], domain="example.net", require="dane")
    assert got["verdict"] == "reject"
    got = run_verify(cli, world, "target_name", [ta], domain="example.net", require="dane",
                     targets=["xmpp-host.example.net"])
    assert (got["verdict"], got["identity"]) == ("accept", "DNS:xmpp-host.example.net")


# --- usability, digest agility, downgrade ------------------------------------------------------

def test_unusable_only_sets_count_as_no_tlsa(cli, world):
    leaf = world.servers["std"][0][0]
    good = rec(leaf, 3, 1, 1)
    unusable = [
        good[:-2],                              # 31-byte SHA2-256
        good.replace("3 1 1", "3 1 2"),         # 32 bytes under SHA2-512
        good.replace("3 1 1", "3 2 1"),         # unknown selector
        good.replace("3 1 1", "3 1 3"),         # unknown matching type
        good.replace("3 1 1", "4 1 1"),         # unknown usage
        "3 0 0 deadbeef",                       # Full(0) that is no certificate
        "3 1 1 not-hex",                        # malformed
        "3 1",                                  # too few fields
        rec(leaf, 1, 1, 1),                     # PKIX-EE, not enabled by default
    ]
    got = run_verify(cli, world, "std", unusable, ca=True)
    assert (got["verdict"], got["prooftype"]) == ("accept", "pkix")
    assert "no usable TLSA record" in got["reason"]
    for text in ("not hexadecimal", "needs 4 fields", "digest is 31 bytes", "unknown selector 2",
                 "Full(0) data is not a DER certificate", "PKIX-EE not enabled"):
        assert text in got["reason"]
    got = run_verify(cli, world, "std", unusable, require="dane", ca=True)
    assert got["verdict"] == "reject" and "require=dane" in got["reason"]


def test_usable_mismatch_never_falls_back_to_pkix(cli, world):
    leaf = world.servers["std"][0][0]
    # The chain is PKIX-valid for the domain...
    assert run_verify(cli, world, "std", [], ca=True)["verdict"] == "accept"
    # ...but a secure, usable, non-matching record must still reject it (no downgrade).
    got = run_verify(cli, world, "std", [off_by_one(rec(leaf, 3, 1, 1))], ca=True)
    assert got["verdict"] == "reject" and "no fallback to PKIX" in got["reason"]


def test_digest_agility(cli, world):
    leaf = world.servers["std"][0][0]
    sha256, sha512 = rec(leaf, 3, 1, 1), rec(leaf, 3, 1, 2)
    # RFC 7671 §9: a (mismatching) SHA2-512 record supersedes a matching SHA2-256 one.
    got = run_verify(cli, world, "std", [sha256, off_by_one(sha512)], require="dane")
    assert got["verdict"] == "reject" and "superseded by a stronger digest" in got["reason"]
    assert not oracle(world, "std").dane_verifies(DOMAIN, [sha256, off_by_one(sha512)])
    # A malformed SHA2-512 record is unusable and supersedes nothing.
    got = run_verify(cli, world, "std", [sha256, sha512[:-2]], require="dane")
    assert (got["verdict"], got["matched"]) == ("accept", sha256)
    # Agility is per usage/selector: SHA2-512 over SPKI leaves SHA2-256 over Cert alone.
    cert256 = rec(leaf, 3, 0, 1)
    got = run_verify(cli, world, "std", [cert256, off_by_one(sha512)], require="dane")
    assert (got["verdict"], got["matched"]) == ("accept", cert256)
    assert oracle(world, "std").dane_verifies(DOMAIN, [cert256, off_by_one(sha512)])
    # Full(0) is never dropped by digest agility.
    full = rec(leaf, 3, 1, 0)
    got = run_verify(cli, world, "std", [full, off_by_one(sha512)], require="dane")
    assert (got["verdict"], got["matched"]) == ("accept", full)


def test_any_one_matching_record_suffices(cli, world):
    leaf = world.servers["std"][0][0]
    records = [off_by_one(rec(leaf, 3, 1, 1)), rec(world.inter.cert, 2, 0, 1)]
    got = run_verify(cli, world, "std", records, require="dane")
    assert (got["verdict"], got["prooftype"]) == ("accept", "dane-ta")
    assert oracle(world, "std").dane_verifies(DOMAIN, records)


def test_pkix_usages_only_when_enabled(cli, world):
    leaf = world.servers["std"][0][0]
    uses = "DANE-EE,DANE-TA,PKIX-EE,PKIX-TA"
    got = run_verify(cli, world, "std", [rec(leaf, 1, 1, 1)], uses=uses, ca=True, require="dane")
    assert (got["verdict"], got["prooftype"]) == ("accept", "pkix-ee")
    got = run_verify(cli, world, "std", [rec(world.ca.cert, 0, 0, 1)], uses=uses, ca=True, require="dane")
    assert (got["verdict"], got["prooftype"]) == ("accept", "pkix-ta")
    # The record matches but PKIX does not validate (no anchor): PKIX-EE demands both.
    got = run_verify(cli, world, "std", [rec(leaf, 1, 1, 1)], uses=uses, require="dane")
    assert got["verdict"] == "reject" and "PKIX validation failed" in got["reason"]
    # Not enabled: unusable, so require=dane has nothing to go on.
    got = run_verify(cli, world, "std", [rec(leaf, 1, 1, 1)], ca=True, require="dane")
    assert got["verdict"] == "reject" and "PKIX-EE not enabled" in got["reason"]


# --- DNSSEC status under every require mode ---------------------------------------------------

@pytest.mark.parametrize("require,expected", [
    ("dane", ("reject", None)),
    ("dane-or-pkix", ("accept", "pkix")),
    ("pkix", ("accept", "pkix")),
    ("tls", ("accept", "tls")),
    ("block", ("reject", None)),
])
def test_insecure_tlsa_is_ignored(cli, world, require, expected):
    leaf = world.servers["std"][0][0]
    # Insecure records are ignored even when they *mismatch* — they could be forged.
    got = run_verify(cli, world, "std", [off_by_one(rec(leaf, 3, 1, 1))], dnssec="insecure",
                     require=require, ca=True)
    assert (got["verdict"], got["prooftype"]) == expected, got
    if require == "dane":
        assert "insecure" in got["reason"]


@pytest.mark.parametrize("require", ["dane", "dane-or-pkix", "pkix", "tls", "block"])
def test_bogus_tlsa_rejects_in_every_mode(cli, world, require):
    leaf = world.servers["std"][0][0]
    got = run_verify(cli, world, "std", [rec(leaf, 3, 1, 1)], dnssec="bogus", require=require, ca=True)
    assert got["verdict"] == "reject"
    if require != "block":
        assert "TLSA is bogus" in got["reason"] and "failing closed" in got["reason"]
    got = run_verify(cli, world, "std", [], dnssec="bogus", require=require, ca=True)
    assert got["verdict"] == "reject"


def test_tls_mode(cli, world):
    leaf = world.servers["std"][0][0]
    got = run_verify(cli, world, "wrong_name", [], require="tls")
    assert (got["verdict"], got["prooftype"]) == ("accept", "tls")
    got = run_verify(cli, world, "std", [off_by_one(rec(leaf, 3, 1, 1))], require="tls")
    assert got["verdict"] == "reject"
    got = run_verify(cli, world, "std", [rec(leaf, 3, 1, 1)], require="tls")
    assert (got["verdict"], got["prooftype"]) == ("accept", "dane-ee")


def test_block_mode_rejects_a_perfect_match(cli, world):
    leaf = world.servers["std"][0][0]
    got = run_verify(cli, world, "std", [rec(leaf, 3, 1, 1)], require="block", ca=True)
    assert got["verdict"] == "reject" and "blocked" in got["reason"]


def test_at_moves_the_validation_time(cli, world):
    later = (NOW + 400 * DAY).isoformat()
    got = run_verify(cli, world, "std", [], ca=True, at=later)
    assert got["verdict"] == "reject" and "not valid at validation time" in got["reason"]
    leaf = world.servers["std"][0][0]
    got = run_verify(cli, world, "std", [rec(leaf, 3, 1, 1)], ca=True, at=later)
    assert (got["verdict"], got["prooftype"]) == ("accept", "dane-ee")
    epoch = int((NOW + 400 * DAY).timestamp())
    assert not oracle(world, "std").dane_verifies(DOMAIN, [rec(world.inter.cert, 2, 1, 1)], at=epoch)
    got = run_verify(cli, world, "std", [rec(world.inter.cert, 2, 1, 1)], ca=True, at=later)
    assert got["verdict"] == "reject"


def test_dane_ta_bare_key_that_signed_the_leaf_itself(cli, world, tmp_path):
    # `2 1 0` whose key signed the leaf directly: the chain is the leaf alone.
    issued = world.ca.issue([DOMAIN])
    path = tmp_path / "direct.pem"
    path.write_bytes(issued.chain_pem())
    world.files["direct"], world.servers["direct"] = path, (issued.chain, issued.key)
    record = rec(world.ca.cert, 2, 1, 0)
    got = run_verify(cli, world, "direct", [record], require="dane")
    assert (got["verdict"], got["prooftype"], got["matched"]) == ("accept", "dane-ta", record)
    assert oracle(world, "direct").dane_verifies(DOMAIN, [record])
    stranger = rec(world.inter.cert, 2, 1, 0)   # a key that signed nothing here
    got = run_verify(cli, world, "direct", [stranger], require="dane")
    assert got["verdict"] == "reject"
    assert not oracle(world, "direct").dane_verifies(DOMAIN, [stranger])
