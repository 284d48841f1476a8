"""policy.peer_evidence against real DNS (tests/dnsenv.py): SRV targets, delegation, TLSA
placement and failure handling (DESIGN §2.1, RFC 6120 §3.2, XEP-0368, RFC 7673), and end to
end with the verdict (policy.decide) on evidence gathered from the validating resolver."""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest
import trio

from pki import TestCA, self_signed
from policy.dns import Resolver
from policy.evidence import DnsStatus
from policy.peer_evidence import PeerEvidence, gather, order_srv
from policy.tlsa import TlsaRecord, record_for


SECURE, INSECURE, BOGUS, TIMEOUT = DnsStatus.SECURE, DnsStatus.INSECURE, DnsStatus.BOGUS, DnsStatus.TIMEOUT


def run_gather(resolver: Resolver, domain: str, **kwargs) -> PeerEvidence:
    async def main() -> PeerEvidence:
        return await gather(domain, resolver, **kwargs)

    return trio.run(main)


def tlsa_text(cert, usage=3, selector=1, mtype=1) -> str:
    return str(record_for(cert, usage, selector, mtype))


def record(cert, usage=3, selector=1, mtype=1) -> TlsaRecord:
    return record_for(cert, usage, selector, mtype)


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA("Peer Evidence Test Root")


# ---------------------------------------------------------------------------------------------
# Secure delegation


def test_secure_srv_and_tlsa_delegate_the_target(dns_env):
    domain = dns_env.fresh(dns_env.secure)
    target = dns_env.fresh(dns_env.secure, "xmpp")
    cert = self_signed([target]).cert
    dns_env.publish_xmpp(domain, target, 5270, "127.0.0.20", cert, "3 1 1", "3 0 1")

    peer = run_gather(dns_env.resolver(), domain)
    assert not peer.failed and not peer.no_service
    (t,) = peer.targets
    assert (t.host, t.port, t.direct_tls, t.srv_secure, t.delegated) == (target, 5270, False, True, True)
    assert t.addresses == ("127.0.0.20",) and t.address_status is SECURE
    assert t.tlsa_name == f"_5270._tcp.{target}" and t.tlsa_status is SECURE
    assert set(t.tlsa) == {record(cert), record(cert, 3, 0, 1)}

    out = peer.for_target(t)
    assert out.domain == domain and out.delegated_targets == (target,)
    assert out.tlsa_status is SECURE and set(out.tlsa) == set(t.tlsa)
    assert out.statuses[f"SRV _xmpp-server._tcp.{domain}"] is SECURE
    assert out.statuses[f"SRV _xmpps-server._tcp.{domain}"] is SECURE  # secure NXDOMAIN
    assert out.statuses[f"A {target}"] is SECURE and out.statuses[f"AAAA {target}"] is SECURE
    assert out.statuses[f"TLSA _5270._tcp.{target}"] is SECURE
    # No lookup at _5269._tcp.D: with a secure SRV the TLSA base is the target (RFC 7673).
    assert peer.domain_tlsa_status is None

    inbound = peer.for_inbound()
    assert inbound.delegated_targets == (target,) and inbound.tlsa_status is SECURE
    assert set(inbound.tlsa) == set(t.tlsa)


