"""`xmpp-dane-proxy check DOMAIN` (proxy/check.py) against the signed test zones.

Peers are the raw TLS stand-ins of test_outbound.py on 127.0.0.x; DNS is tests/dnsenv.py.
Every case asserts the verdict printed per target and the exit status (DESIGN §5: 0 all
accepted, 1 any rejected, 2 bad input).
"""
from __future__ import annotations

import io
import json
import re

import trio

from pki import TestCA, self_signed
from proxy.check import run_check
from test_outbound import CA, INTERMEDIATE, LOCAL, StandInPeer, issue_peer


def _config(tmp_path, dns_env, *, ca_file=None, policies: dict[str, str] | None = None) -> str:
    policy_dir = tmp_path / "policy.d"
    policy_dir.mkdir(exist_ok=True)
    for name, text in (policies or {}).items():
        (policy_dir / name).write_text(text)
    cert, key = TestCA("Home CA").issue([LOCAL]).write(tmp_path, "home")
    path = tmp_path / "config.toml"
    path.write_text(
        f'[dns]\nnameservers = ["{dns_env.resolver_address}"]\ntimeout = 3.0\n'
        f'[policy]\ndir = "{policy_dir}"\nca_file = "{ca_file or ""}"\n'
        f'[limits]\nhandshake_timeout = 5.0\n'
        f'[[domain]]\nname = "{LOCAL}"\ncert = "{cert}"\nkey = "{key}"\n')
    return str(path)


def _run(peers, publish, **kwargs) -> tuple[int, str]:
    """Start the stand-ins, publish DNS for them, run the check; (exit status, output)."""
    return _run_many(peers, publish, kwargs)[0]


def _run_many(peers, publish, *runs: dict) -> list[tuple[int, str]]:
    """Like _run, one check per `runs` entry, all while the stand-ins are up."""
    results = []

    async def main():
        async with trio.open_nursery() as nursery:
            for p in peers:
                await nursery.start(p.serve)
            publish()
            for kwargs in runs:
                out = io.StringIO()
                results.append((await run_check(out=out, **kwargs), out.getvalue()))
            nursery.cancel_scope.cancel()

    trio.run(main)
    return results


def test_matching_tlsa_is_accepted(dns_env, tmp_path):
    domain = dns_env.fresh(dns_env.secure, "cm")
    peer = StandInPeer(domain, issue_peer(domain), tmp_path)
    code, text = _run([peer], lambda: dns_env.publish_xmpp(domain, f"xmpp.{domain}", peer.port, peer.address,
                                                         peer_cert(domain), "3 1 1"),
                      domain=domain, nameserver=dns_env.resolver_address)
    assert code == 0, text
    assert f"SRV _xmpp-server._tcp.{domain}" in text and "secure" in text
    assert f"Target 1: xmpp.{domain}:{peer.port} (starttls)" in text
    assert f"connected  {peer.address}:{peer.port}, STARTTLS (offered), TLSv1.3" in text
    assert f"SAN: DNS:{domain}, XmppAddr:{domain}" in text
    assert "verdict    ACCEPT (dane-ee), record 3 1 1" in text
    assert f"RESULT: accept — all 1 target(s) of {domain} accepted" in text


def peer_cert(domain):
    from test_outbound import _issued
    return _issued[domain].cert


def test_mismatch_and_match_per_target_json(dns_env, tmp_path):
    domain = dns_env.fresh(dns_env.secure, "cj")
    good = StandInPeer(domain, issue_peer(domain), tmp_path, direct_tls=True)
    bad = StandInPeer(domain, self_signed([domain]), tmp_path)

    def publish():
        with dns_env.batch():
            dns_env.publish_xmpp(domain, f"good.{domain}", good.port, good.address, peer_cert(domain),
                                 "3 1 1", direct_tls=True, priority=0)
            dns_env.publish_xmpp(domain, f"bad.{domain}", bad.port, bad.address, peer_cert(domain),
                                 "3 1 1", priority=5)

    code, text = _run([good, bad], publish, domain=domain, nameserver=dns_env.resolver_address, as_json=True)
    assert code == 1
    obj = json.loads(text)
    assert obj["result"] == "reject" and obj["domain"] == domain
    first, second = obj["targets"]
    assert (first["target"]["host"], first["target"]["mode"]) == (f"good.{domain}", "direct-tls")
    assert first["verdict"]["verdict"] == "accept" and first["verdict"]["prooftype"] == "dane-ee"
    assert first["tls"]["alpn"] == "xmpp-server" and first["tls"]["server_name"] == domain
    assert first["chain"][0]["san"] == f"DNS:{domain}, XmppAddr:{domain}"
    assert second["verdict"]["verdict"] == "reject" and "no fallback to PKIX" in second["verdict"]["reason"]
    assert second["target"]["tlsa_status"] == "secure" and second["target"]["delegated"] is True
    # Both peers saw a handshake and nothing after it.
    assert all(c.post_tls == b"" for p in (good, bad) for c in p.connections)


