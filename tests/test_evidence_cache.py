"""policy.evidence_cache: a domain's whole inbound evidence is reused until its shortest TTL,
never longer, never across a change of the resolver's DNSSEC probe verdicts, and never when
any part of it failed (issue 13: a warm verdict without five cached lookups)."""
from __future__ import annotations

from dataclasses import dataclass

import trio

from pki import self_signed
from policy.dns import Resolver
from policy.evidence import DnsStatus, Evidence
from policy.evidence_cache import EvidenceCache
from policy.policyfile import Policy
from policy.tlsa import record_for
from proxy.server import dns_evidence

SECURE, BOGUS, INSECURE = DnsStatus.SECURE, DnsStatus.BOGUS, DnsStatus.INSECURE


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class StubResolver:
    due: bool = False
    validation_epoch: int = 1

    def probe_due(self) -> bool:
        return self.due


def evidence(ttl: int | None = 300, status: DnsStatus = SECURE, notes: tuple[str, ...] = ()) -> Evidence:
    return Evidence(domain="peer.example", tlsa=(), tlsa_status=status,
                    statuses={"SRV _xmpp-server._tcp.peer.example": status}, notes=notes, ttl=ttl)


def test_kept_until_its_ttl_with_the_ttl_counting_down():
    clock, resolver = Clock(), StubResolver()
    cache = EvidenceCache(clock=clock)
    cache.put("k", resolver, evidence(ttl=300))
    clock.now += 100.5
    got = cache.get("k", resolver)
    assert got is not None and got.ttl == 199 and got.statuses == evidence().statuses
    clock.now += 199
    assert cache.get("k", resolver) is None      # under a second left: expired
    cache.put("k", resolver, evidence(ttl=300))
    clock.now += 300
    assert cache.get("k", resolver) is None      # expired at the TTL
    assert len(cache) == 0


def test_failed_or_unvalidated_or_static_evidence_is_never_kept():
    resolver = StubResolver()
    cache = EvidenceCache(clock=Clock())
    cache.put("bogus", resolver, evidence(status=BOGUS))
    cache.put("timeout", resolver, evidence(status=DnsStatus.TIMEOUT))
    cache.put("unvalidated", resolver, evidence(status=DnsStatus.UNVALIDATED))
    cache.put("probe-note", resolver, evidence(status=INSECURE, notes=("resolver failed the DNSSEC probe",)))
    cache.put("zero", resolver, evidence(ttl=0))
    assert len(cache) == 0


def test_static_only_evidence_is_kept_until_the_key_changes():
    """ttl None: nothing came from DNS (static SRV and TLSA, which are part of the key)."""
    clock, resolver = Clock(), StubResolver()
    cache = EvidenceCache(clock=clock)
    cache.put("static", resolver, evidence(ttl=None))
    clock.now += 10 * 86400
    got = cache.get("static", resolver)
    assert got is not None and got.ttl is None
    resolver.validation_epoch += 1
    assert cache.get("static", resolver) is None


def test_a_changed_probe_verdict_or_a_due_probe_ends_the_entry():
    resolver = StubResolver()
    cache = EvidenceCache(clock=Clock())
    cache.put("k", resolver, evidence(status=INSECURE))
    assert cache.get("k", resolver) is not None
    resolver.validation_epoch += 1          # a resolver failed (or passed) the probe since
    assert cache.get("k", resolver) is None
    cache.put("k", resolver, evidence(status=INSECURE))
    resolver.due = True                     # the next lookups must run the probe
    assert cache.get("k", resolver) is None
    cache.put("k", resolver, evidence(status=INSECURE))
    assert len(cache) == 0                  # and nothing is stored while it is due


def test_bounded_least_recently_used_out():
    resolver = StubResolver()
    cache = EvidenceCache(max_entries=2, clock=Clock())
    cache.put("a", resolver, evidence())
    cache.put("b", resolver, evidence())
    assert cache.get("a", resolver) is not None
    cache.put("c", resolver, evidence())
    assert cache.get("b", resolver) is None and cache.get("a", resolver) is not None
    assert len(cache) == 2


def test_probe_epoch_changes_only_when_a_verdict_changes(dns_env):
    resolver = Resolver([dns_env.resolver_address], probe=dns_env.secure)

    async def main() -> list[int]:
        epochs = [resolver.validation_epoch]
        await resolver.probe()
        epochs.append(resolver.validation_epoch)
        await resolver.probe()
        epochs.append(resolver.validation_epoch)
        return epochs

    first, after_first, after_second = trio.run(main)
    assert after_first == first + 1 and after_second == after_first
    assert not resolver.probe_due()


def test_the_proxy_reuses_a_domains_evidence_and_asks_again_for_failed_evidence(dns_env):
    """Against the signed test zones: the second verdict's evidence makes no lookup at all and
    is the same evidence; a bogus domain's evidence is gathered again every time."""
    domain = dns_env.fresh(dns_env.secure)
    target = dns_env.fresh(dns_env.secure, "xmpp")
    cert = self_signed([target]).cert
    dns_env.publish_xmpp(domain, target, 5269, "127.0.0.21", cert, "3 1 1")
    bogus = dns_env.fresh(dns_env.bogus)
    lookups: list[tuple[str, str, bool]] = []
    resolver = Resolver([dns_env.resolver_address], on_lookup=lambda *a: lookups.append(a))
    evidence_for = dns_evidence(resolver)
    policy = Policy(require="dane")

    async def main():
        first = await evidence_for(domain, policy)
        n_first = len(lookups)
        second = await evidence_for(domain, policy)
        n_second = len(lookups) - n_first
        # Static TLSA in the policy is another key: gathered anew, not the DNS evidence.
        static = await evidence_for(domain, Policy(require="dane", tlsa=(record_for(cert, 3, 0, 1),)))
        before_bogus = len(lookups)
        await evidence_for(bogus, policy)
        n_bogus_first = len(lookups) - before_bogus
        await evidence_for(bogus, policy)
        n_bogus_second = len(lookups) - before_bogus - n_bogus_first
        return first, second, n_first, n_second, static, n_bogus_first, n_bogus_second

    first, second, n_first, n_second, static, n_bogus_first, n_bogus_second = trio.run(main)
    assert n_first > 0 and n_second == 0
    assert first.tlsa_status is SECURE and first.tlsa == (record_for(cert, 3, 1, 1),)
    assert (second.tlsa, second.tlsa_status, second.statuses, second.delegated_targets) == (
        first.tlsa, first.tlsa_status, first.statuses, first.delegated_targets)
    assert 0 < second.ttl <= first.ttl
    assert static.tlsa == (record_for(cert, 3, 0, 1),)
    assert n_bogus_first > 0 and n_bogus_second > 0
    assert len(evidence_for.cache) == 2    # the domain under both policies; never the bogus one
