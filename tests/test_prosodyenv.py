"""The Prosody test harness works: real Prosody 0.12 processes on loopback.

* c2s: two users of one server exchange a message (tests/xmppclient.py against Prosody);
* S2S federation between two servers, no proxy: plaintext + dialback (backend mode) and
  STARTTLS + test-PKI certificates + SASL EXTERNAL (peer mode); peers are found through
  Prosody's own resolver (libunbound local data, see prosodyenv.ProsodyDns.routes);
* peer mode through the real test DNS (tests/dnsenv.py: nsd + validating unbound on
  loopback): Prosody's libunbound forwards to it, validates with the test trust anchor, and
  Prosody's own DANE accepts a matching TLSA and refuses a mismatching one;
* backend mode driven by raw XML: a test "peer.test" server authenticates to Prosody with
  Server Dialback (XEP-0220) in both directions, and a rejected key keeps stanzas out.
  Set PROSODYENV_TRANSCRIPTS=DIR to write the exchanges there (they are printed too);
* contrib/prosody/mod_s2s_dane_proxy.lua, once it exists, routes all S2S to a fixed port.
"""
from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

import pytest
import trio

from pki import TestCA
from prosodyenv import (
    ProsodyDns,
    ProsodyError,
    ProsodyServer,
    VirtualHost,
    free_port,
    prosody_factory,  # noqa: F401  (pytest fixture)
)
from xmppclient import (
    NS_DIALBACK,
    NS_SERVER,
    C2SClient,
    Stanza,
    StreamEnd,
    StreamHeader,
    XmlStreamReader,
    XmppError,
    XmppStream,
    deliver_message,
    format_transcript,
    stream_header,
)

PEER = "peer.test"


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); stop() reaps its child, so this means alive.
    return False


def _save_transcript(name: str, entries) -> str:
    text = format_transcript(entries)
    print(f"--- transcript {name}\n{text}")
    directory = os.environ.get("PROSODYENV_TRANSCRIPTS")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / f"{name}.txt").write_text(text + "\n")
    return text


# --- the stream reader (sans-IO) ----------------------------------------------------------


def test_reader_returns_raw_stanzas_split_anywhere():
    data = (
        b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
        b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' id='s1'>"
        b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'/></stream:features> "
        b"<db:result from='a' to='b' type='valid'/>"
        b"<message to='x@b' title='a&gt;b'><body>1 &lt; 2</body></message></stream:stream>"
    )
    for step in (1, 3, len(data)):
        reader, events = XmlStreamReader(), []
        for i in range(0, len(data), step):
            events += reader.feed(data[i:i + step])
        assert [type(e) for e in events] == [StreamHeader, Stanza, Stanza, Stanza, StreamEnd]
        header, features, result, message, _ = events
        assert header.get("id") == "s1"
        assert features.raw == b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'/></stream:features>"
        assert result.raw == b"<db:result from='a' to='b' type='valid'/>"
        assert result.tag == f"{{{NS_DIALBACK}}}result" and result.get("type") == "valid"
        assert message.raw == b"<message to='x@b' title='a&gt;b'><body>1 &lt; 2</body></message>"
        assert message.ns == NS_SERVER and message.body == "1 < 2"


