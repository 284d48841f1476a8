"""policy.dns against a real validating resolver: every DNSSEC status arises from real DNS
(nsd serving zones signed in the test, unbound validating them; see tests/dnsenv.py)."""
from __future__ import annotations

import time

import pytest
import trio

from policy.dns import (
    Answer,
    Nameserver,
    Resolver,
    ad_trusted,
    name_text,
    parse_nameserver,
    to_dns_name,
    weakest,
)
from policy.evidence import DnsStatus


SECURE, INSECURE, BOGUS, TIMEOUT = DnsStatus.SECURE, DnsStatus.INSECURE, DnsStatus.BOGUS, DnsStatus.TIMEOUT


def lookup(resolver: Resolver, name: str, rdtype: str) -> Answer:
    return trio.run(resolver.lookup, name, rdtype)


# ---------------------------------------------------------------------------------------------
# The four statuses, from real DNS


def test_secure_answer_from_signed_zone(dns_env):
    name = dns_env.publish(dns_env.secure, dns_env.fresh(dns_env.secure), "TLSA", "3 1 1 " + "ab" * 32)
    answer = lookup(dns_env.resolver(), name, "TLSA")
    assert answer.status is SECURE
    assert [r.to_text() for r in answer.rrset] == ["3 1 1 " + "ab" * 32]
    assert not answer.nxdomain and not answer.nodata
    assert answer.ttl == 300 and answer.key == f"TLSA {name}"


def test_insecure_answer_from_unsigned_child(dns_env):
    name = dns_env.publish(dns_env.insecure, dns_env.fresh(dns_env.insecure), "TLSA", "3 1 1 " + "cd" * 32)
    answer = lookup(dns_env.resolver(), name, "TLSA")
    assert answer.status is INSECURE
    assert len(answer.rrset) == 1  # the data is there; it is just not proven


def test_bogus_zone_gives_bogus_never_no_records(dns_env):
    name = dns_env.publish(dns_env.bogus, dns_env.fresh(dns_env.bogus), "TLSA", "3 1 1 " + "ef" * 32)
    # nsd really serves the record; unbound refuses to vouch for it (DS matches no DNSKEY).
    assert dns_env.query(name, "TLSA", via="nsd").answer
    answer = lookup(dns_env.resolver(), name, "TLSA")
    assert answer.status is BOGUS
    assert answer.failed and answer.rrset == ()
    assert not answer.nxdomain and not answer.nodata  # a failure, not proof of absence
    assert "SERVFAIL" in answer.reason


def test_broken_signature_in_secure_zone_is_bogus(dns_env):
    name = dns_env.fresh(dns_env.secure)
    dns_env.publish(dns_env.secure, name, "TLSA", "3 1 1 " + "01" * 32, broken_signature=True)
    dns_env.publish(dns_env.secure, name, "A", "127.0.0.10")  # same name, good signature
    resolver = dns_env.resolver()
    tlsa = lookup(resolver, name, "TLSA")
    assert tlsa.status is BOGUS and tlsa.rrset == ()
    assert "SERVFAIL" in tlsa.reason and "DNSSEC" in tlsa.reason  # unbound's EDE names it
    assert lookup(resolver, name, "A").status is SECURE


def test_secure_nxdomain_and_nodata_are_proofs_of_absence(dns_env):
    name = dns_env.publish(dns_env.secure, dns_env.fresh(dns_env.secure), "A", "127.0.0.11")
    resolver = dns_env.resolver()
    nx = lookup(resolver, "nothing-here." + name, "TLSA")
    assert (nx.status, nx.nxdomain, nx.nodata, nx.rrset) == (SECURE, True, False, ())
    nodata = lookup(resolver, name, "TLSA")
    assert (nodata.status, nodata.nxdomain, nodata.nodata, nodata.rrset) == (SECURE, False, True, ())
    # RFC 2308 §5: negative answers live for min(SOA TTL, SOA minimum) = 60 in the test zones.
    # unbound counts a cached proof down (the NSEC3 records the first answer brought may
    # serve the second a second later), so allow the few seconds this test runs.
    assert 55 <= nx.ttl <= 60 and 55 <= nodata.ttl <= 60


