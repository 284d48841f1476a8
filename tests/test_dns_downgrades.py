"""Silent DNSSEC downgrades (issue 11, DESIGN §2.1 items 3-5, §2.4) over the real signed-zone
environment (tests/dnsenv.py: nsd + validating unbound, plus a non-validating unbound):

* a validated TLSA RRset with one malformed record: the record is unusable and named, the
  others decide — never a timeout, and `verify` agrees with the lookup path;
* a CNAME at a TLSA base domain (RFC 7671 §7): TLSA at the secure expansion first, the
  original name otherwise; an insecure hop gives no DANE from the expanded name;
* a resolver that does not validate (`dns.probe`): insecure answers become `unvalidated`, which
  rejects, with the resolver and the probe named;
* an unreadable policy directory or file is an error, never an absent file.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import trio

from dnsenv import malformed_tlsa, tlsa_text
from pki import TestCA, self_signed
from policy.decide import decide
from policy.dns import Resolver
from policy.evidence import DnsStatus
from policy.peer_evidence import gather
from policy.pkix import TrustStore
from policy.policyfile import Policy, PolicyError, PolicySet

SECURE, INSECURE, UNVALIDATED = DnsStatus.SECURE, DnsStatus.INSECURE, DnsStatus.UNVALIDATED
REPO = Path(__file__).resolve().parent.parent


def run_gather(resolver: Resolver, domain: str, **kwargs):
    return trio.run(lambda: gather(domain, resolver, **kwargs))


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA("Downgrade Test Root")


@pytest.fixture
def trust(ca, tmp_path) -> TrustStore:
    return TrustStore.load(ca.write_root(tmp_path / "root.pem"))


# ---------------------------------------------------------------------------------------------
# 1. One malformed TLSA record is unusable, never a failure (DESIGN §2.1 item 4, RFC 7671 §9)


MALFORMED = {
    # a SHA2-256 record with a 20-byte digest (a truncated paste)
    "short-sha256": (3, 1, 1, bytes(range(20)), "digest is 20 bytes, expected 32"),
    # a SHA2-512 value published as matching type 1 (the common slip)
    "sha512-as-type-1": (3, 1, 1, bytes(range(64)), "digest is 64 bytes, expected 32"),
    # a 32-byte value published as SHA2-512
    "sha256-as-type-2": (3, 1, 2, bytes(range(32)), "digest is 32 bytes, expected 64"),
}


@pytest.mark.parametrize("shape", sorted(MALFORMED))
def test_malformed_record_beside_a_matching_one_is_ignored(dns_env, shape):
    usage, selector, mtype, data, why = MALFORMED[shape]
    domain = dns_env.fresh(dns_env.secure, "mal")
    server = self_signed([domain])
    dns_env.publish(None, domain, "A", "127.0.0.60")
    dns_env.publish(None, f"_5269._tcp.{domain}", "TLSA",
                    tlsa_text(server.cert), malformed_tlsa(usage, selector, mtype, data))
    resolver = dns_env.resolver(timeout=3.0)
    started = time.monotonic()
    answer = trio.run(resolver.lookup, f"_5269._tcp.{domain}", "TLSA")
    # Answered at once, validated, both records there — not a timeout after 3 s.
    assert time.monotonic() - started < 2.0
    assert answer.status is SECURE and len(answer.rrset) == 2, answer.describe()

    peer = run_gather(resolver, domain)
    evidence = peer.for_inbound()
    assert evidence.tlsa_status is SECURE and len(evidence.tlsa) == 2
    verdict = decide(server.chain, evidence, Policy(require="dane"), trust=None)
    assert verdict.accepted and verdict.prooftype == "dane-ee", verdict.reason

    # The same two records through `verify` (the offline path) give the same verdict.
    bad_text = f"{usage} {selector} {mtype} {data.hex()}"
    cli = _verify(server, domain, tlsa_text(server.cert), bad_text, require="dane")
    assert cli["verdict"] == "accept" and cli["prooftype"] == "dane-ee"

    # Alone, the malformed record is unusable and named in the reason, exactly as verify says.
    dns_env.publish(None, f"_5269._tcp.{domain}", "TLSA", malformed_tlsa(usage, selector, mtype, data))
    alone = decide(server.chain, run_gather(dns_env.resolver(), domain).for_inbound(), Policy(require="dane"),
                   trust=None)
    assert not alone.accepted
    assert alone.reason.startswith("require=dane but no usable TLSA record") and why in alone.reason
    cli_alone = _verify(server, domain, bad_text, require="dane")
    assert cli_alone["verdict"] == "reject" and why in cli_alone["reason"]


def test_malformed_record_alone_under_dane_or_pkix_lets_pkix_decide(dns_env, ca, trust):
    domain = dns_env.fresh(dns_env.secure, "mal")
    server = ca.issue([domain])
    dns_env.publish(None, domain, "A", "127.0.0.61")
    dns_env.publish(None, f"_5269._tcp.{domain}", "TLSA", malformed_tlsa(3, 1, 2, bytes(32)))
    peer = run_gather(dns_env.resolver(), domain)
    verdict = decide(server.chain, peer.for_inbound(), Policy(), trust=trust)
    assert verdict.accepted and verdict.prooftype == "pkix"
    assert "no usable TLSA record" in verdict.reason and "digest is 32 bytes, expected 64" in verdict.reason


def test_unparsable_record_of_another_type_is_a_bad_response():
    # Only TLSA is read leniently: a 3-byte A record makes the response bad (-> bogus at
    # once in the resolver), never a record silently dropped or a wait for another datagram.
    import dns.exception
    import dns.message
    import dns.rdata
    import dns.rrset

    from policy.dns_wire import parse_response

    query = dns.message.make_query("x.example.", "A")
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_rdata("x.example.", 60, dns.rdata.GenericRdata(1, 1, b"\x7f\x00\x00")))
    with pytest.raises(dns.exception.FormError):
        parse_response(response.to_wire())
    tlsa = dns.message.make_response(dns.message.make_query("x.example.", "TLSA"))
    tlsa.answer.append(dns.rrset.from_rdata("x.example.", 60, dns.rdata.GenericRdata(1, 52, b"\x03\x01\x01" + bytes(20))))
    (rrset,) = parse_response(tlsa.to_wire()).answer
    assert [r.to_text() for r in rrset] == ["\\# 23 030101" + "00" * 20]


def _verify(server, domain: str, *tlsa: str, require: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        chain = Path(tmp) / "chain.pem"
        chain.write_bytes(server.chain_pem())
        args = [sys.executable, "-m", "proxy", "verify", "--chain", str(chain), "--domain", domain,
                "--require", require, "--json"]
        for record in tlsa:
            args += ["--tlsa", record]
        done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


# ---------------------------------------------------------------------------------------------
# 2. CNAME at a TLSA base domain (RFC 7671 §7, DESIGN §2.1 item 3)


def _alias(dns_env, zone: str, target_zone: str | None = None) -> tuple[str, str]:
    """D (no SRV) CNAME host; host has an address.  Returns (D, host)."""
    domain = dns_env.fresh(zone, "alias")
    host = dns_env.fresh(target_zone or zone, "host")
    with dns_env.batch():
        dns_env.publish(None, domain, "CNAME", host + ".")
        dns_env.publish(None, host, "A", "127.0.0.62")
    return domain, host


def test_cname_base_domain_non_matching_tlsa_at_expansion_rejects(dns_env, ca, trust):
    # The issue's downgrade: D CNAME host, host pins another key; a CA certificate for D
    # used to be accepted by PKIX because only _5269._tcp.D (NXDOMAIN) was asked.
    domain, host = _alias(dns_env, dns_env.secure)
    dns_env.publish(None, f"_5269._tcp.{host}", "TLSA", tlsa_text(self_signed([host]).cert))
    server = ca.issue([domain])
    peer = run_gather(dns_env.resolver(), domain)
    (target,) = peer.targets
    assert target.alias == host and target.tlsa_name == f"_5269._tcp.{host}"
    for evidence in (peer.for_inbound(), peer.for_target(target)):
        verdict = decide(server.chain, evidence, Policy(), trust=trust)
        assert not verdict.accepted and "no fallback to PKIX" in verdict.reason, verdict.reason


def test_cname_base_domain_matching_tlsa_only_at_expansion_accepts_under_require_dane(dns_env):
    domain, host = _alias(dns_env, dns_env.secure)
    server = self_signed([domain])
    dns_env.publish(None, f"_5269._tcp.{host}", "TLSA", tlsa_text(server.cert))
    peer = run_gather(dns_env.resolver(), domain)
    verdict = decide(server.chain, peer.for_inbound(), Policy(require="dane"), trust=None)
    assert verdict.accepted and verdict.prooftype == "dane-ee"
    assert verdict.dns[f"TLSA _5269._tcp.{host}"] == "secure"


def test_cname_base_domain_falls_back_to_the_original_name(dns_env):
    # RFC 7671 §7: no TLSA at the expanded name -> TLSA at the original name.
    domain, host = _alias(dns_env, dns_env.secure)
    server = self_signed([domain])
    dns_env.publish(None, f"_5269._tcp.{domain}", "TLSA", tlsa_text(server.cert))
    peer = run_gather(dns_env.resolver(), domain)
    assert peer.targets[0].alias is None and peer.targets[0].tlsa_name == f"_5269._tcp.{domain}"
    verdict = decide(server.chain, peer.for_inbound(), Policy(require="dane"), trust=None)
    assert verdict.accepted and verdict.prooftype == "dane-ee"


def test_expanded_name_is_a_reference_identifier_for_dane_ta_only(dns_env, ca, trust):
    domain, host = _alias(dns_env, dns_env.secure)
    server = ca.issue([host])          # names only the expanded name
    dns_env.publish(None, f"_5269._tcp.{host}", "TLSA", tlsa_text(ca.cert, 2, 1, 1))
    peer = run_gather(dns_env.resolver(), domain)
    verdict = decide([*server.chain, ca.cert], peer.for_inbound(), Policy(require="dane"), trust=trust)
    assert verdict.accepted and verdict.prooftype == "dane-ta" and host in (verdict.identity or "")
    # PKIX never takes the expanded name as a reference identifier.
    dns_env.remove(None, f"_5269._tcp.{host}", "TLSA")
    pkix = decide(server.chain, run_gather(dns_env.resolver(), domain).for_inbound(), Policy(), trust=trust)
    assert not pkix.accepted and "PKIX: leaf names none of" in pkix.reason


def test_insecure_cname_hop_gives_no_dane_from_the_expansion(dns_env, ca, trust):
    domain, host = _alias(dns_env, dns_env.secure, dns_env.insecure)
    dns_env.publish(None, f"_5269._tcp.{host}", "TLSA", tlsa_text(self_signed([host]).cert))  # unsigned
    server = ca.issue([domain])
    peer = run_gather(dns_env.resolver(), domain)
    assert peer.targets[0].alias is None
    assert f"TLSA _5269._tcp.{host}" not in peer.statuses  # never asked: the chain is not secure
    dane = decide(server.chain, peer.for_inbound(), Policy(require="dane"), trust=trust)
    assert not dane.accepted and dane.reason.startswith("require=dane but")
    pkix = decide(server.chain, peer.for_inbound(), Policy(), trust=trust)
    assert pkix.accepted and pkix.prooftype == "pkix"


def test_cname_at_a_secure_srv_target(dns_env):
    domain = dns_env.fresh(dns_env.secure, "srvalias")
    target, host = dns_env.fresh(dns_env.secure, "t"), dns_env.fresh(dns_env.secure, "real")
    server = self_signed([domain])
    with dns_env.batch():
        dns_env.publish(None, f"_xmpp-server._tcp.{domain}", "SRV", f"0 0 5270 {target}.")
        dns_env.publish(None, target, "CNAME", host + ".")
        dns_env.publish(None, host, "A", "127.0.0.63")
        dns_env.publish(None, f"_5270._tcp.{host}", "TLSA", tlsa_text(server.cert))
    peer = run_gather(dns_env.resolver(), domain)
    (t,) = peer.targets
    assert t.delegated and t.alias == host
    verdict = decide(server.chain, peer.for_target(t), Policy(require="dane"), trust=None)
    assert verdict.accepted and verdict.prooftype == "dane-ee"


@pytest.mark.parametrize("zone,usable", [("secure", True), ("insecure", False)])
def test_cname_at_the_tlsa_owner_name(dns_env, zone, usable):
    domain = dns_env.fresh(dns_env.secure, "owner")
    other = dns_env.fresh(getattr(dns_env, zone), "tlsa")
    server = self_signed([domain])
    with dns_env.batch():
        dns_env.publish(None, domain, "A", "127.0.0.64")
        dns_env.publish(None, f"_5269._tcp.{domain}", "CNAME", other + ".")
        dns_env.publish(None, other, "TLSA", tlsa_text(server.cert))
    evidence = run_gather(dns_env.resolver(), domain).for_inbound()
    verdict = decide(server.chain, evidence, Policy(require="dane"), trust=None)
    assert verdict.accepted is usable, verdict.reason
    assert evidence.tlsa_status is (SECURE if usable else INSECURE)


# ---------------------------------------------------------------------------------------------
# 3. A resolver that does not validate (dns.probe, DESIGN §2.1 item 5)


def test_probe_against_a_non_validating_resolver_makes_insecure_unvalidated(dns_env, ca, trust):
    domain = dns_env.fresh(dns_env.secure, "probe")
    server = ca.issue([domain])
    dns_env.publish(None, domain, "A", "127.0.0.65")
    plain = dns_env.nonvalidating_address
    # Without a probe (today's behaviour) the secure zone looks insecure and PKIX decides:
    # DANE silently off.
    blind = Resolver([plain], timeout=3.0)
    assert trio.run(blind.lookup, domain, "A").status is INSECURE
    assert decide(server.chain, run_gather(blind, domain).for_inbound(), Policy(), trust=trust).accepted

    probed = Resolver([plain], timeout=3.0, probe=".")
    answer = trio.run(probed.lookup, domain, "A")
    assert answer.status is UNVALIDATED and answer.failed
    assert f"resolver {plain} does not validate DNSSEC: probe '.' answered without the AD bit" in answer.reason
    verdict = decide(server.chain, run_gather(probed, domain).for_inbound(), Policy(require="pkix"), trust=trust)
    assert not verdict.accepted
    assert "is unvalidated" in verdict.reason and f"resolver {plain}" in verdict.reason
    assert "probe '.'" in verdict.reason and "failing closed" in verdict.reason


def test_probe_against_the_validating_resolver_changes_nothing(dns_env, ca, trust):
    domain = dns_env.fresh(dns_env.insecure, "probe")
    server = ca.issue([domain])
    dns_env.publish(None, domain, "A", "127.0.0.66")
    resolver = Resolver([dns_env.resolver_address], timeout=3.0, probe=".")
    assert trio.run(resolver.lookup, domain, "A").status is INSECURE
    (result,) = trio.run(resolver.probe)
    assert result.ok and resolver.validation_problem() == ""
    assert decide(server.chain, run_gather(resolver, domain).for_inbound(), Policy(), trust=trust).accepted


def test_probe_metric_and_log_line(dns_env, caplog):
    from proxy.config import DnsConfig
    from proxy.metrics import Metrics
    from proxy.resolver import make_resolver

    metrics = Metrics(process_metrics=False)
    plain = dns_env.nonvalidating_address
    resolver = make_resolver(DnsConfig(nameservers=[plain], timeout=3.0), metrics=metrics)
    with caplog.at_level("INFO", logger="xmpp_dane_proxy.dns"):
        trio.run(resolver.probe)
    body = metrics.exposition()[0].decode()
    assert f'xmpp_dane_proxy_dns_resolver_validating{{resolver="{plain}"}} 0.0' in body
    (record,) = [r for r in caplog.records if r.name == "xmpp_dane_proxy.dns"]
    assert record.levelname == "ERROR" and "does not validate DNSSEC" in record.getMessage() + str(record.__dict__)


def test_check_names_the_non_validating_resolver(dns_env, tmp_path):
    from proxy.check import run_check

    domain = dns_env.fresh(dns_env.secure, "probe")
    dns_env.publish(None, domain, "A", "127.0.0.67")
    config = tmp_path / "config.toml"
    (tmp_path / "policy.d").mkdir()
    config.write_text(f'[dns]\nnameservers = ["{dns_env.nonvalidating_address}"]\ntimeout = 3.0\n'
                      f'[policy]\ndir = "{tmp_path / "policy.d"}"\n')
    out = io.StringIO()
    code = trio.run(lambda: run_check(domain=domain, config=str(config), out=out))
    text = out.getvalue()
    assert code == 1, text
    assert "unvalidated" in text and f"resolver {dns_env.nonvalidating_address} does not validate" in text


# ---------------------------------------------------------------------------------------------
# 4. An unreadable policy directory or file is an error (DESIGN §2.4)


def _world_readable_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="policy-perm-"))
    path.chmod(0o755)
    return path


def _load_as_nobody(policy_dir: Path) -> tuple[int, str]:
    """`PolicySet.load(policy_dir)` in a forked child that has become `nobody`: (exit code,
    output).  A fork, not a new interpreter, so the child needs no read access to the source
    tree (CI's clone may sit in a directory only root can enter)."""
    import pwd
    import grp
    nobody = pwd.getpwnam("nobody")
    nogroup = grp.getgrnam("nogroup").gr_gid if "nogroup" in {g.gr_name for g in grp.getgrall()} else nobody.pw_gid
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root for good, load, report, exit without pytest's teardown
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(nogroup, nogroup, nogroup)
            os.setresuid(nobody.pw_uid, nobody.pw_uid, nobody.pw_uid)
            try:
                loaded = PolicySet.load(policy_dir)
                text, code = f"loaded {loaded.files}", 0
            except PolicyError as exc:
                text, code = "\n".join(exc.messages), 3
            os.write(write_end, text.encode())
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the load as another user")
def test_unreadable_policy_dir_is_an_error_for_the_service_user():
    base = _world_readable_dir()
    try:
        policy_dir = base / "policy.d"
        policy_dir.mkdir()
        (policy_dir / "evil.example.toml").write_text('require = "block"\n')
        policy_dir.chmod(0o700)  # root only: the service user (nobody) cannot list it
        code, out = _load_as_nobody(policy_dir)
        assert code == 3, out
        assert out.strip() == f"{policy_dir}:0: policy directory cannot be read: Permission denied"
        # And a readable directory with one unreadable file: that file is an error too.
        policy_dir.chmod(0o755)
        (policy_dir / "evil.example.toml").chmod(0o600)
        code, out = _load_as_nobody(policy_dir)
        assert code == 3, out
        assert f"{policy_dir / 'evil.example.toml'}:0: cannot read" in out
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_policy_file_that_is_not_a_regular_file_is_an_error(tmp_path):
    # A FIFO named *.toml would block the read forever; a dangling symlink is a missing file.
    policy_dir = tmp_path / "policy.d"
    policy_dir.mkdir()
    os.mkfifo(policy_dir / "fifo.example.toml")
    (policy_dir / "gone.example.toml").symlink_to(tmp_path / "nowhere.toml")
    with pytest.raises(PolicyError) as info:
        PolicySet.load(policy_dir)
    assert sorted(info.value.messages) == [
        f"{policy_dir / 'fifo.example.toml'}:0: policy file is not a regular file",
        f"{policy_dir / 'gone.example.toml'}:0: policy file cannot be read: No such file or directory",
    ]


def test_reload_with_an_unreadable_policy_file_keeps_the_old_state(tmp_path):
    from proxy.reload import StateHolder

    policy_dir = tmp_path / "policy.d"
    policy_dir.mkdir()
    (policy_dir / "evil.example.toml").write_text('require = "block"\n')
    config = tmp_path / "config.toml"
    config.write_text(f'[policy]\ndir = "{policy_dir}"\n')
    holder = StateHolder(config, build_tls=lambda state: None)
    assert holder.state.policies.for_domain("evil.example").require == "block"
    os.mkfifo(policy_dir / "new.example.toml")
    result = holder.reload()
    assert not result.ok
    assert any("new.example.toml:0: policy file is not a regular file" in m for m in result.errors)
    assert holder.state.policies.for_domain("evil.example").require == "block"


def test_check_config_says_when_the_resolver_does_not_validate(dns_env, tmp_path):
    (tmp_path / "policy.d").mkdir()
    config = tmp_path / "config.toml"
    cert, key = self_signed(["home.example"]).write(tmp_path, "home")
    for address, warned in ((dns_env.nonvalidating_address, True), (dns_env.resolver_address, False)):
        config.write_text(f'[dns]\nnameservers = ["{address}"]\ntimeout = 2.0\n'
                          f'[policy]\ndir = "{tmp_path / "policy.d"}"\n'
                          f'[[domain]]\nname = "home.example"\ncert = "{cert}"\nkey = "{key}"\n')
        done = subprocess.run([sys.executable, "-m", "proxy", "check-config", "-c", str(config)],
                              capture_output=True, text=True, cwd=REPO, timeout=60)
        assert done.returncode == 0 and done.stdout.startswith(f"{config}: ok"), done.stdout + done.stderr
        expected = (f"warning: dns: resolver {address} does not validate DNSSEC: probe '.' answered "
                    f"without the AD bit; while it does not, every answer that would be insecure counts "
                    f"as unvalidated and rejects\n")
        assert done.stderr == (expected if warned else ""), done.stderr


# ---------------------------------------------------------------------------------------------
# Property: reading an RRset record by record loses nothing and decides like `verify`

from hypothesis import given, settings, strategies as st  # noqa: E402

_records = st.lists(
    st.tuples(st.sampled_from([2, 3]), st.sampled_from([0, 1]), st.sampled_from([0, 1, 2]),
              st.binary(min_size=0, max_size=80)),
    min_size=1, max_size=6, unique=True)


@settings(max_examples=200, deadline=None)
@given(_records)
def test_every_record_survives_the_wire_and_malformed_ones_are_named(records):
    import dns.message
    import dns.rdata
    import dns.rrset

    from policy.dns import Answer
    from policy.dns_wire import parse_response
    from policy.peer_evidence import tlsa_from_answer
    from policy.tlsa import TlsaRecord, usable_records

    query = dns.message.make_query("_5269._tcp.x.example.", "TLSA")
    response = dns.message.make_response(query)
    raw = [bytes((u, s, m)) + data for u, s, m, data in records]
    response.answer.append(dns.rrset.from_rdata_list(
        "_5269._tcp.x.example.", 60, [dns.rdata.GenericRdata(1, 52, r) for r in raw]))
    (rrset,) = parse_response(response.to_wire()).answer
    answer = Answer("_5269._tcp.x.example", "TLSA", SECURE, tuple(rrset), 60)
    parsed = tlsa_from_answer(answer)
    # Nothing lost, nothing altered: every record comes back with its bytes.
    assert sorted((r.usage, r.selector, r.mtype, r.data) for r in parsed) == sorted(records)
    assert all(isinstance(r, TlsaRecord) for r in parsed)
    # A record is usable exactly when its digest length fits (or a type-0 parses); the
    # unusable ones are named with why — the same rules `verify --tlsa` applies.
    usable = usable_records(parsed, {2, 3})
    for text, why in usable.ignored:
        assert why
    for record in usable.usable:
        assert record.mtype != 1 or len(record.data) == 32
        assert record.mtype != 2 or len(record.data) == 64
