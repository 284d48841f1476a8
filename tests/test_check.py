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
    assert f"TLSA       _5269._tcp.{domain} [insecure]: none" in text
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
