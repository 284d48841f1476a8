"""ejabberd's outgoing S2S through contrib/ejabberd/mod_s2s_dane_proxy.erl (DESIGN §3.2, issue 12).

The module is compiled with `erlc` at test time into a temporary folder and loaded with `-pa`.

* The fallback is closed: with every resolver dead (Erlang's inet_res and the C library's
  resolv.conf point at dead loopback ports) and the peer domain in ejabberd's /etc/hosts, a
  "peer" listener on the address and port ejabberd's own fallback would use (the domain's
  address on `outgoing_s2s_port`) sees no connection when the module is loaded and the proxy
  is down: the message bounces.  The same setup without the module connects to that
  listener -- the control that shows the test can fail.
* Through the real proxy (RunningProxy with `outbound.listen`, in-process): a peer Prosody or
  ejabberd whose secure TLSA matches gets the message; one whose TLSA mismatches gets nothing
  (not even a connection with the backend's stream) and ejabberd's user gets a bounce; the
  proxy's decision line has the verdict and reason.
* The backend's dialback key checks (mod_s2s_dialback's verification streams) go through the
  module too: a peer Prosody delivers to the ejabberd backend, and the key check is judged by
  the proxy's outbound side while ejabberd's own fallback target sees nothing.
"""
from __future__ import annotations

import re
import socket
import subprocess
import threading
from contextlib import ExitStack
from pathlib import Path

import pytest
import trio

from ejabberdenv import EjabberdHost, ejabberd_factory, ejabberd_libs  # noqa: F401 (fixture)
from pki import TestCA, self_signed
from prosodyenv import ProsodyDns, VirtualHost, free_port, prosody_factory  # noqa: F401 (fixture)
from proxyenv import RunningProxy, write_config, write_policies
from xmppclient import deliver_message

CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "ejabberd"
USER, PASSWORD = "u", "pw"
TIMEOUT = 15.0
BACKEND_IP = "127.0.5.10"
PEER_IP = "127.0.5.11"
PROXY_IP = "127.0.5.12"
# dNSName SANs only: an xmppAddr SAN crashes ejabberd 23.01's SASL EXTERNAL certificate check
# (see tests/test_ejabberdenv.py).
CA = TestCA("ejabberd outbound Test Root")


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory) -> Path:
    """contrib/ejabberd/mod_s2s_dane_proxy.erl compiled with erlc (warnings are errors)."""
    out = tmp_path_factory.mktemp("ebin")
    result = subprocess.run(
        ["erlc", "-Werror", "-pa", str(next(ejabberd_libs().glob("ejabberd-*/ebin"))), "-o", str(out),
         str(CONTRIB / "mod_s2s_dane_proxy.erl")],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "mod_s2s_dane_proxy.beam").is_file()
    return out


class Listener:
    """A TCP listener that accepts and counts connections in a thread and answers nothing: a
    peer that must not be reached directly.  It keeps them open, or with `close_each` closes
    each at once (so a proxy that did connect fails fast instead of waiting for a handshake)."""

    def __init__(self, ip: str, *, close_each: bool = False) -> None:
        self.sock = socket.socket()
        self.sock.bind((ip, 0))
        self.sock.listen(16)
        self.address = self.sock.getsockname()
        self.close_each = close_each
        self.accepted: list[socket.socket] = []
        self._arrived = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:   # closed by close()
                return
            if self.close_each:
                conn.close()
            self.accepted.append(conn)
            self._arrived.set()

    def connections(self, wait: float = 0.0) -> int:
        """Connections so far; with `wait`, block up to that long for the first one."""
        if wait:
            self._arrived.wait(wait)
        return len(self.accepted)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes the blocked accept() (Linux)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)
        for conn in self.accepted:
            conn.close()


