"""Issue #12 end to end with real servers: dialback answered at the proxy (DESIGN §3.3).

The local site is complete, as deployed: the proxy's inbound side where the local domain's SRV
points, its outbound side where the backend's module sends every outgoing S2S stream, and a
backend (Prosody 0.12 or ejabberd 23.01) behind both.  Peers are real servers on their own
loopback address; a recording relay in front of each peer's S2S port counts the connections
that reach it, and one in front of the backend records what the backend received.

A dialback peer accepted by DANE: the backend's check of the key is answered by the proxy, so
no connection reaches the peer's server for it (counted at the peer).

(EXTERNAL-only peers: tests/test_inbound_external_servers.py inbound,
tests/test_outbound_external.py outbound.)
"""
from __future__ import annotations

import re
from contextlib import ExitStack
from pathlib import Path

import pytest

from ejabberdenv import EjabberdHost, ejabberd_factory  # noqa: F401 (fixture)
from pki import TestCA, self_signed
from prosodyenv import ProsodyDns, VirtualHost, free_port, prosody_factory  # noqa: F401 (fixture)
from proxyenv import RecordingRelay, RunningProxy, write_config, write_policies
from test_ejabberd_outbound import module_dir  # noqa: F401 (fixture)
from xmppclient import deliver_message

USER, PASSWORD = "u", "pw"
TIMEOUT = 20.0
PROXY_IP = "127.0.5.10"
PEER_IP = "127.0.5.11"
BACKEND_IP = "127.0.5.12"
CONTRIB_PROSODY = Path(__file__).resolve().parent.parent / "contrib" / "prosody"
# A dialback-only peer, as older servers are: Prosody 0.12 answers an EXTERNAL offer
# (mod_saslauth hooks the peer's features at priority 150) before dialback; this module runs
# first and removes the offer from what Prosody reads.
DIALBACK_ONLY_MODULE = """
module:hook_tag("http://etherx.jabber.org/streams", "features", function (session, stanza)
	if session.type == "s2sout_unauthed" then
		stanza:remove_children("mechanisms", "urn:ietf:params:xml:ns:xmpp-sasl");
	end
end, 200);
"""
# dNSName SANs only: an id-on-xmppAddr SAN crashes ejabberd 23.01's EXTERNAL check
# (tests/test_ejabberdenv.py says how).
CA = TestCA("federation-auth Test Root")


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory) -> Path:
    return CA.write_root(tmp_path_factory.mktemp("ca") / "root.pem")


class Site:
    """The local domain L: proxy (inbound + outbound), backend, and relays that record."""

    def __init__(self, stack: ExitStack, tmp_path: Path, dns_env, ca_file: Path, kind: str, domain: str,
                 prosody_factory, ejabberd_factory, module_dir, peer_hosts: dict[str, str]) -> None:
        self.domain = domain
        backend_port = free_port(BACKEND_IP)
        self.relay = stack.enter_context(RecordingRelay((BACKEND_IP, backend_port)))
        cert_path, key_path = CA.issue([self.domain]).write(tmp_path / "proxy", self.domain)
        config = write_config(
            tmp_path / "proxy" / "config.toml", listen=[f"{PROXY_IP}:0"], backend=self.relay.hostport,
            domains=[(self.domain, cert_path, key_path)], nameservers=[dns_env.resolver_address],
            policy_dir=write_policies(tmp_path / "policy.d", {}), ca_file=ca_file,
            outbound_listen=["127.0.0.1:0"], dns_timeout=8.0, handshake_timeout=20.0)
        self.proxy = stack.enter_context(RunningProxy(config))
        stack.callback(lambda: print("--- proxy log\n" + self.proxy.log.text()))
        out_ip, out_port = self.proxy.outbound
        host = {USER: PASSWORD}
        if kind == "prosody":
            self.backend = prosody_factory(
                [VirtualHost(self.domain, users=host)], mode="backend", address=BACKEND_IP, s2s_port=backend_port,
                modules=["s2s_dane_proxy"], plugin_paths=[CONTRIB_PROSODY],
                extra_config=f's2s_dane_proxy = "{out_ip}:{out_port}"')
        else:
            self.backend = ejabberd_factory(
                [EjabberdHost(self.domain, users=host)], mode="backend", address=BACKEND_IP, s2s_port=backend_port,
                modules={"mod_s2s_dane_proxy": {"ip": out_ip, "port": out_port}}, code_paths=[module_dir],
                etc_hosts=peer_hosts)
        in_ip, in_port = self.proxy.inbound
        dns_env.publish_xmpp(self.domain, f"xmpp.{self.domain}", in_port, in_ip, None)

    def upstream_of(self, peer_domain: str) -> bytes:
        """Everything the backend received on connections that carry `peer_domain`'s stream."""
        return b"".join(bytes(c.upstream) for c in self.relay.snapshot()
                        if re.search(rb"from=['\"]" + re.escape(peer_domain.encode()), bytes(c.upstream)))


