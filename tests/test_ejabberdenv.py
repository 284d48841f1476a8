"""The ejabberd test harness works: real ejabberd 23.01 nodes on loopback (tests/ejabberdenv.py).

* c2s: two users of one server exchange a message (tests/xmppclient.py against ejabberd), and
  the node stops cleanly (its whole process group is gone);
* DNS confinement: ejabberd's C-library lookups see the private /etc/hosts, its SRV lookups
  the test resolver; two peer-mode nodes federate over STARTTLS with test-PKI certificates,
  with dialback and, for an EXTERNAL-only node, with SASL EXTERNAL;
* end to end through the proxy's inbound side (RunningProxy, in-process): an ejabberd peer
  delivers to a Prosody backend and to an ejabberd backend, and a Prosody peer to an ejabberd
  backend, authenticated by dialback, the proxy's verdict DANE-EE.
"""
from __future__ import annotations

import os
import re
from contextlib import ExitStack
from pathlib import Path

import pytest

from ejabberdenv import EjabberdError, EjabberdHost, EjabberdServer, ejabberd_factory  # noqa: F401 (fixture)
from pki import TestCA
from prosodyenv import ProsodyDns, VirtualHost, free_port, prosody_factory  # noqa: F401 (fixture)
from proxyenv import RecordingRelay, RunningProxy, write_config, write_policies
from xmppclient import XmppError, deliver_message

USER, PASSWORD = "u", "pw"
TIMEOUT = 15.0
# This module's roles, each on its own loopback address (logs say who is who).
PROXY_IP = "127.0.4.10"
PEER_IP = "127.0.4.11"
BACKEND_IP = "127.0.4.12"
OTHER_IP = "127.0.4.13"

CA = TestCA("ejabberdenv Test Root")
# Certificates that ejabberd verifies carry dNSName SANs only: an id-on-xmppAddr SAN crashes
# ejabberd 23.01's SASL EXTERNAL certificate check (xmpp 1.6.1,
# xmpp_stream_pkix:get_domains_from_san/1 returns a binary where flatmap needs a list: badarg),
# which kills the stream.


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory) -> Path:
    return CA.write_root(tmp_path_factory.mktemp("ca") / "root.pem")


# ------------------------------------------------------------------------------ the harness alone

def test_local_users_exchange_a_message_and_the_node_stops(tmp_path):
    server = EjabberdServer(["local.test"], users={"alice": "a-pw", "bob": "b-pw"}, workdir=tmp_path / "ej")
    with server:
        assert server.running and server.startup_seconds is not None
        got = deliver_message(server.account("alice@local.test", "a-pw"), server.account("bob@local.test", "b-pw"),
                              "hello from alice", timeout=TIMEOUT)
        assert got.body == "hello from alice" and got.get("from") == "alice@local.test/sender"
        pid = server.pid
        # The node logged the c2s sessions it served.
        server.wait_for_log(r"\(tcp\|<0\.\d+\.\d+>\) Accepted c2s PLAIN authentication for alice@local\.test")
    assert not server.running and _gone(pid)
    assert "SIGTERM received - shutting down" in server.stdout_text()


def test_wrong_password_is_refused(ejabberd_factory):
    server = ejabberd_factory(["local.test"], users={USER: PASSWORD})
    with pytest.raises(XmppError, match="SASL PLAIN .* failed"):
        deliver_message(server.account(f"{USER}@local.test", "wrong"), server.account(f"{USER}@local.test", PASSWORD),
                        "x", timeout=TIMEOUT)


def test_bad_arguments_get_clear_errors():
    with pytest.raises(EjabberdError, match="loopback"):
        EjabberdServer(["a.test"], address="192.0.2.1")
    with pytest.raises(EjabberdError, match="mode"):
        EjabberdServer(["a.test"], mode="relay")
    with pytest.raises(EjabberdError, match="user/password"):
        EjabberdServer(["a.test"], users={"o'brien": "pw"})
    with pytest.raises(EjabberdError, match="loopback addresses only"):
        EjabberdServer(["a.test"], etc_hosts={"x.test": "192.0.2.1"})


def test_a_broken_config_fails_start_with_the_reason(tmp_path):
    server = EjabberdServer(["a.test"], options={"no_such_option_here": 1}, workdir=tmp_path / "ej",
                            keep_workdir=True)
    with pytest.raises(EjabberdError, match="exited with status|not ready") as info:
        server.start()
    assert "no_such_option_here" in str(info.value)
    assert not server.running


# ------------------------------------------------------------------------------ two nodes federate