def test_insecure_nxdomain(dns_env):
    answer = lookup(dns_env.resolver(), dns_env.fresh(dns_env.insecure), "TLSA")
    assert (answer.status, answer.nxdomain) == (INSECURE, True)


def test_unresponsive_resolver_times_out(dns_env):
    resolver = Resolver([dns_env.blackhole], timeout=0.4)
    started = time.monotonic()
    answer = lookup(resolver, dns_env.fresh(dns_env.secure), "A")
    elapsed = time.monotonic() - started
    assert answer.status is TIMEOUT and answer.failed
    assert not answer.nxdomain and not answer.nodata
    assert 0.35 < elapsed < 2.0
    assert "no answer" in answer.reason
    # A timeout is never cached: the next lookup asks again (and times out again).
    lookup(resolver, answer.name, "A")
    assert resolver.stats["timeout"] == 2


def test_second_nameserver_answers_when_first_is_silent(dns_env):
    name = dns_env.publish(dns_env.secure, dns_env.fresh(dns_env.secure), "A", "127.0.0.12")
    resolver = Resolver([dns_env.blackhole, dns_env.resolver_address], timeout=1.5)
    answer = lookup(resolver, name, "A")
    assert answer.status is SECURE and answer.server == dns_env.resolver_address


def test_republished_and_removed_records_are_seen_at_once(dns_env):
    # The environment itself: a change after start is visible on the next query, although
    # unbound had the old answer cached.
    name = dns_env.publish(dns_env.secure, dns_env.fresh(dns_env.secure), "A", "127.0.0.18")
    assert [r.to_text() for r in lookup(dns_env.resolver(), name, "A").rrset] == ["127.0.0.18"]
    dns_env.publish(dns_env.secure, name, "A", "127.0.0.19")
    assert [r.to_text() for r in lookup(dns_env.resolver(), name, "A").rrset] == ["127.0.0.19"]
    dns_env.remove(dns_env.secure, name, "A")
    gone = lookup(dns_env.resolver(), name, "A")
    assert (gone.status, gone.nxdomain) == (SECURE, True)


def test_environment_starts_quickly(dns_env):
    assert 0 < dns_env.startup_seconds < 5.0


def test_refused_by_resolver_is_bogus(dns_env):
    # The test unbound refuses everything under refused.test. (tests/dnsenv.py).
    answer = lookup(dns_env.resolver(), "x.refused.test", "A")
    assert answer.status is BOGUS and "REFUSED" in answer.reason


# ---------------------------------------------------------------------------------------------
# CNAME chains (RFC 7671 §7: the expanded name's records count only if every hop is secure)


def test_cname_chain_all_secure(dns_env):
    target = dns_env.publish(dns_env.secure, dns_env.fresh(dns_env.secure), "TLSA", "3 1 1 " + "11" * 32)
    alias = dns_env.publish(dns_env.secure, dns_env.fresh(dns_env.secure), "CNAME", target + ".")
    answer = lookup(dns_env.resolver(), alias, "TLSA")
    assert answer.status is SECURE
    assert answer.cname_chain == (target,) and answer.canonical_name == target
    assert len(answer.rrset) == 1


def test_cname_secure_to_insecure_hop_is_insecure(dns_env):
    target = dns_env.publish(dns_env.insecure, dns_env.fresh(dns_env.insecure), "TLSA", "3 1 1 " + "22" * 32)
    alias = dns_env.publish(dns_env.secure, dns_env.fresh(dns_env.secure), "CNAME", target + ".")
    answer = lookup(dns_env.resolver(), alias, "TLSA")
    assert answer.status is INSECURE  # the secure first hop does not lift the insecure one
    assert answer.cname_chain == (target,)


def test_cname_insecure_to_secure_hop_is_insecure(dns_env):
    target = dns_env.publish(dns_env.secure, dns_env.fresh(dns_env.secure), "TLSA", "3 1 1 " + "33" * 32)
    alias = dns_env.publish(dns_env.insecure, dns_env.fresh(dns_env.insecure), "CNAME", target + ".")
    assert lookup(dns_env.resolver(), alias, "TLSA").status is INSECURE