class Peer:
    """A peer domain P in the signed zone: its server behind a counting relay, TLSA 3 1 1 of
    its own key (or of another key when `matching` is false)."""

    def __init__(self, stack: ExitStack, dns_env, ca_file: Path, kind: str, local: str, prosody_factory,
                 ejabberd_factory, tmp_path: Path, *, matching: bool = True, dialback: bool = True,
                 reachable: bool = True) -> None:
        self.domain = dns_env.fresh(dns_env.secure, "peer")
        cert = CA.issue([self.domain])
        port = free_port(PEER_IP)
        self.relay = stack.enter_context(RecordingRelay((PEER_IP, port), listen_host=PEER_IP))
        tlsa = cert.cert if matching else self_signed([self.domain]).cert
        # Unreachable: its SRV names a port where nothing listens (the server itself still
        # connects out, and is judged by its certificate and this TLSA).
        published = self.relay.address[1] if reachable else free_port(PEER_IP)
        dns_env.publish_xmpp(self.domain, f"xmpp.{self.domain}", published, PEER_IP, tlsa, "3 1 1")
        users = {USER: PASSWORD}
        if kind.startswith("prosody"):
            extra = {}
            if kind == "prosody-dialback":
                (tmp_path / "peer-modules").mkdir(exist_ok=True)
                (tmp_path / "peer-modules" / "mod_test_dialback_only.lua").write_text(DIALBACK_ONLY_MODULE)
                extra = {"modules": ["test_dialback_only"], "plugin_paths": [tmp_path / "peer-modules"]}
            self.server = prosody_factory([VirtualHost(self.domain, cert=cert, users=users)], mode="peer",
                                          address=PEER_IP, s2s_port=port, ca_file=ca_file,
                                          dns=ProsodyDns.validating(dns_env.resolver_address,
                                                                    dns_env.trust_anchor_text), **extra)
        else:
            self.server = ejabberd_factory([EjabberdHost(self.domain, cert=cert, users=users)], mode="peer",
                                           address=PEER_IP, s2s_port=port, ca_file=ca_file,
                                           nameserver=dns_env.resolver_address, dialback=dialback,
                                           etc_hosts={f"xmpp.{local}": PROXY_IP})

    def connections(self) -> int:
        return len(self.relay.snapshot())


def _world(stack, tmp_path, dns_env, ca_file, backend_kind, peer_kind, prosody_factory, ejabberd_factory,
           module_dir, **peer_kwargs):
    # ejabberd resolves SRV targets through the C library: each side's private hosts file maps
    # the other's target (tests/ejabberdenv.py).
    local = dns_env.fresh(dns_env.secure, "home")
    peer = Peer(stack, dns_env, ca_file, peer_kind, local, prosody_factory, ejabberd_factory, tmp_path,
                **peer_kwargs)
    site = Site(stack, tmp_path, dns_env, ca_file, backend_kind, local, prosody_factory, ejabberd_factory,
                module_dir, peer_hosts={f"xmpp.{peer.domain}": PEER_IP})
    return site, peer


# ------------------------------------------------------------------------- local dialback answers

