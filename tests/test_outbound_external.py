"""The outbound side authenticates the backend's domain itself (DESIGN §3.3), with real servers.

* Prosody 0.12 and ejabberd 23.01 backends (through contrib/'s modules) → the proxy (in-process,
  `outbound.listen`) → an ejabberd peer that authenticates servers with SASL EXTERNAL only
  (no `mod_s2s_dialback`): the proxy presents L's certificate, authenticates L by EXTERNAL and
  answers the backend's dialback itself -- the message is delivered.  The same peer behind a
  TLSA that names another key gets nothing, and the backend's user gets a bounce with the
  proxy's reason.
* An ejabberd backend checks a dialback key the proxy minted (as the inbound side does for a
  peer it accepted by certificate: a `<db:result>` sent to the backend's plaintext S2S port):
  the proxy answers the backend's `<db:verify>` itself and opens no connection to the peer
  (counted at the peer's published address).  The control -- a key the proxy did not mint --
  makes the proxy connect to the peer.

The peer ejabberd trusts the test CA (`s2s_cafile`); the proxy's client certificate for L has
dNSName SANs only (ejabberd 23.01 crashes on an xmppAddr SAN when checking EXTERNAL).
"""
from __future__ import annotations

import re
from contextlib import ExitStack
from pathlib import Path

import pytest
import trio

from ejabberdenv import EjabberdHost, ejabberd_factory  # noqa: F401 (fixture)
from prosodyenv import ProsodyDns, VirtualHost, prosody_factory  # noqa: F401 (fixture)
from test_ejabberd_outbound import (  # noqa: F401 (fixtures)
    BACKEND_IP, CA, PASSWORD, PEER_IP, PROXY_IP, TIMEOUT, USER, Listener, _local_proxy, _peer_domain,
    _publish_local, _site, ca_file, module_dir, send_for_bounce,
)
from xmppclient import NS_DIALBACK, NS_SERVER, XmppStream, deliver_message, stream_header

PROSODY_CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "prosody"


def _prosody_site(stack: ExitStack, tmp_path: Path, dns_env, ca_file: Path, prosody_factory):
    """`_local_proxy` and a Prosody backend for L whose outgoing S2S goes to the proxy through
    contrib/prosody's module."""
    local, proxy, backend_port = _local_proxy(stack, tmp_path, dns_env, ca_file)
    out_ip, out_port = proxy.outbound
    backend = prosody_factory(
        [VirtualHost(local, users={USER: PASSWORD})], mode="backend", address=BACKEND_IP, s2s_port=backend_port,
        modules=["s2s_dane_proxy"], plugin_paths=[PROSODY_CONTRIB], extra_config=f's2s_dane_proxy = "{out_ip}:{out_port}"')
    _publish_local(dns_env, local, proxy)
    return local, proxy, backend


def _external_only_peer(ejabberd_factory, dns_env, ca_file, matching: bool, local: str | None = None):
    """An ejabberd peer without dialback (EXTERNAL only).  With `local`, its way to that domain
    is the proxy's inbound side (ejabberd 23.01 resolves addresses through the C library: its
    private /etc/hosts)."""
    name, cert, port = _peer_domain(dns_env, matching=matching)
    peer = ejabberd_factory([EjabberdHost(name, cert=cert, users={USER: PASSWORD})], mode="peer", address=PEER_IP,
                            s2s_port=port, ca_file=ca_file, nameserver=dns_env.resolver_address, dialback=False,
                            etc_hosts={f"xmpp.{local}": PROXY_IP} if local else {})
    return name, peer


def _site_of(kind, stack, tmp_path, dns_env, ca_file, ejabberd_factory, prosody_factory, module_dir):
    if kind == "prosody":
        return _prosody_site(stack, tmp_path, dns_env, ca_file, prosody_factory)
    return _site(stack, tmp_path, dns_env, ca_file, ejabberd_factory, module_dir)


