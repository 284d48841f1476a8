"""Real Prosody on both ends of the outbound proxy (DESIGN §3.2, §7).

backend Prosody (mode="backend", contrib/prosody/mod_s2s_dane_proxy.lua routing every
outgoing S2S stream to the proxy, plaintext, dialback) → OutboundProxy → peer Prosody
(mode="peer": STARTTLS, a test-PKI certificate for its domain) found through the signed test
zones of tests/dnsenv.py.

The peer verifies the backend's dialback key by connecting back to the backend's S2S port
directly (its own DNS routes the backend's domain there); that is the one hop that does not go
through a proxy here.  The last test puts each of two Prosody servers behind its own complete
proxy (proxy.server.serve: inbound + outbound), so dialback travels through both.
"""
from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import trio

from pki import TestCA, self_signed
from prosodyenv import ProsodyDns, VirtualHost, free_port, prosody_factory  # noqa: F401 (fixture)
from test_outbound import CA, INTERMEDIATE, DecisionLog, make_context, fresh_loopback
from proxy.outbound import OutboundProxy
from xmppclient import XmppError, deliver_message_async

CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "prosody"
BODY = "through the DANE proxy"


def _listening_socket() -> socket.socket:
    """A bound, listening loopback socket: its port goes into the backend's config before
    the proxy (inside trio.run) starts accepting on it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


def _routed_backend(prosody_factory, dns_env, local: str, proxy_port: int, **kwargs):
    """A plaintext backend Prosody for `local`, routing all S2S to the proxy; its S2S port is
    published in the test DNS (insecure zone, no TLSA) so peers can dial back for dialback."""
    backend = prosody_factory(
        [VirtualHost(local, users={"u": "pw"})], mode="backend",
        modules=["s2s_dane_proxy"], plugin_paths=[CONTRIB],
        extra_config=f's2s_dane_proxy = "127.0.0.1:{proxy_port}"', **kwargs)
    dns_env.publish_xmpp(local, f"xmpp.{local}", backend.s2s_port, backend.address, None)
    return backend


async def _serve_proxy_on(sock: socket.socket, context, task_status=trio.TASK_STATUS_IGNORED):
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock.dup()))
    await trio.serve_listeners(OutboundProxy(context=context), [listener], task_status=task_status)


CASES = {
    # case: (zone, TLSA usage or None, TLSA from the peer's own cert?, policy, delivered?)
    "dane-ee": ("secure", "3 1 1", "own", None, True),
    "dane-ta": ("secure", "2 0 1", "issuer", None, True),
    "pkix": ("insecure", None, None, None, True),
    "mismatch": ("secure", "3 1 1", "other", None, False),
    "bogus": ("secure", "3 1 1", "bogus", None, False),
    "block": ("secure", "3 1 1", "own", 'require = "block"\n', False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_backend_prosody_to_peer_prosody(prosody_factory, dns_env, tmp_path, case):
    zone_name, usage, tlsa_from, policy_text, delivered = CASES[case]
    zone = getattr(dns_env, zone_name)
    domain = dns_env.fresh(zone, case.replace("-", ""))
    peer_cert = INTERMEDIATE.issue([domain], xmpp=[domain])
    home_ca = TestCA("Home CA")
    ca_file = tmp_path / "roots.pem"
    ca_file.write_bytes(CA.root_pem() + home_ca.root_pem())

    peer_ip = fresh_loopback()
    peer_port = free_port(peer_ip)
    tlsa_cert = {"own": peer_cert.cert, "issuer": INTERMEDIATE.cert, "other": self_signed([domain]).cert,
                 "bogus": peer_cert.cert, None: None}[tlsa_from]
    with dns_env.batch():
        dns_env.publish_xmpp(domain, f"xmpp.{domain}", peer_port, peer_ip, tlsa_cert, *([usage] if usage else []))
        if tlsa_from == "bogus":
            dns_env.publish(None, f"_{peer_port}._tcp.xmpp.{domain}", "TLSA", f"3 1 1 {'ee' * 32}",
                            broken_signature=True)

    local = dns_env.fresh(dns_env.insecure, "home")
    proxy_sock = _listening_socket()
    backend = _routed_backend(prosody_factory, dns_env, local, proxy_sock.getsockname()[1])
    peer = prosody_factory(
        [VirtualHost(domain, cert=peer_cert, users={"u": "pw"})], mode="peer", address=peer_ip,
        s2s_port=peer_port, ca_file=ca_file,
        # Plaintext allowed outgoing, for the dialback check back to the (plaintext) backend.
        s2s_require_encryption=False, s2s_secure_auth=False,
        dns=ProsodyDns.validating(dns_env.resolver_address, dns_env.trust_anchor_text))
    policies = {f"{domain}.toml": policy_text} if policy_text else {}
    context = make_context(dns_env, tmp_path, policies=policies, local=local,
                           local_cert=home_ca.issue([local], xmpp=[local]),
                           ca_file=CA.write_root(tmp_path / "peer-root.pem") if case == "pkix" else None)

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(_serve_proxy_on, proxy_sock, context)
            try:
                stanza = await deliver_message_async(backend.account(f"u@{local}", "pw"),
                                                     peer.account(f"u@{domain}", "pw"), BODY, timeout=15)
                outcome = ("delivered", stanza)
            except XmppError as exc:
                outcome = ("bounced", str(exc))
            nursery.cancel_scope.cancel()
        return outcome

    try:
        outcome = trio.run(main)
    finally:
        proxy_sock.close()
    backend_log, peer_log = backend.log_text(), peer.log_text()
    if delivered:
        assert outcome[0] == "delivered", (outcome, backend_log[-3000:])
        assert outcome[1].get("from", "").startswith(f"u@{local}")
        # Dialback went through the proxy (backend's verify of the peer's key, the peer's
        # db:result back), and the proxy's TLS to the peer was what the peer saw.
        assert f"Outgoing s2s connection {local}->{domain} complete" in backend_log
        assert "Stream encrypted (TLSv1.3" in peer_log
        assert "certificate chain validation result: valid" in peer_log  # our client cert
        # DESIGN §3.3: the proxy authenticated the backend's domain by SASL EXTERNAL with the
        # certificate it presented; the backend's own dialback key never reached the peer.
        assert f"Accepting SASL EXTERNAL identity from {local}" in peer_log
        assert "_xmpp-server._tcp" not in backend_log                    # no DNS by the backend
    else:
        assert outcome[0] == "bounced" and "remote-connection-failed" in outcome[1], outcome
        reason = {
            "mismatch": "no usable TLSA record matches",
            "bogus": "is bogus",
            "block": "is blocked by policy",
        }[case]
        # Prosody's own log carries the proxy's stream error and its reason.
        assert "Session closed by remote with error: remote-connection-failed" in backend_log
        assert reason in backend_log, backend_log[-3000:]
        # Nothing of the backend's stream reached the peer: its only s2sin session (if any)
        # never saw the backend's restarted header after TLS.
        assert f"Incoming s2s connection {local}->{domain} complete" not in peer_log
        assert BODY not in peer_log


# The outbound side authenticates each backend's domain itself (DESIGN §3.3: EXTERNAL, else
# the proxy's own dialback key), so a proxy's peer that is another proxy answers the proxy's
# keys on its inbound side (inbound EXTERNAL and local answers, proxy/inbound_pairs.py).
def test_two_prosody_servers_each_behind_its_own_proxy(prosody_factory, dns_env, tmp_path):
    """a.<zone> and b.<zone>, each a plaintext backend Prosody behind a full proxy (inbound on
    a DNS-published loopback address, outbound for its module); messages both ways, with
    dialback crossing both proxies in both directions."""
    from proxy import server   # the inbound half (proxy/server.py, proxy/inbound.py)
    from proxy.config import load_config

    ca = TestCA("Federation CA")
    ca_file = ca.write_root(tmp_path / "ca.pem")
    sides = {}
    for name in ("a", "b"):
        domain = dns_env.fresh(dns_env.secure, name)
        ip = fresh_loopback()
        sides[name] = {"domain": domain, "ip": ip, "port": free_port(ip), "cert": ca.issue([domain], xmpp=[domain]),
                       "outbound": _listening_socket()}
    with dns_env.batch():
        for s in sides.values():
            dns_env.publish_xmpp(s["domain"], f"xmpp.{s['domain']}", s["port"], s["ip"], s["cert"].cert, "3 1 1")
    for name, s in sides.items():
        s["backend"] = prosody_factory(
            [VirtualHost(s["domain"], users={"u": "pw"})], mode="backend",
            modules=["s2s_dane_proxy"], plugin_paths=[CONTRIB],
            extra_config=f's2s_dane_proxy = "127.0.0.1:{s["outbound"].getsockname()[1]}"')
        cert, key = s["cert"].write(tmp_path, f"proxy-{name}")
        (tmp_path / f"policy-{name}").mkdir()
        conf = tmp_path / f"proxy-{name}.toml"
        conf.write_text(
            f'[inbound]\nlisten = ["{s["ip"]}:{s["port"]}"]\nbackend = "127.0.0.1:{s["backend"].s2s_port}"\n'
            f'[outbound]\nlisten = ["127.0.0.1:{s["outbound"].getsockname()[1]}"]\n'
            f'[[domain]]\nname = "{s["domain"]}"\ncert = "{cert}"\nkey = "{key}"\n'
            f'[dns]\nnameservers = ["{dns_env.resolver_address}"]\ntimeout = 3.0\n'
            f'[policy]\ndir = "{tmp_path / f"policy-{name}"}"\nca_file = "{ca_file}"\n'
            f'[limits]\nhandshake_timeout = 10.0\n[metrics]\nlisten = ""\n')
        s["config"] = load_config(conf)

    async def main():
        async with trio.open_nursery() as nursery:
            for s in sides.values():
                outbound = trio.SocketListener(trio.socket.from_stdlib_socket(s["outbound"].dup()))
                await nursery.start(lambda task_status, s=s, outbound=outbound: server.serve(
                    s["config"], outbound_handler=OutboundProxy(s["config"]),
                    outbound_listeners=[outbound], task_status=task_status))
            a, b = sides["a"], sides["b"]
            got_ab = await deliver_message_async(a["backend"].account(f"u@{a['domain']}", "pw"),
                                                 b["backend"].account(f"u@{b['domain']}", "pw"), "a to b", timeout=20)
            got_ba = await deliver_message_async(b["backend"].account(f"u@{b['domain']}", "pw"),
                                                 a["backend"].account(f"u@{a['domain']}", "pw"), "b to a", timeout=20)
            nursery.cancel_scope.cancel()
        return got_ab, got_ba

    try:
        with DecisionLog() as decisions:
            got_ab, got_ba = trio.run(main)
    finally:
        for s in sides.values():
            s["outbound"].close()
    assert got_ab.body == "a to b" and got_ba.body == "b to a"
    # Both proxies decided in both directions, by DANE-EE, and nothing was refused.
    for direction in ("outbound", "inbound"):
        for s in sides.values():
            assert any(f"direction={direction} " in l and f"domain={s['domain']} " in l
                       and "verdict=accept prooftype=dane-ee" in l for l in decisions.lines), decisions.lines
    assert not any("verdict=reject" in l for l in decisions.lines)
    for name, other in (("a", "b"), ("b", "a")):
        log = sides[name]["backend"].log_text()
        assert f"Outgoing s2s connection {sides[name]['domain']}->{sides[other]['domain']} complete" in log
        # Each backend checked the other's key and got 'valid' (from its own proxy's outbound
        # side, which minted nothing here but relays or answers per DESIGN §3.3).
        assert re.search(r"Received\[s2sout(?:_unauthed)?\]: <verify [^>]*type='valid'", log), log
        assert f"{sides[other]['domain']}->{sides[name]['domain']} is now authenticated" in log
