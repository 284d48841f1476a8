"""Verdicts that expire with their evidence (DESIGN §3.4, proxy/reverify.py), both directions,
over the real signed zones (tests/dnsenv.py) with short TTLs.

Inbound: a scripted peer (test_inbound_openssl.Peer) authenticates domain D by DANE-EE and
dialback; the backend stand-in confirms.  Outbound: the backend stand-in opens a stream to D
through the outbound proxy to a stand-in peer (test_outbound.StandInPeer).  Then DNS or the
policy changes and the pair is judged again:

* TLSA changed to non-matching -> stream error not-authorized "re-verification: …",
  backend side closed politely, a decision line verdict=reject reason="re-verification: …";
* TLSA withdrawn under require = "dane" -> the same;
* policy changed to block, then reload -> policy-violation;
* evidence unchanged -> the stream stays and still relays;
* resolver down shorter than dns.reverify_grace -> the stream stays; longer -> closed.

Timing: TTLs of 1 s and `min_interval` 0.3 s make a re-judgement happen within about a second;
every wait is for an event (a stream error, a counter) with a deadline, never a fixed sleep.
"""
from __future__ import annotations

import dataclasses
import logging

import pytest
import trio
import trio.testing

from dnsenv import tlsa_text
from pki import self_signed
from proxy.config import DnsConfig
from proxy.metrics import Metrics
from proxy.reverify import Reverifier
from proxy.server import ProxyServer
from test_inbound_openssl import (
    LOCAL, FakeBackend, Peer, db_result, decisions, make_config, stream_error_of, world,  # noqa: F401
)
from test_outbound import LOCAL as OUT_LOCAL
from test_outbound import (
    StandInPeer, _publish, backend_stream, issue_peer, make_context, proxy_running,
)
from test_tls import write_identity
from xmppclient import XmppError

TTL = 1
DEADLINE = 20.0


def reverifier(metrics: Metrics, *, grace: float = 60.0) -> Reverifier:
    return Reverifier(grace=grace, metrics=metrics, min_interval=0.3, outage_retry=0.3)


def counted(metrics: Metrics, direction: str, result: str) -> float:
    return metrics.reverifications.labels(direction, result)._value.get()