def _dead_port_backend(ejabberd_factory, module_dir, domain: str, peer: Listener, peer_domain: str, *,
                       with_module: bool):
    """An ejabberd backend with every resolver dead and `peer_domain` -> the listener's
    address in its /etc/hosts, `outgoing_s2s_port` = the listener's port.  With the module,
    the proxy address is a loopback port nobody listens on."""
    dead_proxy_port = free_port("127.0.0.1")   # bound and closed: connection refused
    modules = {"mod_s2s_dane_proxy": {"ip": "127.0.0.1", "port": dead_proxy_port}} if with_module else {}
    return ejabberd_factory(
        [EjabberdHost(domain, users={USER: PASSWORD})], mode="backend", address=BACKEND_IP,
        etc_hosts={peer_domain: peer.address[0]}, modules=modules, code_paths=[module_dir],
        options={"outgoing_s2s_port": peer.address[1]}), dead_proxy_port


def send_for_bounce(sender, to: str, body: str, timeout: float = TIMEOUT) -> str | None:
    """Log `sender` in, send `body` to `to` (a JID elsewhere) and return the error bounce's
    text when it arrives within `timeout`, else None."""

    async def run() -> str | None:
        client = await sender.login(resource="sender", timeout=timeout)
        try:
            await client.send_presence()
            await client.send_message(to, body)
            try:
                bounce = await client.xs.wait_for(
                    lambda s: s.name == "message" and s.get("type") == "error"
                    and (s.get("from") or "").split("/")[0] == to, timeout=timeout)
            except trio.TooSlowError:
                return None
            return str(bounce)
        finally:
            await client.aclose()

    return trio.run(run)


def test_without_the_module_ejabberd_falls_back_to_the_peer_directly(ejabberd_factory, module_dir):
    # The control: ejabberd's own fallback (SRV lookup failed -> the domain's address on
    # outgoing_s2s_port, through the C library) reaches the listener.
    peer = Listener(PEER_IP)
    try:
        backend, _ = _dead_port_backend(ejabberd_factory, module_dir, "home.test", peer, "peer.test",
                                        with_module=False)
        # The listener never answers: do not wait for an outcome of the message.
        send_for_bounce(backend.account(f"{USER}@home.test", PASSWORD), f"{USER}@peer.test", "goes direct",
                        timeout=0.5)
        assert peer.connections(wait=TIMEOUT) >= 1
        backend.wait_for_log(r"Outbound s2s connection started: home\.test -> peer\.test")
    finally:
        peer.close()


def test_with_the_module_and_every_resolver_dead_nothing_reaches_the_peer(ejabberd_factory, module_dir):
    peer = Listener(PEER_IP)
    try:
        backend, proxy_port = _dead_port_backend(ejabberd_factory, module_dir, "home.test", peer, "peer.test",
                                                 with_module=True)
        backend.wait_for_log(rf"Outgoing s2s connections of home\.test are routed to the DANE proxy at "
                             rf"127\.0\.0\.1:{proxy_port}")
        bounce = send_for_bounce(backend.account(f"{USER}@home.test", PASSWORD), f"{USER}@peer.test",
                                 "must not go direct")
        # The proxy is down: the connection to it is refused, and that is the end of it.
        assert bounce is not None and "Connection failed: connection refused" in bounce, bounce
        backend.wait_for_log(r"Failed to establish outbound s2s connection home\.test -> peer\.test: "
                             r"Connection failed: connection refused; bouncing for")
        # The stream has ended (bounced, logged): had ejabberd fallen back to its own DNS, it
        # would have connected to the listener before giving up.
        assert peer.connections() == 0
    finally:
        peer.close()


# ------------------------------------------------------------------------------ through the proxy

@pytest.fixture(scope="module")
def ca_file(tmp_path_factory) -> Path:
    return CA.write_root(tmp_path_factory.mktemp("ca") / "root.pem")