def test_cname_into_bogus_zone_is_bogus(dns_env):
    target = dns_env.publish(dns_env.bogus, dns_env.fresh(dns_env.bogus), "TLSA", "3 1 1 " + "44" * 32)
    alias = dns_env.publish(dns_env.secure, dns_env.fresh(dns_env.secure), "CNAME", target + ".")
    answer = lookup(dns_env.resolver(), alias, "TLSA")
    assert answer.status is BOGUS and answer.rrset == ()


def test_cname_loop_is_a_failure_not_absence(dns_env):
    a, b = dns_env.fresh(dns_env.secure), dns_env.fresh(dns_env.secure)
    with dns_env.batch():
        dns_env.publish(None, a, "CNAME", b + ".")
        dns_env.publish(None, b, "CNAME", a + ".")
    answer = lookup(dns_env.resolver(), a, "TLSA")
    assert answer.failed and answer.rrset == () and not answer.nxdomain and not answer.nodata


def test_weakest_orders_statuses():
    assert weakest(SECURE, SECURE) is SECURE
    assert weakest(SECURE, INSECURE) is INSECURE
    assert weakest(INSECURE, TIMEOUT, SECURE) is TIMEOUT
    assert weakest(TIMEOUT, BOGUS) is BOGUS
    assert weakest(None, SECURE) is SECURE and weakest() is None


# ---------------------------------------------------------------------------------------------
# Whose AD bit counts (DESIGN §2.1)


def test_ad_trust_decision():
    assert ad_trusted("127.0.0.1") and ad_trusted("127.0.0.53") and ad_trusted("::1")
    # Not loopback and not listed: AD would be believable only over a secure path we lack.
    assert not ad_trusted("192.0.2.53")
    assert not ad_trusted("2001:db8::53")
    assert ad_trusted("192.0.2.53", ["192.0.2.53"])
    assert ad_trusted("192.0.2.53", ["192.0.2.53:5353"])  # compared by IP
    assert ad_trusted("2001:db8::53", ["[2001:db8:0::53]:53"])
    assert not ad_trusted("192.0.2.54", ["192.0.2.53"])


def test_resolver_trust_is_decided_per_configured_address():
    # No traffic is sent: only the decision the Resolver took from its configuration.
    resolver = Resolver(["127.0.0.1:5353", "192.0.2.53", "[2001:db8::1]:53"], trust_ad_from=["2001:db8::1"])
    assert resolver.trusted(Nameserver("127.0.0.1", 5353))
    assert not resolver.trusted(Nameserver("192.0.2.53", 53))
    assert resolver.trusted(Nameserver("2001:db8::1", 53))


def test_ad_bit_from_untrusted_resolver_is_ignored(dns_env):
    name = dns_env.publish(dns_env.secure, dns_env.fresh(dns_env.secure), "TLSA", "3 1 1 " + "55" * 32)
    raw = dns_env.query(name, "TLSA")
    assert raw.flags & 0x0020  # the resolver did set AD ...
    answer = lookup(dns_env.resolver(trust_ad=False), name, "TLSA")
    assert answer.status is INSECURE  # ... but from an untrusted resolver it counts for nothing
    assert len(answer.rrset) == 1


def test_authoritative_server_never_gives_secure(dns_env):
    # nsd does not validate and never sets AD: even though trusted (loopback), only insecure.
    name = dns_env.publish(dns_env.secure, dns_env.fresh(dns_env.secure), "A", "127.0.0.13")
    answer = lookup(Resolver([dns_env.nsd_address]), name, "A")
    assert answer.status is INSECURE and answer.rrset


# ---------------------------------------------------------------------------------------------
# Names, nameservers, transport, cache