@pytest.mark.parametrize("backend_kind", ["prosody", "ejabberd"])
def test_backend_delivers_to_an_external_only_ejabberd_peer(
        ejabberd_factory, prosody_factory, dns_env, ca_file, module_dir, tmp_path, backend_kind):
    with ExitStack() as stack:
        local, proxy, backend = _site_of(backend_kind, stack, tmp_path, dns_env, ca_file, ejabberd_factory,
                                         prosody_factory, module_dir)
        name, peer = _external_only_peer(ejabberd_factory, dns_env, ca_file, matching=True)

        got = deliver_message(backend.account(f"{USER}@{local}", PASSWORD), peer.account(f"{USER}@{name}", PASSWORD),
                              "external only", timeout=TIMEOUT)
        assert got.get("from") == f"{USER}@{local}/sender"
        decision = proxy.log.wait_for(TIMEOUT, event="decision", direction="outbound", domain=name)
        assert (decision["verdict"], decision["prooftype"]) == ("accept", "dane-ee"), decision
        done = proxy.log.wait_for(TIMEOUT, event="authenticated-to-peer", domain=name)
        assert (done["local"], done["method"]) == (local, "sasl-external"), done
        # The peer accepted L by the certificate the proxy presented, not by dialback.
        peer.wait_for_log(rf"Accepted inbound s2s EXTERNAL authentication {re.escape(local)} -> {re.escape(name)}")


@pytest.mark.parametrize("backend_kind", ["prosody", "ejabberd"])
def test_backend_message_to_a_mismatching_external_only_peer_bounces_with_the_reason(
        ejabberd_factory, prosody_factory, dns_env, ca_file, module_dir, tmp_path, backend_kind):
    with ExitStack() as stack:
        local, proxy, backend = _site_of(backend_kind, stack, tmp_path, dns_env, ca_file, ejabberd_factory,
                                         prosody_factory, module_dir)
        name, peer = _external_only_peer(ejabberd_factory, dns_env, ca_file, matching=False)

        bounce = send_for_bounce(backend.account(f"{USER}@{local}", PASSWORD), f"{USER}@{name}", "must not arrive")
        assert bounce is not None, "no bounce\n" + proxy.log.text()
        # The proxy's stream error text reaches the user's bounce (both servers quote it).
        assert "remote-connection-failed" in bounce and "no usable TLSA record matches" in bounce, bounce
        decision = proxy.log.wait_for(TIMEOUT, event="decision", direction="outbound", domain=name)
        assert decision["verdict"] == "reject" and "no usable TLSA record matches" in decision["reason"], decision
        log = peer.log_text()
        assert "must not arrive" not in log
        assert not re.search(rf"Accepted inbound s2s \S+ authentication {re.escape(local)} -> ", log), log


def test_an_external_only_peer_that_refuses_the_certificate_bounces_with_its_reason(
        ejabberd_factory, dns_env, ca_file, module_dir, tmp_path):
    # The peer is accepted by DANE, but it does not trust the proxy's client certificate (no
    # s2s_cafile) and has no dialback: EXTERNAL fails, the proxy's dialback fallback is
    # refused, and the backend's user learns why.
    with ExitStack() as stack:
        local, proxy, backend = _site(stack, tmp_path, dns_env, ca_file, ejabberd_factory, module_dir)
        name, cert, port = _peer_domain(dns_env, matching=True)
        peer = ejabberd_factory([EjabberdHost(name, cert=cert, users={USER: PASSWORD})], mode="peer",
                                address=PEER_IP, s2s_port=port, nameserver=dns_env.resolver_address, dialback=False)
        bounce = send_for_bounce(backend.account(f"{USER}@{local}", PASSWORD), f"{USER}@{name}", "must not arrive")
        assert bounce is not None, "no bounce\n" + proxy.log.text()
        refused = proxy.log.wait_for(TIMEOUT, event="peer-stream-failed", domain=name)
        # ejabberd without dialback ends the stream (not-authorized) at the proxy's dialback key.
        assert refused["reason"].startswith(f"the peer {name} ended the stream: not-authorized"), refused
        assert f"after SASL EXTERNAL refused by {name}" in refused["reason"], refused
        assert refused["reason"] in bounce.replace("&apos;", "'"), bounce
        assert "must not arrive" not in peer.log_text()