def _local_proxy(stack: ExitStack, tmp_path: Path, dns_env, ca_file: Path, policies: dict | None = None):
    """A fresh domain L and the proxy for it (inbound on PROXY_IP, `outbound.listen` on
    loopback, in-process), relaying to a backend port on BACKEND_IP: (L, proxy, that port).
    Start the backend, then `_publish_local`."""
    local = dns_env.fresh(dns_env.secure, "home")
    backend_port = free_port(BACKEND_IP)
    cert_path, key_path = CA.issue([local]).write(tmp_path / "proxy", local)
    config = write_config(
        tmp_path / "proxy" / "config.toml", listen=[f"{PROXY_IP}:0"], backend=f"{BACKEND_IP}:{backend_port}",
        domains=[(local, cert_path, key_path)], nameservers=[dns_env.resolver_address],
        policy_dir=write_policies(tmp_path / "policy.d", policies or {}), ca_file=ca_file,
        outbound_listen=["127.0.0.1:0"],
        # Generous for a machine shared with other test runs: a DNS timeout would be a reject
        # with another reason.
        dns_timeout=8.0, handshake_timeout=20.0)
    proxy = stack.enter_context(RunningProxy(config))
    # Shown by pytest only when the test fails.
    stack.callback(lambda: print("--- proxy log\n" + proxy.log.text()))
    return local, proxy, backend_port


def _publish_local(dns_env, local: str, proxy) -> None:
    """L's SRV points at the proxy's inbound side, so a peer checking the backend's dialback
    key comes back through the proxy too."""
    in_ip, in_port = proxy.inbound
    dns_env.publish_xmpp(local, f"xmpp.{local}", in_port, in_ip, None)


def _site(stack: ExitStack, tmp_path: Path, dns_env, ca_file: Path, ejabberd_factory, module_dir,
          policies: dict | None = None, **backend_kwargs):
    """The local site: `_local_proxy` and an ejabberd backend for L routing its outgoing S2S
    to the proxy's `outbound.listen` with the module."""
    local, proxy, backend_port = _local_proxy(stack, tmp_path, dns_env, ca_file, policies)
    out_ip, out_port = proxy.outbound
    backend = ejabberd_factory(
        [EjabberdHost(local, users={USER: PASSWORD})], mode="backend", address=BACKEND_IP, s2s_port=backend_port,
        modules={"mod_s2s_dane_proxy": {"ip": out_ip, "port": out_port}}, code_paths=[module_dir], **backend_kwargs)
    _publish_local(dns_env, local, proxy)
    return local, proxy, backend


def _peer_domain(dns_env, matching: bool) -> tuple[str, object, int]:
    """A peer domain in the signed zone with SRV/A at PEER_IP and a TLSA that matches its
    certificate (or names another key)."""
    name = dns_env.fresh(dns_env.secure, "peer")
    cert = CA.issue([name])
    port = free_port(PEER_IP)
    tlsa_cert = cert.cert if matching else self_signed([name]).cert
    dns_env.publish_xmpp(name, f"xmpp.{name}", port, PEER_IP, tlsa_cert, "3 1 1")
    return name, cert, port


def _peer_server(kind: str, prosody_factory, ejabberd_factory, dns_env, ca_file, name, cert, port, local):
    if kind == "prosody":
        return prosody_factory([VirtualHost(name, cert=cert, users={USER: PASSWORD})], mode="peer", address=PEER_IP,
                               s2s_port=port, ca_file=ca_file,
                               dns=ProsodyDns.validating(dns_env.resolver_address, dns_env.trust_anchor_text))
    return ejabberd_factory([EjabberdHost(name, cert=cert, users={USER: PASSWORD})], mode="peer", address=PEER_IP,
                            s2s_port=port, ca_file=ca_file, nameserver=dns_env.resolver_address,
                            etc_hosts={f"xmpp.{local}": PROXY_IP})