def test_inbound_unions_tlsa_of_all_delegated_targets(dns_env):
    domain = dns_env.fresh(dns_env.secure)
    a, b = dns_env.fresh(dns_env.secure, "a"), dns_env.fresh(dns_env.secure, "b")
    cert_a, cert_b = self_signed([a]).cert, self_signed([b]).cert
    with dns_env.batch():
        dns_env.publish(None, f"_xmpp-server._tcp.{domain}", "SRV", f"10 0 5269 {a}.", f"20 0 5269 {b}.")
        dns_env.publish(None, a, "A", "127.0.0.21")
        dns_env.publish(None, b, "A", "127.0.0.22")
        dns_env.publish(None, f"_5269._tcp.{a}", "TLSA", tlsa_text(cert_a))
        dns_env.publish(None, f"_5269._tcp.{b}", "TLSA", tlsa_text(cert_b), tlsa_text(cert_a))
    peer = run_gather(dns_env.resolver(), domain)
    assert [t.host for t in peer.targets] == [a, b]  # priority order
    inbound = peer.for_inbound()
    assert set(inbound.delegated_targets) == {a, b}
    assert inbound.tlsa_status is SECURE
    assert sorted(inbound.tlsa, key=str) == sorted({record(cert_a), record(cert_b)}, key=str)
    # Outbound evidence is per target: only that target's RRset and name.
    assert peer.for_target(peer.targets[0]).tlsa == (record(cert_a),)
    assert peer.for_target(peer.targets[0]).delegated_targets == (a,)


def test_srv_secure_but_target_address_insecure_is_not_delegated(dns_env):
    domain = dns_env.fresh(dns_env.secure)
    target = dns_env.fresh(dns_env.insecure, "xmpp")
    dns_env.publish_xmpp(domain, target, 5269, "127.0.0.23", self_signed([target]).cert)
    peer = run_gather(dns_env.resolver(), domain)
    (t,) = peer.targets
    assert t.srv_secure and t.address_status is INSECURE
    assert not t.delegated
    # RFC 7673: no TLSA for a target whose addresses are not secure (even though one exists).
    assert t.tlsa_status is None and t.tlsa == () and t.tlsa_name is None
    out = peer.for_target(t)
    assert out.delegated_targets == () and out.tlsa_status is None
    assert not any(k.startswith("TLSA") for k in out.statuses)


def test_srv_insecure_means_no_delegation_and_tlsa_only_at_domain(dns_env):
    domain = dns_env.fresh(dns_env.insecure)
    target = dns_env.fresh(dns_env.secure, "xmpp")
    target_cert, domain_cert = self_signed([target]).cert, self_signed([domain]).cert
    dns_env.publish_xmpp(domain, target, 5269, "127.0.0.24", target_cert)  # secure TLSA at target
    dns_env.publish(None, f"_5269._tcp.{domain}", "TLSA", tlsa_text(domain_cert))
    peer = run_gather(dns_env.resolver(), domain)
    (t,) = peer.targets
    assert not t.srv_secure and not t.delegated
    assert t.address_status is SECURE  # secure addresses do not help an insecure SRV answer
    assert t.tlsa_name == f"_5269._tcp.{domain}" and t.tlsa == (record(domain_cert),)
    assert t.tlsa_status is INSECURE
    out = peer.for_target(t)
    assert out.delegated_targets == ()
    assert out.statuses[f"SRV _xmpp-server._tcp.{domain}"] is INSECURE
    assert f"TLSA _5269._tcp.{target}" not in out.statuses  # the target's TLSA was never used
    inbound = peer.for_inbound()
    assert inbound.delegated_targets == () and inbound.tlsa == () and inbound.tlsa_status is INSECURE


def test_no_srv_falls_back_to_domain_on_5269(dns_env):
    domain = dns_env.fresh(dns_env.secure)
    cert = self_signed([domain]).cert
    dns_env.publish_xmpp(domain, None, 5269, "127.0.0.25", cert)
    peer = run_gather(dns_env.resolver(), domain)
    (t,) = peer.targets
    assert (t.host, t.port, t.direct_tls, t.fallback, t.delegated) == (domain, 5269, False, True, False)
    assert t.addresses == ("127.0.0.25",)
    assert t.tlsa_name == f"_5269._tcp.{domain}" and t.tlsa == (record(cert),) and t.tlsa_status is SECURE
    assert peer.for_target(t).tlsa_status is SECURE
    assert peer.for_inbound().tlsa == (record(cert),)