async def until(condition, what: str, timeout: float = DEADLINE) -> None:
    """Poll a condition that changes from another task (a counter, a received byte); the
    polling step is the scheduler's, not a sleep standing in for synchronisation."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Inbound


@dataclasses.dataclass
class Inbound:
    server: ProxyServer
    reverify: Reverifier
    backend: FakeBackend
    peer: Peer
    config: object


async def _inbound_stream(nursery, dns_env, world, tmp_path, domain, identity, rv, backend,
                          policies=None, config_hook=None) -> Inbound:
    config = dataclasses.replace(
        make_config(world, f"127.0.0.1:{backend.port}", tmp_path, policies=policies),
        dns=DnsConfig(nameservers=[dns_env.resolver_address], timeout=1.0))
    server = ProxyServer(config, resolver=dns_env.resolver(timeout=1.0), metrics=rv.metrics)
    server.settings.reverify = rv
    rv.inbound_settings = lambda: server.settings
    listening = await nursery.start(server.serve)
    await nursery.start(rv.run)
    peer = await Peer.connect(listening.inbound[0][1])
    await peer.open_stream(from_=domain)
    await peer.starttls(identity)
    await peer.open_stream(from_=domain)
    await peer.expect(object)                       # features
    await peer.send(db_result(sender=domain))
    answer = await peer.expect(object)
    assert answer.attrs.get("type") == "valid", answer.raw
    assert len(rv) == 1
    return Inbound(server, rv, backend, peer, config)


def _inbound_peer(dns_env, tmp_path, name):
    domain = dns_env.fresh(dns_env.secure, name)
    identity = write_identity(self_signed([domain]), tmp_path, name)
    dns_env.publish_xmpp(domain, None, 5269, "127.0.0.1", identity.issued.cert, ttl=TTL)
    return domain, identity


@pytest.mark.parametrize("change", ["tlsa-changed", "tlsa-withdrawn", "blocked"])
def test_inbound_pair_is_closed_when_its_evidence_changes(world, tmp_path, dns_env, caplog, change):
    caplog.set_level(logging.INFO, logger="xmpp_dane_proxy")
    domain, identity = _inbound_peer(dns_env, tmp_path, "rin")
    policies = {domain: 'require = "dane"\n'} if change == "tlsa-withdrawn" else {}
    metrics = Metrics(process_metrics=False)

    async def main():
        async with FakeBackend().running() as backend, trio.open_nursery() as nursery:
            rv = reverifier(metrics)
            inbound = await _inbound_stream(nursery, dns_env, world, tmp_path, domain, identity, rv, backend,
                                            policies=policies)
            if change == "tlsa-changed":
                dns_env.publish(None, f"_5269._tcp.{domain}", "TLSA", tlsa_text(self_signed([domain]).cert), ttl=TTL)
            elif change == "tlsa-withdrawn":
                dns_env.remove(None, f"_5269._tcp.{domain}", "TLSA")
            else:
                (tmp_path / "policy.d" / f"{domain}.toml").write_text('require = "block"\n')
                inbound.server.reload(inbound.config)   # what SIGHUP does (proxy.runner swaps, then:)
                inbound.server.settings.reverify = rv
                rv.reload()
            received = await inbound.peer.until_closed(DEADLINE)
            await backend.wait_for(lambda: b"</stream:stream>" in backend.connections[0].received)
            nursery.cancel_scope.cancel()
        return received

    received = trio.run(main)
    condition, text = stream_error_of(received)
    assert text.startswith("re-verification: ") and "accepted before by dane-ee record 3 1 1" in text
    if change == "tlsa-changed":
        assert condition == "not-authorized" and "no fallback to PKIX" in text
    elif change == "tlsa-withdrawn":
        assert condition == "not-authorized" and "require=dane but" in text
    else:
        assert condition == "policy-violation" and f"{domain} is blocked by policy" in text
    line = decisions(caplog)[-1]
    assert f"domain={domain} verdict=reject" in line and 'reason="re-verification: ' in line
    assert counted(metrics, "inbound", "revoked") == 1


def test_inbound_pair_with_unchanged_evidence_stays(world, tmp_path, dns_env):
    domain, identity = _inbound_peer(dns_env, tmp_path, "rok")
    metrics = Metrics(process_metrics=False)

    async def main():
        async with FakeBackend().running() as backend, trio.open_nursery() as nursery:
            rv = reverifier(metrics)
            inbound = await _inbound_stream(nursery, dns_env, world, tmp_path, domain, identity, rv, backend)
            # Judged again at least twice (the TTL expired in between), nothing visible:
            await until(lambda: counted(metrics, "inbound", "kept") >= 2, "two re-verifications")
            await inbound.peer.send(f"<message from='x@{domain}' to='y@{LOCAL}'><body>still here</body></message>")
            await backend.wait_for(lambda: b"still here" in backend.connections[0].received)
            assert not inbound.peer.eof and not inbound.peer.events
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert counted(metrics, "inbound", "revoked") == 0


@pytest.mark.parametrize("outage", ["shorter", "longer"])
def test_inbound_resolver_outage_and_the_grace(world, tmp_path, dns_env, outage):
    domain, identity = _inbound_peer(dns_env, tmp_path, "rout")
    metrics = Metrics(process_metrics=False)
    grace = 60.0 if outage == "shorter" else 1.5

    async def main():
        async with FakeBackend().running() as backend, trio.open_nursery() as nursery:
            rv = reverifier(metrics, grace=grace)
            inbound = await _inbound_stream(nursery, dns_env, world, tmp_path, domain, identity, rv, backend)
            dns_env.stop_validating_resolver()
            try:
                await until(lambda: counted(metrics, "inbound", "deferred") >= 1, "a deferred re-verification")
                if outage == "shorter":
                    dns_env.start_validating_resolver()
                    kept = counted(metrics, "inbound", "kept")
                    await until(lambda: counted(metrics, "inbound", "kept") > kept, "a re-verification after")
                    await inbound.peer.send(f"<message from='x@{domain}' to='y@{LOCAL}'><body>survived</body></message>")
                    await backend.wait_for(lambda: b"survived" in backend.connections[0].received)
                    assert not inbound.peer.eof
                else:
                    received = await inbound.peer.until_closed(DEADLINE)
                    condition, text = stream_error_of(received)
                    assert condition == "not-authorized" and text.startswith("re-verification: DNSSEC evidence failed")
                    assert "timeout" in text
            finally:
                dns_env.start_validating_resolver()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert counted(metrics, "inbound", "revoked") == (0 if outage == "shorter" else 1)


def test_an_ended_watched_stream_is_freed_at_once_not_left_to_the_cyclic_gc(world, tmp_path, dns_env):
    """A reference cycle through an ended stream (its watch handle, its TLS stream's hook, an
    exception held by a frame of its own traceback) keeps the connection, its OpenSSL objects,
    socket and parser until the cyclic GC runs: memory held for nothing, and that GC's work
    per set-up (issue 13).  With the cyclic GC off, an ended stream must be gone at once."""
    import gc

    from proxy.inbound import InboundConnection
    from proxy.inbound_session import InboundSession
    from proxy.tls import TlsStream

    domain, identity = _inbound_peer(dns_env, tmp_path, "rgc")

    def left_over() -> list[str]:
        return [type(o).__name__ for o in gc.get_objects()
                if isinstance(o, (InboundConnection, InboundSession)) or (isinstance(o, TlsStream) and o.server_side)]

    async def main():
        async with FakeBackend().running() as backend, trio.open_nursery() as nursery:
            rv = reverifier(Metrics(process_metrics=False))
            inbound = await _inbound_stream(nursery, dns_env, world, tmp_path, domain, identity, rv, backend)
            assert "InboundConnection" in left_over()     # the check sees a live stream
            await inbound.peer.send(b"</stream:stream>")
            await inbound.peer.until_closed(DEADLINE)
            await backend.wait_for(lambda: backend.connections[0].closed)
            await until(lambda: len(rv) == 0, "the stream's watch to end")
            await trio.testing.wait_all_tasks_blocked()   # the connection's task has returned
            await inbound.peer.aclose()
            remaining = left_over()
            nursery.cancel_scope.cancel()
        return remaining

    gc.collect()
    gc.disable()
    try:
        remaining = trio.run(main)
    finally:
        gc.enable()
    assert remaining == []


# ---------------------------------------------------------------------------------------------
# Outbound


@pytest.mark.parametrize("change", ["tlsa-changed", "tlsa-withdrawn", "blocked", "unchanged",
                                    "outage-shorter", "outage-longer"])
def test_outbound_pair_is_judged_again(tmp_path, dns_env, change):
    domain = dns_env.fresh(dns_env.secure, "rout")
    peer = StandInPeer(domain, issue_peer(domain), tmp_path)
    policies = {f"{domain}.toml": 'require = "dane"\n'} if change == "tlsa-withdrawn" else {}
    metrics = Metrics(process_metrics=False)
    rv = reverifier(metrics, grace=1.5 if change == "outage-longer" else 60.0)
    stays = change in ("unchanged", "outage-shorter")

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(peer.serve)
            _publish(dns_env, peer, "3 1 1", ttl=TTL)
            ctx = dataclasses.replace(make_context(dns_env, tmp_path, policies=policies),
                                      resolver=dns_env.resolver(timeout=1.0), reverify=rv, metrics=metrics)
            current = [ctx]
            rv.outbound_context = lambda: current[0]
            await nursery.start(rv.run)
            async with proxy_running(ctx) as (_, port):
                xs = await backend_stream(port, domain)
                await xs.expect_header()
                await xs.expect_stanza()                      # features
                await xs.send(f"<db:result from='{OUT_LOCAL}' to='{domain}'>k3y</db:result>")
                result = await xs.expect_stanza()
                assert result.get("type") == "valid"
                assert len(rv) == 1
                host = f"xmpp.{domain}"
                if change == "tlsa-changed":
                    dns_env.publish(None, f"_{peer.port}._tcp.{host}", "TLSA",
                                    tlsa_text(self_signed([domain]).cert), ttl=TTL)
                elif change == "tlsa-withdrawn":
                    dns_env.remove(None, f"_{peer.port}._tcp.{host}", "TLSA")
                elif change == "blocked":
                    (tmp_path / "policy.d" / f"{domain}.toml").write_text('require = "block"\n')
                    current[0] = dataclasses.replace(ctx, policies=type(ctx.policies).load(tmp_path / "policy.d"))
                    rv.reload()
                elif change.startswith("outage"):
                    dns_env.stop_validating_resolver()
                    await until(lambda: counted(metrics, "outbound", "deferred") >= 1, "a deferred re-verification")
                    if change == "outage-shorter":
                        kept = counted(metrics, "outbound", "kept")
                        dns_env.start_validating_resolver()
                        await until(lambda: counted(metrics, "outbound", "kept") > kept, "a re-verification after")
                if stays:
                    await until(lambda: counted(metrics, "outbound", "kept") >= 2, "two re-verifications")
                    await xs.send(f"<message from='a@{OUT_LOCAL}' to='b@{domain}'><body>still relayed</body></message>")
                    await until(lambda: any(b"still relayed" in c.post_tls for c in peer.connections), "relay")
                    backend_closed = False
                else:
                    # The backend's side is ended politely: the stream end, no stream error.
                    events = []
                    with trio.fail_after(DEADLINE):
                        while not xs.eof:
                            try:
                                events.append(await xs.next_event(timeout=DEADLINE))
                            except XmppError:
                                break
                    assert [type(e).__name__ for e in events] == ["StreamEnd"], [e.raw for e in events]
                    backend_closed = True
            nursery.cancel_scope.cancel()
        return backend_closed

    try:
        backend_closed = trio.run(main)
    finally:
        dns_env.start_validating_resolver()
    (rec,) = peer.connections
    if stays:
        assert not backend_closed and b"<stream:error>" not in rec.post_tls
        assert counted(metrics, "outbound", "revoked") == 0
        return
    assert backend_closed
    error = rec.post_tls[rec.post_tls.find(b"<stream:error>"):]
    condition, text = stream_error_of(error)
    assert text.startswith("re-verification: ") and "accepted before by dane-ee" in text
    assert condition == ("policy-violation" if change == "blocked" else "not-authorized")
    if change == "outage-longer":
        assert text.startswith("re-verification: DNSSEC evidence failed") and "timeout" in text
    assert counted(metrics, "outbound", "revoked") == 1