def _peer(ejabberd_factory, dns_env, ca_file, domain: str, ip: str, port: int, **kwargs) -> EjabberdServer:
    return ejabberd_factory(
        [EjabberdHost(domain, cert=CA.issue([domain]), users={USER: PASSWORD})], mode="peer",
        address=ip, s2s_port=port, ca_file=ca_file, nameserver=dns_env.resolver_address, **kwargs)


@pytest.mark.parametrize("dialback", [True, False], ids=["dialback", "external-only"])
def test_two_peer_nodes_federate_over_starttls(ejabberd_factory, dns_env, ca_file, dialback):
    a, b = dns_env.fresh(dns_env.insecure, "eja"), dns_env.fresh(dns_env.insecure, "ejb")
    ports = {a: free_port(PEER_IP), b: free_port(OTHER_IP)}
    with dns_env.batch():
        dns_env.publish_xmpp(a, f"xmpp.{a}", ports[a], PEER_IP, None)
        dns_env.publish_xmpp(b, f"xmpp.{b}", ports[b], OTHER_IP, None)
    # SRV from the test resolver (inet_res), the target's address from the private /etc/hosts
    # (C library): both of ejabberd's resolvers are exercised.
    etc_hosts = {f"xmpp.{a}": PEER_IP, f"xmpp.{b}": OTHER_IP}
    node_a = _peer(ejabberd_factory, dns_env, ca_file, a, PEER_IP, ports[a], etc_hosts=etc_hosts, dialback=dialback)
    node_b = _peer(ejabberd_factory, dns_env, ca_file, b, OTHER_IP, ports[b], etc_hosts=etc_hosts, dialback=dialback)

    got = deliver_message(node_a.account(f"{USER}@{a}", PASSWORD), node_b.account(f"{USER}@{b}", PASSWORD),
                          "a to b", timeout=TIMEOUT)
    assert got.get("from") == f"{USER}@{a}/sender"
    # Certificates authenticate both ends (the test CA), so ejabberd uses SASL EXTERNAL, with
    # or without dialback loaded.  (Its logger writes asynchronously: wait for the lines.)
    node_b.wait_for_log(rf"Accepted inbound s2s EXTERNAL authentication {re.escape(a)} -> {re.escape(b)} \(")
    node_a.wait_for_log(rf"Accepted outbound s2s EXTERNAL authentication {re.escape(a)} -> {re.escape(b)} "
                        rf"\({re.escape(OTHER_IP)}\)")


def test_the_node_sees_only_its_private_hosts_file(ejabberd_factory, dns_env, ca_file):
    # No test-resolver address for the SRV target: a name known only to the private /etc/hosts
    # of node a (not to this machine's /etc/hosts, nor to any DNS) is what a connects to.
    a, b = dns_env.fresh(dns_env.insecure, "eja"), dns_env.fresh(dns_env.insecure, "ejb")
    port_b = free_port(OTHER_IP)
    dns_env.publish(None, f"_xmpp-server._tcp.{b}", "SRV", f"0 0 {port_b} only-in-private-hosts.{b}.")
    node_b = _peer(ejabberd_factory, dns_env, ca_file, b, OTHER_IP, port_b)
    node_a = _peer(ejabberd_factory, dns_env, ca_file, a, PEER_IP, free_port(PEER_IP),
                   etc_hosts={f"only-in-private-hosts.{b}": OTHER_IP})
    with open("/etc/hosts") as f:
        assert f"only-in-private-hosts.{b}" not in f.read()
    # a -> b works: SRV from the test resolver, the address from a's private hosts file.
    deliver_message(node_a.account(f"{USER}@{a}", PASSWORD), node_b.account(f"{USER}@{b}", PASSWORD),
                    "via the private hosts file", timeout=TIMEOUT)


# ------------------------------------------------------------------------------ through the proxy

def _site(stack: ExitStack, tmp_path: Path, dns_env, ca_file, backend, domain: str, peer_domain: str):
    """Recording relay in front of `backend`, the proxy (in-process) in front of the relay, and
    B's SRV/A pointing at the proxy; the peer's policy requires DANE."""
    cert = CA.issue([domain])
    cert_path, key_path = cert.write(tmp_path / "proxy", domain)
    relay = stack.enter_context(RecordingRelay(backend.s2s_addr))
    config = write_config(
        tmp_path / "proxy" / "config.toml", listen=[f"{PROXY_IP}:0"], backend=relay.hostport,
        domains=[(domain, cert_path, key_path)], nameservers=[dns_env.resolver_address],
        policy_dir=write_policies(tmp_path / "policy.d", {peer_domain: {"require": "dane"}}), ca_file=ca_file)
    proxy = stack.enter_context(RunningProxy(config))
    host, port = proxy.inbound
    dns_env.publish_xmpp(domain, f"xmpp.{domain}", port, host, None)
    return relay, proxy