def test_srv_target_dot_means_no_service(dns_env):
    domain = dns_env.fresh(dns_env.secure)
    dns_env.publish(None, f"_xmpp-server._tcp.{domain}", "SRV", "0 0 0 .")
    dns_env.publish(None, domain, "A", "127.0.0.26")  # must not be used as a fallback
    peer = run_gather(dns_env.resolver(), domain)
    assert peer.no_service and peer.targets == () and not peer.failed
    inbound = peer.for_inbound()
    assert inbound.delegated_targets == ()
    assert inbound.tlsa_status is SECURE and inbound.tlsa == ()  # secure denial at _5269._tcp.D


def test_direct_tls_merged_with_starttls_by_priority(dns_env):
    domain = dns_env.fresh(dns_env.secure)
    t1, t2 = dns_env.fresh(dns_env.secure, "tls"), dns_env.fresh(dns_env.secure, "starttls")
    dns_env.publish_xmpp(domain, t1, 5223, "127.0.0.27", self_signed([t1]).cert, direct_tls=True, priority=5)
    dns_env.publish_xmpp(domain, t2, 5269, "127.0.0.28", self_signed([t2]).cert, priority=10)
    peer = run_gather(dns_env.resolver(), domain)
    assert [(t.host, t.port, t.direct_tls) for t in peer.targets] == [(t1, 5223, True), (t2, 5269, False)]
    assert all(t.delegated and t.tlsa_status is SECURE for t in peer.targets)
    assert peer.targets[0].tlsa_name == f"_5223._tcp.{t1}"


def test_direct_tls_only_does_not_trigger_fallback(dns_env):
    domain = dns_env.fresh(dns_env.secure)
    target = dns_env.fresh(dns_env.secure, "tls")
    dns_env.publish_xmpp(domain, target, 5223, "127.0.0.29", None, direct_tls=True)
    peer = run_gather(dns_env.resolver(), domain)
    assert [(t.host, t.direct_tls, t.fallback) for t in peer.targets] == [(target, True, False)]
    assert peer.targets[0].tlsa_status is SECURE and peer.targets[0].tlsa == ()  # secure NXDOMAIN


# ---------------------------------------------------------------------------------------------
# Failures are never absence


def test_bogus_srv_fails_closed(dns_env):
    domain = dns_env.fresh(dns_env.bogus)
    target = dns_env.fresh(dns_env.secure, "xmpp")
    dns_env.publish_xmpp(domain, target, 5269, "127.0.0.30", self_signed([target]).cert)
    dns_env.publish(None, domain, "A", "127.0.0.31")
    peer = run_gather(dns_env.resolver(), domain)
    assert peer.failed and peer.failure is BOGUS
    assert peer.targets == ()  # no fallback to the domain's own address, nothing weaker
    assert "SERVFAIL" in peer.reason
    inbound = peer.for_inbound()
    assert inbound.statuses[f"SRV _xmpp-server._tcp.{domain}"] is BOGUS


def test_bogus_tlsa_at_delegated_target_is_carried_as_bogus(dns_env):
    domain = dns_env.fresh(dns_env.secure)
    target = dns_env.fresh(dns_env.secure, "xmpp")
    cert = self_signed([target]).cert
    dns_env.publish_xmpp(domain, target, 5269, "127.0.0.32", None)
    dns_env.publish(None, f"_5269._tcp.{target}", "TLSA", tlsa_text(cert), broken_signature=True)
    peer = run_gather(dns_env.resolver(), domain)
    (t,) = peer.targets
    assert t.delegated and t.tlsa_status is BOGUS and t.tlsa == ()
    out = peer.for_target(t)
    assert out.tlsa_status is BOGUS and out.statuses[f"TLSA _5269._tcp.{target}"] is BOGUS
    assert peer.for_inbound().tlsa_status is BOGUS