@pytest.mark.parametrize("backend_kind", ["ejabberd", "prosody"])
@pytest.mark.parametrize("peer_kind", ["prosody-dialback", "prosody", "ejabberd"])
def test_the_backends_key_check_is_answered_by_the_proxy(prosody_factory, ejabberd_factory, module_dir, dns_env,
                                                          ca_file, tmp_path, backend_kind, peer_kind):
    """A peer accepted by DANE — by dialback (a dialback-only Prosody) or by SASL EXTERNAL at
    the proxy (Prosody and ejabberd take the offer): the backend checks the key the proxy gave
    it, the proxy answers, and the peer's server gets no connection for it.  An ejabberd
    backend checks keys on a stream of their own, which the proxy answers without any
    connection.  A Prosody backend uses its one outgoing stream to the peer for both: contrib's
    module sends the key check as soon as the proxy's features arrive (mod_s2s would queue it
    until Prosody's own dialback succeeded), and Prosody's own authentication of that stream
    may open the stream to the peer it uses for its own traffic -- one connection at most, not
    the two or three of a relayed dialback."""
    with ExitStack() as stack:
        site, peer = _world(stack, tmp_path, dns_env, ca_file, backend_kind, peer_kind, prosody_factory,
                            ejabberd_factory, module_dir)
        got = deliver_message(peer.server.account(f"{USER}@{peer.domain}", PASSWORD),
                              site.backend.account(f"{USER}@{site.domain}", PASSWORD), "key answered locally",
                              timeout=TIMEOUT)
        assert got.get("from") == f"{USER}@{peer.domain}/sender"
        decision = site.proxy.log.wait_for(TIMEOUT, event="decision", direction="inbound", domain=peer.domain)
        assert (decision["verdict"], decision["prooftype"]) == ("accept", "dane-ee"), decision
        # The peer's own key never reached the backend: every <db:result> it got carries the
        # proxy's key for that pair (a dialback peer's key is replaced, an EXTERNAL one never had one).
        keys = site.proxy.server.settings.dialback_keys
        asked = 0
        for conn in site.relay.snapshot():
            up, down = bytes(conn.upstream), bytes(conn.downstream)
            header = re.search(rb"<stream:stream[^>]*\sid=['\"]([^'\"]+)", down)
            for key in re.findall(rb"<db:result[^>]*>([^<]+)</db:result>", up):
                asked += 1
                assert header and keys.is_ours(site.domain, peer.domain, header.group(1).decode(), key.decode()), \
                    (key, up)
        assert asked >= 1 and b"key answered locally" in site.upstream_of(peer.domain)
        if peer_kind == "prosody-dialback":
            peer.server.wait_for_log(r"sent dialback key on outgoing s2s stream")
            assert "Initiating SASL EXTERNAL" not in peer.server.log_text()
        # ejabberd: none.  Prosody: at most its own outgoing stream, started in parallel on the
        # same features and used for its own traffic; the key check never waits for it (the
        # unreachable-peer test below).
        assert peer.connections() <= (0 if backend_kind == "ejabberd" else 1), peer.relay.snapshot()


@pytest.mark.parametrize("peer_kind", ["prosody-dialback", "prosody"])
def test_a_peer_we_cannot_reach_still_delivers_to_a_prosody_backend(prosody_factory, ejabberd_factory, module_dir,
                                                                     dns_env, ca_file, tmp_path, peer_kind):
    """The issue's case: the peer's certificate proved its domain, but its server cannot be
    reached from here.  The backend's key check must not depend on reaching it: Prosody's own
    outgoing stream to the peer fails, yet contrib's module sends the queued `<db:verify>` as
    soon as the proxy's features arrive and the proxy answers it, so the message is delivered."""
    with ExitStack() as stack:
        site, peer = _world(stack, tmp_path, dns_env, ca_file, "prosody", peer_kind, prosody_factory,
                            ejabberd_factory, module_dir, reachable=False)
        got = deliver_message(peer.server.account(f"{USER}@{peer.domain}", PASSWORD),
                              site.backend.account(f"{USER}@{site.domain}", PASSWORD), "unreachable yet delivered",
                              timeout=TIMEOUT)
        assert got.get("from") == f"{USER}@{peer.domain}/sender"
        site.backend.wait_for_log(r"sending a queued dialback key check ahead of authentication")