def test_reader_rejects_garbage():
    reader = XmlStreamReader()
    reader.feed(b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
    with pytest.raises(XmppError, match="not well-formed"):
        reader.feed(b"<message><</message>")


# --- harness lifecycle --------------------------------------------------------------------


def test_server_starts_fast_and_leaves_nothing_behind():
    server = ProsodyServer(["a.test"], users={"alice": "pw"})
    with server:
        pid, workdir = server.pid, server.workdir
        assert server.running
        # Measured on the 2-core dev machine: ~0.04 s; generous for loaded CI.
        assert server.startup_seconds < 5, server.startup_seconds
        socket.create_connection(server.c2s_addr, timeout=2).close()
        socket.create_connection(server.s2s_addr, timeout=2).close()
        server.wait_for_log("Activated service 'c2s'")  # logged just after the port is bound
        config = server.config_path.read_text()
        assert "s2s_require_encryption = false" in config and "s2s_secure_auth = false" in config
    assert _gone(pid)
    assert not workdir.exists()
    with pytest.raises(OSError):
        socket.create_connection(server.c2s_addr, timeout=2).close()


def test_startup_failure_is_reported_and_cleaned_up(tmp_path):
    server = ProsodyServer(["a.test"], extra_config="this is not lua", workdir=tmp_path / "p")
    with pytest.raises(ProsodyError, match="exited with status") as info:
        server.start()
    # Prosody's own complaint (printed on stdout) is in the message, with the line number.
    assert "prosody.cfg.lua:" in str(info.value) and "syntax error near 'is'" in str(info.value)
    assert server.process is None


def test_process_group_is_killed_when_test_body_fails(tmp_path):
    server = ProsodyServer(["a.test"], workdir=tmp_path / "p")
    with pytest.raises(RuntimeError, match="boom"):
        with server:
            pid = server.pid
            raise RuntimeError("boom")
    assert _gone(pid)


def test_peer_mode_config_carries_resolver_trust_anchor_and_dane(tmp_path):
    ca = TestCA()
    issued = ca.issue(["a.test"])
    anchor = tmp_path / "root.ds"
    anchor.write_text(". IN DS 12345 13 2 " + "00" * 32 + "\n")
    server = ProsodyServer(
        [VirtualHost("a.test", cert=issued)],
        mode="peer",
        ca_file=ca.write_root(tmp_path / "ca.pem"),
        use_dane=True,
        dns=ProsodyDns(forward="127.0.0.1@5353", trust_anchor_file=anchor, local_zone="test. transparent"),
        modules=["s2s_dane_proxy"],
        plugin_paths=[tmp_path / "plugins"],
        extra_config='s2s_dane_proxy = "127.0.0.1:15269"',
        workdir=tmp_path / "p",
    )
    text = server.config_text()
    for line in (
        "s2s_require_encryption = true",
        "s2s_secure_auth = true",
        "use_dane = true",
        f'ssl = {{ cafile = "{tmp_path / "ca.pem"}" }}',
        'forward = "127.0.0.1@5353";',
        f'trustfile = "{anchor}";',
        '["local-zone:"] = "test. transparent";',
        '"tls"',
        '"s2s_dane_proxy" }',
        f'plugin_paths = {{ "{tmp_path / "plugins"}" }}',
        's2s_dane_proxy = "127.0.0.1:15269"',
    ):
        assert line in text, line
    server.write_config()
    assert (tmp_path / "p" / "certs" / "a.test.crt").read_bytes() == issued.chain_pem()
    assert (tmp_path / "p" / "certs" / "a.test.key").read_bytes() == issued.key_pem()


# --- c2s ----------------------------------------------------------------------------------


def test_two_users_on_one_server_exchange_a_message(prosody_factory):
    server = prosody_factory(["a.test"], users={"alice": "pw-a", "bob": "pw-b"})

    async def main():
        alice = await C2SClient.login(*server.c2s_addr, "alice@a.test", "pw-a")
        bob = await C2SClient.login(*server.c2s_addr, "bob@a.test", "pw-b", resource="phone")
        assert bob.jid == "bob@a.test/phone"
        await alice.send_presence()
        await bob.send_presence()
        await alice.send_message("bob@a.test", "hello <bob> & co")
        got = await bob.wait_for_message("hello <bob> & co", sender="alice@a.test", timeout=5)
        assert got.get("from") == alice.jid
        assert b"hello &lt;bob&gt; &amp; co" in got.raw
        await alice.aclose()
        await bob.aclose()

    trio.run(main)


def test_wrong_password_is_refused(prosody_factory):
    server = prosody_factory(["a.test"], users={"alice": "right"})

    async def main():
        with pytest.raises(XmppError, match="SASL PLAIN as alice@a.test failed.*not-authorized"):
            await C2SClient.login(*server.c2s_addr, "alice@a.test", "wrong")

    trio.run(main)


# --- S2S federation, no proxy -------------------------------------------------------------


async def _exchange(a: ProsodyServer, b: ProsodyServer) -> None:
    ua = await C2SClient.login(*a.c2s_addr, "u@a.test", "pw")
    ub = await C2SClient.login(*b.c2s_addr, "u@b.test", "pw")
    await ua.send_presence()
    await ub.send_presence()
    await ua.send_message("u@b.test", "a to b")
    assert (await ub.wait_for_message("a to b", sender="u@a.test")).get("from") == "u@a.test/test"
    await ub.send_message("u@a.test", "b to a")
    assert (await ua.wait_for_message("b to a", sender="u@b.test")).get("from") == "u@b.test/test"
    await ua.aclose()
    await ub.aclose()


def test_federation_plaintext_dialback(prosody_factory):
    port_a, port_b = free_port(), free_port()
    a = prosody_factory([VirtualHost("a.test", users={"u": "pw"})], s2s_port=port_a,
                        dns=ProsodyDns.routes({"b.test": ("127.0.0.1", port_b)}))
    b = prosody_factory([VirtualHost("b.test", users={"u": "pw"})], s2s_port=port_b,
                        dns=ProsodyDns.routes({"a.test": ("127.0.0.1", port_a)}))
    got = deliver_message(a.account("u@a.test", "pw"), b.account("u@b.test", "pw"), "sync helper")
    assert got.get("from") == "u@a.test/sender" and got.body == "sync helper"
    trio.run(_exchange, a, b)
    # Found through Prosody's own SRV lookup, authenticated by dialback, never encrypted.
    assert "Results for _xmpp-server._tcp.b.test IN SRV: 1 items" in a.log_text()
    assert "verified dialback key... it is valid" in a.log_text()
    assert "Outgoing s2s connection a.test->b.test complete" in a.log_text()
    assert "Stream encrypted" not in a.log_text() + b.log_text()


def test_federation_starttls_with_test_pki(prosody_factory, tmp_path):
    ca = TestCA()
    ca_file = ca.write_root(tmp_path / "ca.pem")
    port_a, port_b = free_port("127.0.0.2"), free_port("127.0.0.3")
    hosts = {d: VirtualHost(d, cert=ca.intermediate().issue([d], xmpp=[d]), users={"u": "pw"}) for d in ("a.test", "b.test")}
    a = prosody_factory([hosts["a.test"]], mode="peer", address="127.0.0.2", s2s_port=port_a, ca_file=ca_file,
                        dns=ProsodyDns.routes({"b.test": ("127.0.0.3", port_b)}))
    b = prosody_factory([hosts["b.test"]], mode="peer", address="127.0.0.3", s2s_port=port_b, ca_file=ca_file,
                        dns=ProsodyDns.routes({"a.test": ("127.0.0.2", port_a)}))
    trio.run(_exchange, a, b)
    log_a = a.log_text()
    assert "Stream encrypted (TLSv1.3" in log_a
    assert "certificate chain validation result: valid" in log_a
    assert "SASL EXTERNAL with b.test succeeded" in log_a
    assert "verified dialback key" not in log_a + b.log_text()  # certificates, not dialback


def test_peer_mode_refuses_untrusted_certificate(prosody_factory, tmp_path):
    trusted, other = TestCA("Trusted"), TestCA("Other")
    ca_file = trusted.write_root(tmp_path / "ca.pem")
    port_a, port_b = free_port(), free_port()
    a = prosody_factory([VirtualHost("a.test", cert=trusted.issue(["a.test"]), users={"u": "pw"})],
                        mode="peer", s2s_port=port_a, ca_file=ca_file,
                        dns=ProsodyDns.routes({"b.test": ("127.0.0.1", port_b)}))
    b = prosody_factory([VirtualHost("b.test", cert=other.issue(["b.test"]), users={"u": "pw"})],
                    mode="peer", s2s_port=port_b, ca_file=ca_file,
                    dns=ProsodyDns.routes({"a.test": ("127.0.0.1", port_a)}))

    with pytest.raises(XmppError, match="u@a.test to u@b.test bounced.*certificate is not trusted"):
        deliver_message(a.account("u@a.test", "pw"), b.account("u@b.test", "pw"), "must not arrive")
    assert "certificate chain validation result: invalid" in a.log_text()


# --- the outbound routing module (contrib/prosody), once it exists ------------------------

CONTRIB_PROSODY = Path(__file__).resolve().parent.parent / "contrib" / "prosody"


@pytest.mark.skipif(not (CONTRIB_PROSODY / "mod_s2s_dane_proxy.lua").exists(),
                    reason="contrib/prosody/mod_s2s_dane_proxy.lua not written yet")
def test_routing_module_sends_all_s2s_to_fixed_port(prosody_factory):
    # Each server's module points at the other's S2S port; no DNS data exists for
    # either domain, so delivery proves the module replaced resolution.
    port_a, port_b = free_port(), free_port()

    def via(port: int) -> dict:
        return dict(modules=["s2s_dane_proxy"], plugin_paths=[CONTRIB_PROSODY],
                    extra_config=f's2s_dane_proxy = "127.0.0.1:{port}"')

    a = prosody_factory([VirtualHost("a.example", users={"u": "pw"})], s2s_port=port_a, **via(port_b))
    b = prosody_factory([VirtualHost("b.example", users={"u": "pw"})], s2s_port=port_b, **via(port_a))
    deliver_message(a.account("u@a.example", "pw"), b.account("u@b.example", "pw"), "routed")
    deliver_message(b.account("u@b.example", "pw"), a.account("u@a.example", "pw"), "routed back")
    assert "_xmpp-server._tcp.b.example" not in a.log_text()


# --- peer mode with Prosody's own DANE, through the test DNS (tests/dnsenv.py) -------------


def _dane_pair(prosody_factory, dns_env, tmp_path, *, publish_wrong_tlsa_for_b: bool):
    """a.<zone> and b.<zone>, found via secure SRV/A/TLSA from the validating unbound."""
    ca = TestCA()
    ca_file = ca.write_root(tmp_path / "ca.pem")
    zone = dns_env.secure
    dom_a, dom_b = dns_env.fresh(zone, "a"), dns_env.fresh(zone, "b")
    cert_a, cert_b = ca.issue([dom_a]), ca.issue([dom_b])
    port_a, port_b = free_port("127.0.0.2"), free_port("127.0.0.3")
    with dns_env.batch():
        dns_env.publish_xmpp(dom_a, f"xmpp.{dom_a}", port_a, "127.0.0.2", cert_a.cert)
        # "3 1 1" of another key: PKIX-valid but not what DNSSEC says b must present.
        tlsa_cert = ca.issue([dom_b]).cert if publish_wrong_tlsa_for_b else cert_b.cert
        dns_env.publish_xmpp(dom_b, f"xmpp.{dom_b}", port_b, "127.0.0.3", tlsa_cert)
    dns = ProsodyDns.validating(dns_env.resolver_address, dns_env.trust_anchor_text)
    common = dict(mode="peer", ca_file=ca_file, use_dane=True, dns=dns)
    a = prosody_factory([VirtualHost(dom_a, cert=cert_a, users={"u": "pw"})], address="127.0.0.2", s2s_port=port_a, **common)
    b = prosody_factory([VirtualHost(dom_b, cert=cert_b, users={"u": "pw"})], address="127.0.0.3", s2s_port=port_b, **common)
    return a, b, dom_a, dom_b


def test_peer_resolves_through_validating_resolver_and_uses_dane(prosody_factory, dns_env, tmp_path):
    a, b, dom_a, dom_b = _dane_pair(prosody_factory, dns_env, tmp_path, publish_wrong_tlsa_for_b=False)

    async def main():
        ua = await C2SClient.login(*a.c2s_addr, f"u@{dom_a}", "pw")
        ub = await C2SClient.login(*b.c2s_addr, f"u@{dom_b}", "pw")
        await ua.send_presence()
        await ub.send_presence()
        await ua.send_message(f"u@{dom_b}", "over dane")
        await ub.wait_for_message("over dane", sender=f"u@{dom_a}")
        await ua.aclose()
        await ub.aclose()

    trio.run(main)
    log = a.log_text()
    # forward= reached unbound on its non-53 port, trustfile= made the answers secure
    # (libunbound validated them itself), local-zone made test. resolvable at all.
    assert f"Results for _xmpp-server._tcp.{dom_b} IN SRV: 1 items (Secure" in log
    assert f"IN TLSA: 1 items (Secure" in log
    assert "Enabling DANE with 1 TLSA records" in log
    assert "certificate chain validation result: valid" in log


def test_peer_with_dane_refuses_certificate_not_matching_tlsa(prosody_factory, dns_env, tmp_path):
    a, _, dom_a, dom_b = _dane_pair(prosody_factory, dns_env, tmp_path, publish_wrong_tlsa_for_b=True)

    async def main():
        ua = await C2SClient.login(*a.c2s_addr, f"u@{dom_a}", "pw")
        await ua.send_presence()
        await ua.send_message(f"u@{dom_b}", "must not arrive")
        with pytest.raises(XmppError, match="message bounced"):
            await ua.wait_for_message(sender=f"u@{dom_b}")
        await ua.aclose()

    trio.run(main)
    # The certificate chains to the trusted CA: only DANE can have refused it.
    assert "no matching DANE TLSA records" in a.log_text()


# --- backend mode driven by raw XML: Server Dialback transcripts --------------------------


class FakePeer:
    """peer.test as a raw-XML S2S server: originating, receiving and authoritative roles.

    Listens on a loopback socket that Prosody's resolver maps peer.test to; answers
    Prosody's db:verify for the key it sent (`valid_keys`), verifies Prosody's own
    db:result by asking Prosody back (as XEP-0220 §2.3 describes), and queues every other
    stanza received from Prosody in `received`.
    """

    def __init__(self, transcript: list) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.transcript = transcript
        self.valid_keys: set[str] = set()
        self.send_received, self.received = trio.open_memory_channel(100)
        self.prosody: ProsodyServer | None = None

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self.sock))
        await trio.serve_listeners(self._handle, [listener], task_status=task_status)

    async def _handle(self, stream) -> None:
        xs = XmppStream(stream, label="prosody->peer", transcript=self.transcript)
        header = await xs.expect_header()
        stream_id = "peer-" + secrets.token_hex(4)
        await xs.send(stream_header(ns=NS_SERVER, dialback=True, from_=PEER, to=header.get("from"), id=stream_id))
        await xs.send("<stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback></stream:features>")
        try:
            await self._dispatch(xs, stream_id)
        finally:
            await xs.aclose(close_stream=False)  # also when the test cancels us

    async def _dispatch(self, xs: XmppStream, stream_id: str) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stanza = await xs.expect_stanza(timeout=30)
                except XmppError:
                    break
                if stanza.tag == f"{{{NS_DIALBACK}}}verify":
                    ok = stanza.element.text in self.valid_keys
                    await xs.send(
                        f"<db:verify from='{PEER}' to='{stanza.get('from')}' id='{stanza.get('id')}' "
                        f"type='{'valid' if ok else 'invalid'}'/>"
                    )
                elif stanza.tag == f"{{{NS_DIALBACK}}}result":
                    # Verify in the background: Prosody holds its db:verify for our key until
                    # this very check is done, so answering inline would deadlock.
                    nursery.start_soon(self._verify_prosody_key, xs, stanza, stream_id)
                else:
                    await self.send_received.send(stanza)
            nursery.cancel_scope.cancel()

    async def _verify_prosody_key(self, xs: XmppStream, result: Stanza, stream_id: str) -> None:
        domain = result.get("from")
        check = await XmppStream.connect(*self.prosody.s2s_addr, label="peer->prosody(verify)", transcript=self.transcript)
        await check.send(stream_header(ns=NS_SERVER, dialback=True, from_=PEER, to=domain))
        await check.expect_header()
        await check.expect_stanza()  # features
        await check.send(
            f"<db:verify xmlns:db='{NS_DIALBACK}' from='{PEER}' to='{domain}' id='{stream_id}'>{result.element.text}</db:verify>"
        )
        answer = await check.expect_stanza()
        await check.aclose()
        await xs.send(f"<db:result from='{PEER}' to='{domain}' type='{answer.get('type')}'/>")