def test_bogus_target_address_is_in_the_evidence(dns_env):
    domain = dns_env.fresh(dns_env.secure)
    good, broken = dns_env.fresh(dns_env.secure, "good"), dns_env.fresh(dns_env.bogus, "broken")
    dns_env.publish_xmpp(domain, good, 5269, "127.0.0.33", None, priority=1)
    dns_env.publish_xmpp(domain, broken, 5269, "127.0.0.34", None, priority=2)
    peer = run_gather(dns_env.resolver(), domain)
    first, second = peer.targets
    assert first.host == good and not any(s.failed for s in peer.for_target(first).statuses.values())
    assert second.host == broken and second.address_status is BOGUS and not second.delegated
    assert peer.for_target(second).statuses[f"A {broken}"] is BOGUS
    assert peer.for_inbound().statuses[f"A {broken}"] is BOGUS  # inbound sees every piece


def test_resolver_timeout_fails_closed(dns_env):
    peer = run_gather(Resolver([dns_env.blackhole], timeout=0.3), dns_env.fresh(dns_env.secure))
    assert peer.failed and peer.failure is TIMEOUT and peer.targets == ()
    assert all(s is TIMEOUT for s in peer.for_inbound().statuses.values())


# ---------------------------------------------------------------------------------------------
# Static evidence from a policy file


def test_static_srv_and_tlsa_replace_lookups(dns_env):
    domain = dns_env.fresh(dns_env.insecure)  # a peer without DNSSEC
    target = dns_env.fresh(dns_env.secure, "xmpp")
    cert = self_signed([target]).cert
    dns_env.publish(None, target, "A", "127.0.0.35")
    # A forged-looking SRV in DNS that the policy file overrides:
    dns_env.publish(None, f"_xmpp-server._tcp.{domain}", "SRV", f"0 0 5269 elsewhere.{dns_env.insecure}.")
    resolver = dns_env.resolver()
    static = (record(cert),)
    peer = run_gather(resolver, domain, static_srv=[(0, 0, 5299, target + ".")], static_tlsa=static)
    (t,) = peer.targets
    assert (t.host, t.port, t.direct_tls) == (target, 5299, False)
    assert t.srv_secure and t.delegated  # static SRV: delegated by the operator's policy file
    assert t.tlsa == static and t.tlsa_status is SECURE and t.tlsa_name == "policy"
    out = peer.for_target(t)
    assert out.tlsa == static and out.tlsa_status is SECURE and out.delegated_targets == (target,)
    assert set(out.statuses) == {
        f"SRV _xmpp-server._tcp.{domain} (policy)", f"A {target}", f"AAAA {target}", "TLSA policy",
    }
    assert sum(resolver.stats.values()) == 2  # only A and AAAA went to DNS: no SRV, no TLSA


def test_static_srv_is_delegated_by_the_operator_and_inbound_needs_no_addresses(dns_env):
    """A peer without any DNS we can reach: the policy file's SRV and TLSA are the evidence.
    Judging an inbound peer needs no address lookup at all (we will not connect to it)."""
    target = "xmpp.peer.example"
    cert = self_signed([target]).cert
    resolver = Resolver([dns_env.blackhole], timeout=0.3)   # nobody answers
    peer = run_gather(resolver, "peer.example", static_srv=[(0, 0, 5269, target)],
                      static_tlsa=[record(cert)], inbound=True)
    (t,) = peer.targets
    assert t.delegated and t.addresses == () and t.address_status is None
    out = peer.for_inbound()
    assert out.tlsa_status is SECURE and out.delegated_targets == (target,)
    assert not any(s.failed for s in out.statuses.values())
    assert sum(resolver.stats.values()) == 0
    # Outbound must connect, so it looks the addresses up, and their failure still counts.
    peer = run_gather(resolver, "peer.example", static_srv=[(0, 0, 5269, target)], static_tlsa=[record(cert)])
    assert peer.targets[0].address_status is TIMEOUT