@pytest.mark.parametrize("peer_kind", ["prosody", "ejabberd"])
def test_ejabberd_backend_delivers_through_the_module_to_an_accepted_peer(
        ejabberd_factory, prosody_factory, dns_env, ca_file, module_dir, tmp_path, peer_kind):
    with ExitStack() as stack:
        local, proxy, backend = _site(stack, tmp_path, dns_env, ca_file, ejabberd_factory, module_dir)
        name, cert, port = _peer_domain(dns_env, matching=True)
        peer = _peer_server(peer_kind, prosody_factory, ejabberd_factory, dns_env, ca_file, name, cert, port, local)

        got = deliver_message(backend.account(f"{USER}@{local}", PASSWORD), peer.account(f"{USER}@{name}", PASSWORD),
                              "ejabberd out through the proxy", timeout=TIMEOUT)
        assert got.get("from") == f"{USER}@{local}/sender"
        decision = proxy.log.wait_for(TIMEOUT, event="decision", direction="outbound", domain=name)
        assert (decision["verdict"], decision["prooftype"]) == ("accept", "dane-ee"), decision
        # ejabberd authenticated by dialback over the proxy; the backend's own connection went
        # to outbound.listen, never to the peer's address.
        backend.wait_for_log(rf"Accepted outbound s2s dialback authentication {re.escape(local)} -> "
                             rf"{re.escape(name)} \(127\.0\.0\.1\)")
        assert f"({PEER_IP})" not in backend.log_text()


@pytest.mark.parametrize("peer_kind", ["prosody", "ejabberd"])
def test_ejabberd_backend_message_to_a_mismatching_peer_bounces_with_the_reason(
        ejabberd_factory, prosody_factory, dns_env, ca_file, module_dir, tmp_path, peer_kind):
    with ExitStack() as stack:
        local, proxy, backend = _site(stack, tmp_path, dns_env, ca_file, ejabberd_factory, module_dir)
        name, cert, port = _peer_domain(dns_env, matching=False)
        peer = _peer_server(peer_kind, prosody_factory, ejabberd_factory, dns_env, ca_file, name, cert, port, local)

        bounce = send_for_bounce(backend.account(f"{USER}@{local}", PASSWORD), f"{USER}@{name}", "must not arrive")
        assert bounce is not None, "no bounce\n" + proxy.log.text()
        # The proxy's stream error text reaches ejabberd's user in full.
        assert "no usable TLSA record matches" in bounce, (bounce, proxy.log.text())
        decision = proxy.log.wait_for(TIMEOUT, event="decision", direction="outbound", domain=name)
        assert decision["verdict"] == "reject" and "no usable TLSA record matches" in decision["reason"], decision
        backend.wait_for_log(rf"Failed to establish outbound s2s connection {re.escape(local)} -> {re.escape(name)}: "
                             r"Stream closed by peer: no server of .* no usable TLSA record matches .*"
                             r"\(remote-connection-failed\)")
        # The peer never saw the backend's stream: no incoming stream from L was established.
        log = peer.log_text()
        assert "must not arrive" not in log
        if peer_kind == "prosody":
            assert f"Incoming s2s connection {local}->{name} complete" not in log
        else:
            assert not re.search(rf"Accepted inbound s2s \S+ authentication {re.escape(local)} -> ", log), log


def test_ejabberd_backend_checks_a_peers_dialback_key_through_the_module(
        ejabberd_factory, prosody_factory, dns_env, ca_file, module_dir, tmp_path):
    # Inbound: a peer Prosody delivers to the ejabberd backend.  The proxy accepts the peer by
    # DANE and asserts the pair to the backend with a dialback key of its own (DESIGN §3.3);
    # the backend checks it (mod_s2s_dialback's verification stream) through the module and
    # the proxy's outbound side, which answers it without connecting to the peer.  The
    # backend's own resolvers are dead, and its /etc/hosts and outgoing_s2s_port send
    # ejabberd's fallback for the peer domain to a listener that must see nothing.
    direct = Listener(PEER_IP)
    with ExitStack() as stack:
        stack.callback(direct.close)
        name, cert, port = _peer_domain(dns_env, matching=True)
        local, proxy, backend = _site(stack, tmp_path, dns_env, ca_file, ejabberd_factory, module_dir,
                                      etc_hosts={name: direct.address[0]},
                                      options={"outgoing_s2s_port": direct.address[1]})
        peer = _peer_server("prosody", prosody_factory, ejabberd_factory, dns_env, ca_file, name, cert, port, local)

        got = deliver_message(peer.account(f"{USER}@{name}", PASSWORD), backend.account(f"{USER}@{local}", PASSWORD),
                              "peer to ejabberd backend", timeout=TIMEOUT)
        assert got.get("from") == f"{USER}@{name}/sender"
        inbound = proxy.log.wait_for(TIMEOUT, event="decision", direction="inbound", domain=name)
        assert (inbound["verdict"], inbound["prooftype"]) == ("accept", "dane-ee"), inbound
        # The key check went out through the module to the proxy, which answered it itself:
        # no verdict on an outbound stream, no connection to the peer.
        answered = proxy.log.wait_for(TIMEOUT, event="dialback-answered-locally", domain=name)
        assert answered["local"] == local, answered
        backend.wait_for_log(rf"Outbound s2s connection started: {re.escape(local)} -> {re.escape(name)}")
        assert proxy.decisions(direction="outbound", domain=name) == []
        assert direct.connections() == 0