def test_insecure_zone_uses_pkix_with_the_configured_ca(dns_env, tmp_path):
    domain = dns_env.fresh(dns_env.insecure, "ci")
    peer = StandInPeer(domain, issue_peer(domain), tmp_path)
    ca_file = CA.write_root(tmp_path / "root.pem")
    publish = lambda: dns_env.publish_xmpp(domain, f"xmpp.{domain}", peer.port, peer.address, None)

    (code, text), (code2, text2) = _run_many(
        [peer], publish,
        dict(domain=domain, config=_config(tmp_path, dns_env, ca_file=ca_file)),
        # Same zone, no configured CA: the system store does not know the test root -> reject.
        dict(domain=domain, nameserver=dns_env.resolver_address))
    assert code == 0, text
    assert re.search(rf"SRV _xmpp-server._tcp.{re.escape(domain)} +insecure", text)
    assert f"TLSA       _5269._tcp.{domain} [insecure]: none (NXDOMAIN)" in text
    assert "verdict    ACCEPT (pkix)" in text and "client    home.example" in text
    # Our client certificate (the configured domain's) was presented.
    assert LOCAL in str(peer.connections[0].client_chain[0].subject)
    assert code2 == 1 and "verdict    REJECT" in text2 and "PKIX: chain does not verify" in text2


def test_bogus_zone_fails_closed(dns_env, tmp_path):
    domain = dns_env.fresh(dns_env.bogus, "cb")
    code, text = _run([], lambda: None, domain=domain, nameserver=dns_env.resolver_address)
    assert code == 1
    assert f"SRV _xmpp-server._tcp.{domain}" in text and "bogus" in text
    assert "REJECTED before any target: DNSSEC evidence failed" in text
    assert "RESULT: reject" in text


def test_bogus_tlsa_rejects_but_still_shows_the_chain(dns_env, tmp_path):
    domain = dns_env.fresh(dns_env.secure, "cbt")
    peer = StandInPeer(domain, issue_peer(domain), tmp_path)

    def publish():
        with dns_env.batch():
            dns_env.publish_xmpp(domain, f"xmpp.{domain}", peer.port, peer.address, peer_cert(domain))
            dns_env.publish(None, f"_{peer.port}._tcp.xmpp.{domain}", "TLSA", f"3 1 1 {'cd' * 32}",
                            broken_signature=True)

    code, text = _run([peer], publish, domain=domain, nameserver=dns_env.resolver_address)
    assert code == 1
    assert f"[0] CN={domain}" in text
    assert "verdict    REJECT" in text and "is bogus" in text


def test_policy_from_config_block_and_dane_ta(dns_env, tmp_path):
    domain = dns_env.fresh(dns_env.secure, "cp")
    peer = StandInPeer(domain, issue_peer(domain), tmp_path)
    publish = lambda: dns_env.publish_xmpp(domain, f"xmpp.{domain}", peer.port, peer.address, INTERMEDIATE.cert, "2 1 1")
    code, text = _run([peer], publish, domain=domain, config=_config(tmp_path, dns_env))
    assert code == 0 and "ACCEPT (dane-ta)" in text, text
    blocked = _config(tmp_path, dns_env, policies={f"{domain}.toml": 'require = "block"\n'})
    code, text = _run([], lambda: None, domain=domain, config=blocked)
    assert code == 1 and f"{domain} is blocked by policy" in text and "require=block" in text


def test_bad_input_exits_2(tmp_path):
    err = io.StringIO()
    code = trio.run(lambda: run_check("example.org", nameserver="not-an-ip", out=io.StringIO(), err=err))
    assert code == 2 and "is not an IP address" in err.getvalue()
    bad = tmp_path / "bad.toml"
    bad.write_text("[dns]\nnameserverz = []\n")
    err = io.StringIO()
    code = trio.run(lambda: run_check("example.org", config=str(bad), out=io.StringIO(), err=err))
    assert code == 2 and "unknown key dns.nameserverz" in err.getvalue()


def test_no_service_is_a_rejection(dns_env):
    domain = dns_env.fresh(dns_env.secure, "cn")
    dns_env.publish(None, f"_xmpp-server._tcp.{domain}", "SRV", "0 0 0 .")
    code, text = _run([], lambda: None, domain=domain, nameserver=dns_env.resolver_address)
    assert code == 1
    assert "no XMPP server-to-server service (SRV target '.')" in text
    assert f"REJECTED before any target: {domain}: it publishes no XMPP server-to-server service" in text


# ---------------------------------------------------------------------------------------------
# Only what the policy and its transports can use is looked up; answers say NXDOMAIN/NODATA.


def _lookups(domain, resolver, policies=None):
    """Run check_domain with a recording resolver; (result, [(rdtype, name, status)])."""
    from policy.policyfile import PolicySet
    from proxy.check import RecordingResolver, check_domain
    from proxy.connect import TlsContexts

    recorder = RecordingResolver(resolver)

    async def main():
        return await check_domain(domain, resolver=recorder, policies=policies or PolicySet.load(None), trust=None,
                                  contexts=TlsContexts({}), client=None, timeout=3.0)

    result = trio.run(main)
    return result, [(a.rdtype, a.name, str(a.status)) for a in recorder.lookups]