def test_static_tlsa_with_dns_srv(dns_env):
    from policy.policyfile import SrvRecord

    domain = dns_env.fresh(dns_env.insecure)
    target = dns_env.fresh(dns_env.insecure, "xmpp")
    cert = self_signed([target]).cert
    dns_env.publish_xmpp(domain, target, 5269, "127.0.0.36", None)
    peer = run_gather(dns_env.resolver(), domain, static_tlsa=[record(cert)])
    (t,) = peer.targets
    assert not t.delegated and t.tlsa == (record(cert),) and t.tlsa_status is SECURE
    # A policy-file SrvRecord object is accepted as well as a tuple.
    peer2 = run_gather(dns_env.resolver(), domain, static_srv=[SrvRecord(0, 0, 5269, target)])
    assert [t.host for t in peer2.targets] == [target]


# ---------------------------------------------------------------------------------------------
# RFC 2782 ordering


@dataclass(frozen=True)
class R:
    priority: int
    weight: int
    name: str


def test_order_by_priority_then_weight():
    records = [R(20, 0, "c"), R(10, 60, "a"), R(10, 40, "b"), R(30, 0, "d")]
    first = Counter()
    for seed in range(400):
        ordered = order_srv(records, random.Random(seed))
        assert [r.priority for r in ordered] == [10, 10, 20, 30]
        first[ordered[0].name] += 1
    # Weighted: "a" (60) leads about 60 % of the time, "b" (40) about 40 %.
    assert 200 < first["a"] < 280 and 120 < first["b"] < 200


def test_zero_weight_rarely_first():
    records = [R(0, 0, "zero"), R(0, 100, "heavy")]
    leads = Counter(order_srv(records, random.Random(seed))[0].name for seed in range(300))
    assert leads["heavy"] > 280  # zero weight is chosen first only when 0 is drawn (1 in 101)


def test_injected_rng_makes_order_reproducible(dns_env):
    domain = dns_env.fresh(dns_env.secure)
    hosts = [dns_env.fresh(dns_env.secure, f"h{i}-") for i in range(4)]
    with dns_env.batch():
        dns_env.publish(None, f"_xmpp-server._tcp.{domain}", "SRV", *(f"0 10 5269 {h}." for h in hosts))
        for i, h in enumerate(hosts):
            dns_env.publish(None, h, "A", f"127.0.1.{i + 1}")
    resolver = dns_env.resolver()
    orders = [tuple(t.host for t in run_gather(resolver, domain, rng=random.Random(7)).targets) for _ in range(3)]
    assert orders[0] == orders[1] == orders[2] and sorted(orders[0]) == sorted(hosts)
    many = {tuple(t.host for t in run_gather(resolver, domain, rng=random.Random(s)).targets) for s in range(12)}
    assert len(many) > 1  # and different seeds do shuffle equal-priority targets


# ---------------------------------------------------------------------------------------------
# End to end: chain + evidence from the validating resolver -> Verdict (policy.decide)


def _decide(chain, evidence, tmp_path=None, ca=None):
    from policy.decide import decide
    from policy.pkix import TrustStore
    from policy.policyfile import PolicySet

    trust = None
    if ca is not None:
        path = ca.write_root(tmp_path / "root.pem")
        trust = TrustStore.load(path)
    policy = PolicySet.load(None).for_domain(evidence.domain)
    return decide(chain, evidence, policy, trust=trust)


def test_e2e_secure_match_accepts_by_dane_ee(dns_env):
    domain = dns_env.fresh(dns_env.secure)
    target = dns_env.fresh(dns_env.secure, "xmpp")
    server = self_signed([target])
    dns_env.publish_xmpp(domain, target, 5269, "127.0.0.40", server.cert)
    peer = run_gather(dns_env.resolver(), domain)
    verdict = _decide(server.chain, peer.for_target(peer.targets[0]))
    assert verdict.accepted and verdict.prooftype == "dane-ee"
    assert verdict.matched == record(server.cert)
    assert verdict.dns[f"TLSA _5269._tcp.{target}"] == "secure"
    inbound = _decide(server.chain, peer.for_inbound())
    assert inbound.accepted and inbound.prooftype == "dane-ee"