async def _dialback_to_backend(backend_addr, peer: str, local: str, key_for) -> str | None:
    """As the proxy's inbound side does for a peer it accepted by certificate: a plaintext
    stream from `peer` to the backend, a `<db:result>` with `key_for(backend's stream id)`;
    returns the type of the backend's answer."""
    xs = await XmppStream.connect(*backend_addr, label="backend")
    try:
        await xs.send(stream_header(ns=NS_SERVER, dialback=True, from_=peer, to=local))
        header = await xs.expect_header()
        stream_id = header.get("id")
        assert stream_id
        await xs.expect_stanza()                       # features
        await xs.send(f"<db:result from='{peer}' to='{local}'>{key_for(stream_id)}</db:result>")
        answer = await xs.wait_for(lambda s: s.tag == f"{{{NS_DIALBACK}}}result", timeout=TIMEOUT)
        return answer.get("type")
    finally:
        await xs.aclose()


@pytest.mark.parametrize("key", ["minted", "control-not-ours"])
def test_ejabberd_backend_verifies_a_proxy_key_with_no_connection_to_the_peer(
        ejabberd_factory, dns_env, ca_file, module_dir, tmp_path, key):
    peer_listener = Listener(PEER_IP, close_each=True)
    with ExitStack() as stack:
        stack.callback(peer_listener.close)
        local, proxy, backend = _site(stack, tmp_path, dns_env, ca_file, ejabberd_factory, module_dir)
        # The peer domain's only server is the counting listener (secure SRV, some TLSA).
        name = dns_env.fresh(dns_env.secure, "peer")
        dns_env.publish_xmpp(name, f"xmpp.{name}", peer_listener.address[1], PEER_IP, CA.issue([name]).cert, "3 1 1")
        keys = proxy.server.outbound_handler.context.dialback_keys
        assert proxy.server.settings.dialback_keys is keys      # one secret for both directions

        def key_for(stream_id: str) -> str:
            if key == "minted":
                return keys.mint(receiving=local, originating=name, stream_id=stream_id)
            return "ab" * 32

        answer = trio.run(_dialback_to_backend, backend.s2s_addr, name, local, key_for)
        if key == "minted":
            assert answer == "valid"
            answered = proxy.log.wait_for(TIMEOUT, event="dialback-answered-locally", domain=name)
            assert answered["local"] == local
            # ejabberd's verification stream went to the proxy, which answered it: nothing at
            # the peer, not even a TCP connection; no verdict was needed.
            assert peer_listener.connections() == 0
            assert proxy.decisions(direction="outbound", domain=name) == []
        else:
            assert answer != "valid"
            proxy.log.wait_for(TIMEOUT, event="peer-unreachable", domain=name)
            assert peer_listener.connections() >= 1          # the control: this key needed the peer


# The dialback fallback with a real peer: a Prosody peer that does not trust the proxy's
# certificate offers no EXTERNAL, so the proxy authenticates L with its own dialback key and
# the peer checks it with L's authoritative server -- the proxy's inbound side, which must
# answer keys the proxy minted (the inbound side's local answers, proxy/inbound_pairs.py).
def test_prosody_backend_delivers_to_a_dialback_only_prosody_peer(prosody_factory, dns_env, ca_file, tmp_path):
    with ExitStack() as stack:
        local, proxy, backend = _prosody_site(stack, tmp_path, dns_env, ca_file, prosody_factory)
        name, cert, port = _peer_domain(dns_env, matching=True)
        # No ca_file: the peer cannot validate the proxy's client certificate -> no EXTERNAL.
        peer = prosody_factory([VirtualHost(name, cert=cert, users={USER: PASSWORD})], mode="peer", address=PEER_IP,
                               s2s_port=port, s2s_secure_auth=False,
                               dns=ProsodyDns.validating(dns_env.resolver_address, dns_env.trust_anchor_text))
        got = deliver_message(backend.account(f"{USER}@{local}", PASSWORD), peer.account(f"{USER}@{name}", PASSWORD),
                              "dialback through the proxy's own key", timeout=TIMEOUT)
        assert got.get("from") == f"{USER}@{local}/sender"
        done = proxy.log.wait_for(TIMEOUT, event="authenticated-to-peer", domain=name)
        assert (done["local"], done["method"]) == (local, "dialback"), done