def test_resolver_down_costs_one_round_of_srv_lookups(dns_env, tmp_path):
    """With nobody answering, check asks the two SRV questions (at once), fails the domain
    closed on them and stops: no POSH, host-meta or address lookups that would each wait
    out the timeout again."""
    from policy.dns import Resolver
    from policy.policyfile import PolicySet

    policy_dir = tmp_path / "policy.d"
    policy_dir.mkdir()
    (policy_dir / "default.toml").write_text('posh = true\ntransports = ["tcp", "websocket"]\n')
    result, lookups = _lookups("down.example", Resolver([dns_env.blackhole], timeout=0.6),
                               PolicySet.load(str(policy_dir)))
    assert sorted(lookups) == [("SRV", "_xmpp-server._tcp.down.example", "timeout"),
                               ("SRV", "_xmpps-server._tcp.down.example", "timeout")]
    text = result.render()
    assert "REJECTED before any target: DNSSEC evidence failed" in text
    assert re.search(r"SRV _xmpp-server\._tcp\.down\.example +timeout: no answer within 0\.6s", text), text
    assert result.posh is None and result.websocket is None and not result.accepted


def test_no_posh_or_host_meta_lookups_unless_the_policy_uses_them(dns_env, tmp_path):
    domain = dns_env.fresh(dns_env.secure, "cl")
    dns_env.publish_xmpp(domain, f"xmpp.{domain}", 1, "127.0.0.1", self_signed([domain]).cert)
    result, lookups = _lookups(domain, dns_env.resolver())
    names = {(rdtype, name) for rdtype, name, _ in lookups}
    assert names == {("SRV", f"_xmpp-server._tcp.{domain}"), ("SRV", f"_xmpps-server._tcp.{domain}"),
                     ("A", f"xmpp.{domain}"), ("AAAA", f"xmpp.{domain}"), ("TLSA", f"_1._tcp.xmpp.{domain}")}
    assert result.posh is None and result.websocket is None
    text = result.render()
    # NXDOMAIN and NODATA are said as such, beside their (secure) status.
    assert re.search(rf"SRV _xmpps-server\._tcp\.{re.escape(domain)} +secure, NXDOMAIN", text), text
    assert re.search(rf"AAAA xmpp\.{re.escape(domain)} +secure, NODATA", text), text
    assert re.search(rf"SRV _xmpp-server\._tcp\.{re.escape(domain)} +secure, 1 record\(s\)", text), text
    obj = result.as_json_obj()
    assert obj["evidence"]["answers"][f"SRV _xmpps-server._tcp.{domain}"] == "secure, NXDOMAIN"


def test_blocked_domain_needs_no_lookup(dns_env, tmp_path):
    from policy.policyfile import PolicySet

    policy_dir = tmp_path / "policy.d"
    policy_dir.mkdir()
    (policy_dir / "blocked.example.toml").write_text('require = "block"\n')
    result, lookups = _lookups("blocked.example", dns_env.resolver(), PolicySet.load(str(policy_dir)))
    assert lookups == [] and "blocked by policy" in result.render() and not result.accepted


def test_mismatch_prints_the_presented_leafs_own_values_in_full(dns_env, tmp_path):
    domain = dns_env.fresh(dns_env.secure, "cv")
    served = self_signed([domain])
    published = self_signed([domain]).cert
    peer = StandInPeer(domain, served, tmp_path)
    code, text = _run([peer], lambda: dns_env.publish_xmpp(domain, f"xmpp.{domain}", peer.port, peer.address,
                                                         published, "3 1 1"),
                      domain=domain, nameserver=dns_env.resolver_address)
    assert code == 1 and "verdict    REJECT" in text, text
    from policy.tlsa import record_for
    assert f"      {record_for(published)}" in text                          # the zone's record, in full
    for usage, selector, mtype in ((3, 1, 1), (3, 1, 2), (3, 0, 1)):
        assert f"        {record_for(served.cert, usage, selector, mtype)}" in text


def test_check_without_c_uses_the_default_config_when_it_exists(dns_env, tmp_path, monkeypatch, capsys):
    import proxy.check
    from proxy.cli import main

    domain = dns_env.fresh(dns_env.secure, "cd")
    dns_env.publish(None, f"_xmpp-server._tcp.{domain}", "SRV", "0 0 0 .")
    config = _config(tmp_path, dns_env)
    monkeypatch.setattr(proxy.check, "DEFAULT_CONFIG", config)
    assert main(["check", domain, "--json"]) == 1
    obj = json.loads(capsys.readouterr().out)
    assert obj["resolver"][0]["address"] == dns_env.resolver_address      # [dns] of the default file
    assert obj["client_certificate"] == LOCAL
    assert obj["evidence"]["no_service"] is True
    monkeypatch.setattr(proxy.check, "DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
    assert proxy.check.config_or_default(None) is None
    assert proxy.check.config_or_default("given.toml") == "given.toml"