def test_e2e_dane_ta_accepts_delegated_target_name(dns_env, ca, tmp_path):
    domain = dns_env.fresh(dns_env.secure)
    target = dns_env.fresh(dns_env.secure, "xmpp")
    server = ca.issue([target])  # names only the SRV target, not the domain
    dns_env.publish_xmpp(domain, target, 5269, "127.0.0.41", ca.cert, "2 1 1")
    peer = run_gather(dns_env.resolver(), domain)
    # RFC 7671 §5.2.2: with a digest of the anchor, the server must send the anchor too.
    verdict = _decide([*server.chain, ca.cert], peer.for_target(peer.targets[0]))
    assert verdict.accepted and verdict.prooftype == "dane-ta"
    assert target in (verdict.identity or "")


def test_e2e_secure_mismatch_rejects_without_pkix_fallback(dns_env, ca, tmp_path):
    domain = dns_env.fresh(dns_env.secure)
    target = dns_env.fresh(dns_env.secure, "xmpp")
    server = ca.issue([domain, target])  # PKIX-valid for both names ...
    other = self_signed([target]).cert
    dns_env.publish_xmpp(domain, target, 5269, "127.0.0.42", other)  # ... but TLSA pins another key
    peer = run_gather(dns_env.resolver(), domain)
    verdict = _decide(server.chain, peer.for_target(peer.targets[0]), tmp_path, ca)
    assert not verdict.accepted
    assert "no fallback to PKIX" in verdict.reason


def test_e2e_insecure_tlsa_is_ignored_and_pkix_decides(dns_env, ca, tmp_path):
    domain = dns_env.fresh(dns_env.insecure)
    target = dns_env.fresh(dns_env.insecure, "xmpp")
    server = ca.issue([domain])
    stranger = self_signed([domain]).cert
    dns_env.publish_xmpp(domain, target, 5269, "127.0.0.43", None)
    dns_env.publish(None, f"_5269._tcp.{domain}", "TLSA", tlsa_text(stranger))  # unsigned: ignored
    peer = run_gather(dns_env.resolver(), domain)
    evidence = peer.for_target(peer.targets[0])
    assert evidence.tlsa_status is INSECURE
    verdict = _decide(server.chain, evidence, tmp_path, ca)
    assert verdict.accepted and verdict.prooftype == "pkix"
    assert "insecure" in verdict.reason
    # The SRV target is no reference identifier when the SRV answer is insecure:
    target_only = ca.issue([target])
    refused = _decide(target_only.chain, evidence, tmp_path, ca)
    assert not refused.accepted and "PKIX" in refused.reason


def test_e2e_bogus_rejects_even_a_pkix_valid_peer(dns_env, ca, tmp_path):
    domain = dns_env.fresh(dns_env.bogus)
    server = ca.issue([domain])
    dns_env.publish(None, domain, "A", "127.0.0.44")
    peer = run_gather(dns_env.resolver(), domain)
    verdict = _decide(server.chain, peer.for_inbound(), tmp_path, ca)
    assert not verdict.accepted
    assert "bogus" in verdict.reason and "failing closed" in verdict.reason
    assert verdict.dns[f"SRV _xmpp-server._tcp.{domain}"] == "bogus"


def test_e2e_bogus_tlsa_rejects_outbound_target(dns_env, ca, tmp_path):
    domain = dns_env.fresh(dns_env.secure)
    target = dns_env.fresh(dns_env.secure, "xmpp")
    server = ca.issue([domain, target])
    dns_env.publish_xmpp(domain, target, 5269, "127.0.0.45", None)
    dns_env.publish(None, f"_5269._tcp.{target}", "TLSA", tlsa_text(server.cert), broken_signature=True)
    peer = run_gather(dns_env.resolver(), domain)
    verdict = _decide(server.chain, peer.for_target(peer.targets[0]), tmp_path, ca)
    assert not verdict.accepted and "bogus" in verdict.reason