def test_names_become_lowercase_a_labels(dns_env):
    alabel = to_dns_name("bücher.secure.test")
    assert name_text(alabel) == "xn--bcher-kva.secure.test"
    assert name_text(to_dns_name("XN--BCHER-KVA.Secure.Test.")) == "xn--bcher-kva.secure.test"
    zone_name = dns_env.fresh(dns_env.secure)
    dns_env.publish(None, f"xn--bcher-kva.{zone_name}", "A", "127.0.0.14")
    answer = lookup(dns_env.resolver(), f"BÜCHER.{zone_name.upper()}", "A")
    assert answer.status is SECURE and answer.name == f"xn--bcher-kva.{zone_name}"
    with pytest.raises(ValueError, match="not a valid domain name"):
        to_dns_name("a..b")
    with pytest.raises(ValueError, match="unknown DNS record type"):
        lookup(dns_env.resolver(), zone_name, "NOPE")


def test_nameserver_forms():
    assert parse_nameserver("127.0.0.1") == Nameserver("127.0.0.1", 53)
    assert parse_nameserver("127.0.0.1:5353") == Nameserver("127.0.0.1", 5353)
    assert parse_nameserver("::1") == Nameserver("::1", 53)
    assert parse_nameserver("[::1]:5353") == Nameserver("::1", 5353)
    assert parse_nameserver("[::1]") == Nameserver("::1", 53)
    assert str(Nameserver("::1", 5353)) == "[::1]:5353"
    for bad in ("resolver.example", "127.0.0.1:0", "127.0.0.1:x", "[::1", "[::1]5353", "1.2.3.4:70000"):
        with pytest.raises(ValueError, match="nameserver"):
            parse_nameserver(bad)
    with pytest.raises(ValueError):
        Resolver([])


def test_truncated_answer_is_retried_over_tcp(dns_env):
    # 24 x 120-byte TXT strings (+ RRSIG) cannot fit the 1232-byte EDNS payload: UDP comes
    # back truncated and only TCP carries the whole RRset.
    texts = [f'"{i:02d}' + "x" * 118 + '"' for i in range(24)]
    name = dns_env.publish(dns_env.secure, dns_env.fresh(dns_env.secure), "TXT", *texts)
    answer = lookup(dns_env.resolver(), name, "TXT")
    assert answer.status is SECURE
    assert len(answer.rrset) == 24


def test_cache_by_ttl_including_negative_answers(dns_env):
    name = dns_env.publish(dns_env.secure, dns_env.fresh(dns_env.secure), "A", "127.0.0.15", ttl=120)
    now = [1000.0]
    resolver = dns_env.resolver(clock=lambda: now[0])

    async def twice(rdtype: str) -> tuple[Answer, Answer]:
        return await resolver.lookup(name, rdtype), await resolver.lookup(name, rdtype)

    first, second = trio.run(twice, "A")
    assert first.rrset == second.rrset and resolver.stats["secure"] == 1  # second from cache
    trio.run(twice, "TLSA")  # NODATA: cached too (60 s, the SOA minimum)
    assert resolver.stats["secure"] == 2
    now[0] += 61
    trio.run(resolver.lookup, name, "TLSA")  # negative entry expired
    trio.run(resolver.lookup, name, "A")     # positive entry (120 s) still fresh
    assert resolver.stats["secure"] == 3
    now[0] += 60
    cached_then_fresh = trio.run(resolver.lookup, name, "A")
    assert resolver.stats["secure"] == 4 and cached_then_fresh.status is SECURE


def test_bogus_is_cached_only_briefly(dns_env):
    name = dns_env.publish(dns_env.bogus, dns_env.fresh(dns_env.bogus), "A", "127.0.0.16")
    now = [0.0]
    resolver = dns_env.resolver(clock=lambda: now[0])
    trio.run(resolver.lookup, name, "A")
    trio.run(resolver.lookup, name, "A")
    assert resolver.stats["bogus"] == 1
    now[0] += 6
    trio.run(resolver.lookup, name, "A")
    assert resolver.stats["bogus"] == 2


def test_concurrent_identical_lookups_share_one_query(dns_env):
    name = dns_env.publish(dns_env.secure, dns_env.fresh(dns_env.secure), "A", "127.0.0.17")
    resolver = dns_env.resolver()
    answers: list[Answer] = []

    async def main() -> None:
        async def one() -> None:
            answers.append(await resolver.lookup(name, "A"))

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)

    trio.run(main)
    assert len(answers) == 20 and all(a.status is SECURE for a in answers)
    assert sum(resolver.stats.values()) == 1