# A module of someone else's that makes itself the callback module of outgoing streams first
# (hook sequence 5, before ours at 10), with only default_port/1: xmpp_stream_out's defaults
# would then resolve the peer itself and connect to its address on that port.
OTHER_MODULE = """
-module(mod_other_s2s_callback).
-behaviour(gen_mod).
-export([start/2, stop/1, reload/3, depends/2, mod_opt_type/1, mod_options/1, mod_doc/0]).
-export([s2s_out_init/2, default_port/1]).
start(Host, _Opts) -> ejabberd_hooks:add(s2s_out_init, Host, ?MODULE, s2s_out_init, 5), ok.
stop(Host) -> ejabberd_hooks:delete(s2s_out_init, Host, ?MODULE, s2s_out_init, 5), ok.
reload(_Host, _New, _Old) -> ok.
depends(_Host, _Opts) -> [].
mod_opt_type(port) -> econf:port().
mod_options(_Host) -> [{port, 5269}].
mod_doc() -> #{}.
s2s_out_init({ok, State}, _Opts) -> {ok, State#{mod => ?MODULE}};
s2s_out_init(Acc, _Opts) -> Acc.
default_port(#{server_host := Host}) -> gen_mod:get_module_opt(Host, ?MODULE, port).
"""


@pytest.mark.parametrize("with_dane_module", [False, True], ids=["control", "taken-back"])
def test_a_stream_another_module_took_over_still_goes_to_the_proxy(ejabberd_factory, module_dir, tmp_path, with_dane_module):
    src = tmp_path / "mod_other_s2s_callback.erl"
    src.write_text(OTHER_MODULE)
    result = subprocess.run(["erlc", "-pa", str(next(ejabberd_libs().glob("ejabberd-*/ebin"))), "-o", str(module_dir),
                             str(src)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    peer = Listener(PEER_IP)
    try:
        modules = {"mod_other_s2s_callback": {"port": peer.address[1]}}
        if with_dane_module:
            modules["mod_s2s_dane_proxy"] = {"ip": "127.0.0.1", "port": free_port("127.0.0.1")}
        backend = ejabberd_factory([EjabberdHost("home.test", users={USER: PASSWORD})], mode="backend",
                                   address=BACKEND_IP, etc_hosts={"peer.test": peer.address[0]}, modules=modules,
                                   code_paths=[module_dir])
        bounce = send_for_bounce(backend.account(f"{USER}@home.test", PASSWORD), f"{USER}@peer.test", "taken over",
                                 timeout=0.5 if not with_dane_module else TIMEOUT)
        if not with_dane_module:
            # The control: the other module's stream resolves and connects by itself.
            assert peer.connections(wait=TIMEOUT) >= 1
        else:
            # Our hook replaced the other module's callback module: the stream went to the
            # (dead) proxy address and bounced; the peer's address saw nothing.
            assert bounce is not None and "Connection failed: connection refused" in bounce, bounce
            backend.wait_for_log(r"Outgoing s2s stream: callback module mod_other_s2s_callback replaced by "
                                 r"mod_s2s_dane_proxy")
            assert peer.connections() == 0
    finally:
        peer.close()