@pytest.mark.parametrize("peer_kind,backend_kind", [("ejabberd", "prosody"), ("ejabberd", "ejabberd"),
                                                   ("prosody", "ejabberd")])
def test_peer_through_the_proxy_to_a_backend(ejabberd_factory, prosody_factory, dns_env, ca_file, tmp_path,
                                             peer_kind, backend_kind):
    # (Prosody -> Prosody is tests/test_inbound_prosody.py's.)
    peer_domain = dns_env.fresh(dns_env.secure, "ejp")
    domain = dns_env.fresh(dns_env.secure, "b")
    peer_cert = CA.issue([peer_domain])
    peer_port = free_port(PEER_IP)
    # The peer's SRV, A and TLSA (DANE-EE, its own key) in the signed zone.
    dns_env.publish_xmpp(peer_domain, f"xmpp.{peer_domain}", peer_port, PEER_IP, peer_cert.cert, "3 1 1")
    backend_cert = CA.issue([domain])
    if backend_kind == "prosody":
        backend = prosody_factory([VirtualHost(domain, cert=backend_cert, users={USER: PASSWORD})], mode="backend",
                                  address=BACKEND_IP,
                                  dns=ProsodyDns.validating(dns_env.resolver_address, dns_env.trust_anchor_text))
    else:
        # The backend checks the peer's dialback key by connecting to the peer directly (SRV from
        # the test resolver, the target's address from its hosts file), with STARTTLS (optional).
        backend = ejabberd_factory([EjabberdHost(domain, cert=backend_cert, users={USER: PASSWORD})],
                                   mode="backend", address=BACKEND_IP, ca_file=ca_file,
                                   nameserver=dns_env.resolver_address, etc_hosts={f"xmpp.{peer_domain}": PEER_IP})
    with ExitStack() as stack:
        relay, proxy = _site(stack, tmp_path, dns_env, ca_file, backend, domain, peer_domain)
        if peer_kind == "ejabberd":
            peer = ejabberd_factory(
                [EjabberdHost(peer_domain, cert=peer_cert, users={USER: PASSWORD})], mode="peer", address=PEER_IP,
                s2s_port=peer_port, ca_file=ca_file, nameserver=dns_env.resolver_address,
                etc_hosts={f"xmpp.{domain}": PROXY_IP})
        else:
            peer = prosody_factory(
                [VirtualHost(peer_domain, cert=peer_cert, users={USER: PASSWORD})], mode="peer", address=PEER_IP,
                s2s_port=peer_port, ca_file=ca_file,
                dns=ProsodyDns.validating(dns_env.resolver_address, dns_env.trust_anchor_text))

        got = deliver_message(peer.account(f"{USER}@{peer_domain}", PASSWORD),
                              backend.account(f"{USER}@{domain}", PASSWORD), "ejabberd through the proxy",
                              timeout=TIMEOUT)
        assert got.get("from") == f"{USER}@{peer_domain}/sender"

        decision = proxy.wait_for_decision(peer_domain)
        assert (decision["verdict"], decision["direction"], decision["prooftype"]) == ("accept", "inbound", "dane-ee")
        # Dialback crossed the relay: the peer's <db:result> up, the backend's 'valid' down,
        # then the message.
        conns = [c for c in relay.snapshot() if f"from='{peer_domain}'".encode() in c.upstream
                 or f'from="{peer_domain}"'.encode() in c.upstream]
        assert conns, relay.snapshot()
        upstream = b"".join(bytes(c.upstream) for c in conns)
        downstream = b"".join(bytes(c.downstream) for c in conns)
        assert b"db:result" in upstream and b"ejabberd through the proxy" in upstream
        assert re.search(rb"<db:result[^>]*type=['\"]valid['\"]", downstream), downstream
        # The peer authenticated its stream by dialback: the proxy offered it no SASL.
        if peer_kind == "ejabberd":
            peer.wait_for_log(rf"Accepted outbound s2s dialback authentication {re.escape(peer_domain)} -> "
                              rf"{re.escape(domain)} \(")
        else:
            peer.wait_for_log(rf"Outgoing s2s connection {re.escape(peer_domain)}->{re.escape(domain)} complete")