def _backend_with_peer(prosody_factory, transcript) -> tuple[ProsodyServer, FakePeer]:
    peer = FakePeer(transcript)
    server = prosody_factory(["b.test"], mode="backend", users={"alice": "pw"},
                             dns=ProsodyDns.routes({PEER: ("127.0.0.1", peer.port)}))
    peer.prosody = server
    return server, peer


async def _open_dialback_stream(server: ProsodyServer, transcript, key: str):
    out = await XmppStream.connect(*server.s2s_addr, label="peer->prosody", transcript=transcript)
    await out.send(stream_header(ns=NS_SERVER, dialback=True, from_=PEER, to="b.test"))
    header = await out.expect_header()
    features = await out.expect_stanza()
    await out.send(f"<db:result from='{PEER}' to='b.test'>{key}</db:result>")
    return out, header, features


def test_backend_accepts_plaintext_dialback_both_ways(prosody_factory):
    transcript: list = []
    server, peer = _backend_with_peer(prosody_factory, transcript)
    key = secrets.token_hex(16)
    peer.valid_keys.add(key)

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(peer.serve)
            alice = await C2SClient.login(*server.c2s_addr, "alice@b.test", "pw")
            await alice.send_presence()
            out, header, features = await _open_dialback_stream(server, transcript, key)
            # Plaintext backend: dialback offered, no STARTTLS, no SASL.
            assert header.get("id") and header.get("from") == "b.test"
            assert features.element.find("{urn:xmpp:features:dialback}dialback") is not None
            assert b"starttls" not in features.raw and b"mechanisms" not in features.raw
            result = await out.expect_stanza(timeout=10)
            assert result.tag == f"{{{NS_DIALBACK}}}result"
            assert (result.get("type"), result.get("from"), result.get("to")) == ("valid", "b.test", PEER)
            await out.send(f"<message from='bob@{PEER}/x' to='alice@b.test' type='chat' id='in1'><body>peer to alice</body></message>")
            got = await alice.wait_for_message("peer to alice", sender=f"bob@{PEER}")
            assert got.get("from") == f"bob@{PEER}/x"
            # The other direction: Prosody dials peer.test, authenticates by dialback.
            await alice.send_message(f"bob@{PEER}", "alice to peer")
            with trio.fail_after(10):
                reply = await peer.received.receive()
            assert reply.name == "message" and reply.body == "alice to peer"
            await out.aclose()
            await alice.aclose()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        _save_transcript("dialback-valid", transcript)
    # Prosody asked us (peer.test's authoritative server) about our key on its own
    # outgoing stream, and we asked it about its key on a separate verify stream.
    received = [(label, raw) for label, d, raw in transcript if d == "<"]
    assert any(label == "prosody->peer" and raw.startswith(b"<db:verify") and key.encode() in raw for label, raw in received)
    assert any(label == "peer->prosody(verify)" and b"type='valid'" in raw for label, raw in received)
    assert "verified dialback key... it is valid" in server.log_text()


def test_backend_drops_stanzas_after_invalid_dialback(prosody_factory):
    transcript: list = []
    server, peer = _backend_with_peer(prosody_factory, transcript)  # no valid key: all invalid

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(peer.serve)
            alice = await C2SClient.login(*server.c2s_addr, "alice@b.test", "pw")
            await alice.send_presence()
            out, _, _ = await _open_dialback_stream(server, transcript, "forged-key")
            result = await out.expect_stanza(timeout=10)
            assert (result.tag, result.get("type")) == (f"{{{NS_DIALBACK}}}result", "invalid")
            await out.send(f"<message from='bob@{PEER}' to='alice@b.test' type='chat'><body>forged</body></message>")
            # Prosody drops it silently (no error, stream stays open); its log says so.
            await trio.to_thread.run_sync(server.wait_for_log, r"Unhandled s2sin_unauthed stanza: message")
            await alice.send_message("alice@b.test", "sentinel")
            got = await alice.wait_for_message(timeout=5)
            assert got.body == "sentinel"  # the forged message never arrived before it
            await out.aclose()
            await alice.aclose()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        _save_transcript("dialback-invalid", transcript)
