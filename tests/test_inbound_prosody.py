"""The inbound proxy end to end, with real Prosody servers on both sides and real DNSSEC.

    peer Prosody (mode "peer": STARTTLS required, certificates checked)
        | finds the backend's domain B through the validating test resolver:
        | SRV _xmpp-server._tcp.B -> the proxy's listen address
        v
    proxy (proxy.server.serve, in-process, config file from proxyenv.write_config)
        | decides per asserted domain with DNS evidence from the same resolver
        v
    RecordingRelay (records every byte the backend is sent)
        v
    backend Prosody (mode "backend": plaintext S2S, dialback, s2s_secure_auth = false)

The peer's own domain P has SRV/A/TLSA in the signed zone secure.test, so the proxy's
evidence for P is secure; its TLSA matches, mismatches, is bogus (broken RRSIG), or P's
policy file says `block`.  A user on the peer sends a message to a user on the backend; it
arrives exactly when the proxy's verdict is accept.  For a rejected domain the relay proves
the backend was sent the stream header and nothing else: no `<db:result>`, no stanza.

The backend verifies the peer's dialback key the usual way, by connecting to P's server
(found through the same DNS) -- directly, not through the proxy's outbound side, which these
tests do not cover.  The backend has a certificate so that this verification connection can
do the STARTTLS the peer requires; the proxy strips the `<starttls/>` it offers on its
plaintext port.

Piggybacking (several asserted domains on one stream, XEP-0220 §2.5 / RFC 6120 §5.4.3.3):
Prosody 0.12 opens one outgoing stream per (local host, remote host) pair and never
multiplexes several of its VirtualHosts over one stream (`hosts[from].s2sout[to]` in
mod_s2s), so a raw TLS client (proxy/tls.py, client side, one certificate naming all the
domains) drives that case against the real backend, with a small raw-XML server in the
peer domains' other dialback roles answering the backend's `<db:verify>`.  A peer Prosody
with two VirtualHosts is tested too: two streams, each domain judged on its own.
"""
from __future__ import annotations

import re
import secrets
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from dnsenv import tlsa_text
from pki import Issued, TestCA, self_signed
from prosodyenv import ProsodyDns, ProsodyServer, VirtualHost, free_port
from proxy.tls import TlsStream, client_context
from proxyenv import ProxyProcess, RecordingRelay, RunningProxy, write_config, write_policies
from xmppclient import (
    NS_DIALBACK, NS_SERVER, NS_STREAM, NS_TLS, C2SClient, Stanza, XmlStreamReader, XmppError, XmppStream,
    deliver_message, format_transcript, stream_header,
)

# Each role on its own loopback address, so addresses in logs and relays say who is who.
PROXY_IP = "127.0.0.10"
PEER_IP = "127.0.0.11"
BACKEND_IP = "127.0.0.12"
AUTHORITATIVE_IP = "127.0.0.13"

TIMEOUT = 10.0
USER, PASSWORD = "u", "pw"


# ------------------------------------------------------------------------------ PKI

@dataclass
class Pki:
    ca: TestCA                  # trusted by the proxy (ca_file) and by the peer Prosody
    ca_file: Path
    other_ca: TestCA            # trusted by nobody: a DANE-TA anchor published in DNS only


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = TestCA("Inbound Test Root")
    return Pki(ca=ca, ca_file=ca.write_root(d / "root.pem"), other_ca=TestCA("DANE-TA Only Root"))


# ------------------------------------------------------------------------------ the local site

@dataclass
class Site:
    """The backend's side: Prosody serving `domain`, the recording relay, the proxy."""

    domain: str
    backend: ProsodyServer
    relay: RecordingRelay
    proxy: RunningProxy | ProxyProcess

    def account(self, user: str = USER):
        return self.backend.account(f"{user}@{self.domain}", PASSWORD)

    def streams_from(self, peer_domain: str) -> list:
        """Relayed connections whose stream header (relayed first) comes from `peer_domain`."""
        return [c for c in self.relay.snapshot() if _header_from(bytes(c.upstream)) == peer_domain]


def _header_from(data: bytes) -> str | None:
    m = re.match(rb"<\?xml[^>]*\?>\s*<stream:stream\b[^>]*?\sfrom=['\"]([^'\"]+)['\"]", data)
    return m.group(1).decode() if m else None


# What a backend may see of a rejected peer: the relayed stream header (DESIGN §3.1 step 3:
# its stream id must reach the peer), the peer's own stream error when it gives up (the proxy
# relays `<stream:error>` so the backend logs why the stream ended), and the closing tag.
HEADER_ONLY = re.compile(
    rb"<\?xml version=['\"]1.0['\"]\?><stream:stream\b[^>]*>"
    rb"(<stream:error>(?:(?!<db:|<message|<presence|<iq).)*</stream:error>)?(</stream:stream>)?", re.DOTALL)


def elements(data: bytes) -> list[Stanza]:
    """The top-level elements in one direction of a relayed stream (attribute order, quoting
    and prefixes as Prosody happened to write them do not matter)."""
    reader = XmlStreamReader()
    return [e for e in reader.feed(bytes(data)) if isinstance(e, Stanza)]


def is_dialback_result(e: Stanza, sender: str, target: str, type_: str | None = None) -> bool:
    return (e.tag == f"{{{NS_DIALBACK}}}result" and e.get("from") == sender and e.get("to") == target
            and e.get("type") == type_)


def validating_dns(dns_env) -> ProsodyDns:
    return ProsodyDns.validating(dns_env.resolver_address, dns_env.trust_anchor_text)


def start_site(stack: ExitStack, prosody_factory, dns_env, tmp_path: Path, pki: Pki, *,
               policies: dict, in_process: bool = True) -> Site:
    """Backend Prosody + relay + proxy for a fresh domain B in secure.test, B's SRV/A pointing
    at the proxy.  `policies`: policy.d files for peer domains (written before the proxy starts)."""
    domain = dns_env.fresh(dns_env.secure, "b")
    cert = pki.ca.issue([domain], xmpp=[domain])
    cert_path, key_path = cert.write(tmp_path / "proxy", domain)
    backend = prosody_factory([VirtualHost(domain, cert=cert, users={USER: PASSWORD})], mode="backend",
                              address=BACKEND_IP, dns=validating_dns(dns_env))
    relay = stack.enter_context(RecordingRelay(backend.s2s_addr))
    config = write_config(
        tmp_path / "proxy" / "config.toml",
        listen=[f"{PROXY_IP}:0"], backend=relay.hostport, domains=[(domain, cert_path, key_path)],
        nameservers=[dns_env.resolver_address], policy_dir=write_policies(tmp_path / "policy.d", policies),
        ca_file=pki.ca_file)
    proxy = stack.enter_context(RunningProxy(config) if in_process else ProxyProcess(config))
    host, port = proxy.inbound
    assert host == PROXY_IP
    # No TLSA for B: the peer authenticates the proxy by PKIX (test CA), as most peers would.
    dns_env.publish_xmpp(domain, f"xmpp.{domain}", port, PROXY_IP, None)
    return Site(domain, backend, relay, proxy)


# ------------------------------------------------------------------------------ the peer

@dataclass
class PeerDomain:
    """A peer domain: its certificate and what DNS publishes for it."""

    name: str
    cert: Issued
    tlsa_cert: object | None      # certificate (or CA) the TLSA record is computed from
    usage: str = "3 1 1"
    broken_signature: bool = False


def publish_peer(dns_env, peer: PeerDomain, ip: str, port: int) -> None:
    """SRV/A for the peer domain and TLSA at `_PORT._tcp.xmpp.P` (RFC 7673: at the SRV target)."""
    target = f"xmpp.{peer.name}"
    with dns_env.batch():
        dns_env.publish_xmpp(peer.name, target, port, ip, None)
        if peer.tlsa_cert is not None:
            record = tlsa_text(peer.tlsa_cert, *(int(x) for x in peer.usage.split()))
            dns_env.publish(None, f"_{port}._tcp.{target}", "TLSA", record,
                            broken_signature=peer.broken_signature)


def start_peer(prosody_factory, dns_env, pki: Pki, *peers: PeerDomain) -> ProsodyServer:
    """A peer Prosody (STARTTLS required, certificates verified) serving `peers`."""
    port = free_port(PEER_IP)
    for peer in peers:
        publish_peer(dns_env, peer, PEER_IP, port)
    return prosody_factory(
        [VirtualHost(p.name, cert=p.cert, users={USER: PASSWORD}) for p in peers],
        mode="peer", address=PEER_IP, s2s_port=port, ca_file=pki.ca_file, dns=validating_dns(dns_env))


# ------------------------------------------------------------------------------ assertions

def assert_backend_saw_only_the_header(site: Site, peer_domain: str) -> None:
    """Every relayed connection of `peer_domain` carried the stream header and nothing else
    of substance (see HEADER_ONLY): no dialback, no stanza reached the backend."""
    # Wait until the proxy has closed them: only then is "nothing else" final.
    conns = site.relay.wait_for(
        lambda cs: (mine := [c for c in cs if _header_from(bytes(c.upstream)) == peer_domain])
        and all(c.closed for c in mine) and mine,
        TIMEOUT, f"closed relayed streams from {peer_domain}")
    for conn in conns:
        data = bytes(conn.upstream)
        assert HEADER_ONLY.fullmatch(data), f"backend was sent more than the stream header: {data!r}"
        assert b"db:result" not in data and b"<message" not in data
    # And the backend itself never started verifying a key for the peer domain (Prosody logs
    # this for every <db:result> it receives, whatever the connection).
    assert f"asking {peer_domain} if key" not in site.backend.log_text()


def delivered(peer: ProsodyServer, peer_domain: str, site: Site, body: str):
    return deliver_message(peer.account(f"{USER}@{peer_domain}", PASSWORD), site.account(), body, timeout=TIMEOUT)


def bounced(peer: ProsodyServer, peer_domain: str, site: Site, body: str) -> str:
    with pytest.raises(XmppError, match="bounced") as info:
        delivered(peer, peer_domain, site, body)
    return str(info.value)


# ------------------------------------------------------------------------------ accepted

@pytest.mark.parametrize("runner", ["in-process", "process"])
def test_dane_ee_peer_message_reaches_backend(prosody_factory, dns_env, tmp_path, pki, runner):
    name = dns_env.fresh(dns_env.secure, "p")
    cert = self_signed([name])          # no CA at all: only DANE-EE can authenticate it
    with ExitStack() as stack:
        site = start_site(stack, prosody_factory, dns_env, tmp_path, pki, policies={name: {"require": "dane"}},
                          in_process=runner == "in-process")
        peer = start_peer(prosody_factory, dns_env, pki, PeerDomain(name, cert, cert.cert, "3 1 1"))

        got = delivered(peer, name, site, "hello through the proxy")
        assert got.get("from") == f"{USER}@{name}/sender"

        decision = site.proxy.wait_for_decision(name)
        assert decision["verdict"] == "accept", decision
        assert decision["direction"] == "inbound" and decision["prooftype"] == "dane-ee"
        assert decision["record"].startswith("3 1 1 "), decision
        # Prosody does not bind its outgoing connections to `interfaces`: any loopback source.
        assert re.fullmatch(r"127\.\d+\.\d+\.\d+:\d+", decision["peer"]), decision
        # The backend ran dialback for P as usual and got the message over the relay.
        (conn,) = site.streams_from(name)
        sent, answered = elements(conn.upstream), elements(conn.downstream)
        assert any(is_dialback_result(e, name, site.domain) for e in sent), sent
        assert any(e.name == "message" and e.body == "hello through the proxy" for e in sent), sent
        assert any(is_dialback_result(e, site.domain, name, "valid") for e in answered), answered
        # The peer authenticated the proxy's certificate for B by PKIX (the test CA).
        assert "certificate chain validation result: valid" in peer.log_text()


def test_dane_ta_peer_message_reaches_backend(prosody_factory, dns_env, tmp_path, pki):
    name = dns_env.fresh(dns_env.secure, "p")
    issuer = pki.other_ca.intermediate("Peer's own sub-CA")   # not in the proxy's trust store
    cert = issuer.issue([name])
    with ExitStack() as stack:
        site = start_site(stack, prosody_factory, dns_env, tmp_path, pki, policies={name: {"require": "dane"}})
        # "2 0 1": SHA-256 of the intermediate, which the peer sends in its chain.
        peer = start_peer(prosody_factory, dns_env, pki, PeerDomain(name, cert, issuer.cert, "2 0 1"))

        delivered(peer, name, site, "anchored by DANE-TA")

        decision = site.proxy.wait_for_decision(name)
        assert (decision["verdict"], decision["prooftype"]) == ("accept", "dane-ta"), decision
        assert decision["record"].startswith("2 0 1 "), decision
        assert name in decision["reason"], decision


# ------------------------------------------------------------------------------ rejected

def _rejected_case(prosody_factory, dns_env, tmp_path, pki, *, policy: dict,
                   peer_for) -> tuple[Site, str, dict, str]:
    """A peer Prosody whose domain the proxy must reject; returns (site, peer domain, the
    decision record, the bounce the sender got), after the common assertions."""
    name = dns_env.fresh(dns_env.secure, "p")
    stack = ExitStack()
    site = start_site(stack, prosody_factory, dns_env, tmp_path, pki, policies={name: policy} if policy else {})
    try:
        peer = start_peer(prosody_factory, dns_env, pki, peer_for(name))
        bounce = bounced(peer, name, site, "must not arrive")
        decision = site.proxy.wait_for_decision(name)
        assert decision["verdict"] == "reject", decision
        assert decision["prooftype"] == "-" and decision["record"] == "-", decision
        assert_backend_saw_only_the_header(site, name)
        # The peer was answered with a dialback error (XEP-0220 §2.4) and gave up the stream.
        log = peer.log_text()
        assert re.search(r"Received\[s2sout_unauthed\]: <result (?=[^>]*type='error')(?=[^>]*from='"
                         + re.escape(site.domain) + "')", log), log
        assert f"Outgoing s2s stream {name}->{site.domain} closed: dialback authentication failed" in log
        return site, name, decision, bounce
    finally:
        stack.close()


def test_tlsa_mismatch_is_rejected_without_pkix_fallback(prosody_factory, dns_env, tmp_path, pki):
    # The certificate is PKIX-valid (test CA, names P), but the secure TLSA names another key:
    # with the default policy (dane-or-pkix) DANE alone decides (DESIGN §2.2).
    def peer_for(name):
        return PeerDomain(name, pki.ca.issue([name]), self_signed([name]).cert, "3 1 1")

    _, _, decision, _ = _rejected_case(prosody_factory, dns_env, tmp_path, pki, policy={}, peer_for=peer_for)
    assert "no usable TLSA record matches" in decision["reason"], decision
    assert "no fallback to PKIX" in decision["reason"], decision


def test_bogus_tlsa_is_rejected(prosody_factory, dns_env, tmp_path, pki):
    # The TLSA would match, but its RRSIG is broken: the resolver answers SERVFAIL (bogus).
    def peer_for(name):
        cert = pki.ca.issue([name])
        return PeerDomain(name, cert, cert.cert, "3 1 1", broken_signature=True)

    _, name, decision, _ = _rejected_case(prosody_factory, dns_env, tmp_path, pki, policy={}, peer_for=peer_for)
    assert "DNSSEC evidence failed" in decision["reason"] and "bogus" in decision["reason"], decision
    assert "failing closed" in decision["reason"], decision


def test_blocked_domain_is_rejected(prosody_factory, dns_env, tmp_path, pki):
    # Everything would authenticate (matching secure TLSA, PKIX-valid certificate): policy says no.
    def peer_for(name):
        cert = pki.ca.issue([name])
        return PeerDomain(name, cert, cert.cert, "3 1 1")

    _, name, decision, _ = _rejected_case(prosody_factory, dns_env, tmp_path, pki,
                                          policy={"require": "block"}, peer_for=peer_for)
    assert decision["reason"].startswith(f"{name} is blocked by policy"), decision


# What DESIGN §3.1 step 3 promises: "the stream header is the one thing a backend sees of a
# peer that is rejected later" (plus, at most, the proxy's own closing tag).
STRICTLY_HEADER_ONLY = re.compile(rb"<\?xml version=['\"]1.0['\"]\?><stream:stream\b[^>]*>(</stream:stream>)?")


def test_rejected_peer_backend_sees_nothing_but_the_header(prosody_factory, dns_env, tmp_path, pki):
    def peer_for(name):
        cert = pki.ca.issue([name])
        return PeerDomain(name, cert, cert.cert, "3 1 1")

    site, name, _, _ = _rejected_case(prosody_factory, dns_env, tmp_path, pki,
                                      policy={"require": "block"}, peer_for=peer_for)
    for conn in site.streams_from(name):
        assert STRICTLY_HEADER_ONLY.fullmatch(bytes(conn.upstream)), bytes(conn.upstream)


# ------------------------------------------------------------------------------ two domains

def test_prosody_with_two_hosts_each_judged_alone(prosody_factory, dns_env, tmp_path, pki):
    good, blocked = dns_env.fresh(dns_env.secure, "p"), dns_env.fresh(dns_env.secure, "p")
    cert_good, cert_blocked = self_signed([good]), pki.ca.issue([blocked])
    with ExitStack() as stack:
        site = start_site(stack, prosody_factory, dns_env, tmp_path, pki,
                          policies={good: {"require": "dane"}, blocked: {"require": "block"}})
        peer = start_peer(prosody_factory, dns_env, pki, PeerDomain(good, cert_good, cert_good.cert),
                          PeerDomain(blocked, cert_blocked, cert_blocked.cert))
        delivered(peer, good, site, "from the accepted host")
        bounced(peer, blocked, site, "from the blocked host")

        assert site.proxy.wait_for_decision(good)["verdict"] == "accept"
        assert site.proxy.wait_for_decision(blocked)["verdict"] == "reject"
        assert_backend_saw_only_the_header(site, blocked)
        # Prosody 0.12 used one stream per host pair (see the module docstring).
        assert len(site.streams_from(good)) == 1 and len(site.streams_from(blocked)) >= 1


class Authoritative:
    """The peer domains' own server in its other XEP-0220 roles, raw XML.

    The backend connects here (SRV of the peer domains) to check the keys the raw peer sent.
    Prosody holds that `<db:verify>` until its own stream here is authenticated, so this
    server first does what a receiving server does with the backend's `<db:result>`: it asks
    the backend's authoritative server -- through the proxy, like any peer (`<db:verify>`
    passes the proxy ungated, DESIGN §3.1 step 4) -- and answers with the result.  Then it
    answers `<db:verify>` as the authoritative server: `valid` for keys in `keys`."""

    def __init__(self, transcript: list, verify_back) -> None:
        self.transcript = transcript
        self.verify_back = verify_back      # async (sender, target, stream_id, key) -> "valid"/"invalid"
        self.port = free_port(AUTHORITATIVE_IP)
        self.keys: dict[str, str] = {}    # key -> domain that issued it
        self.verified: list[tuple[str, str]] = []
        self.verified_back: list[tuple[str, str]] = []

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=AUTHORITATIVE_IP)
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        xs = XmppStream(stream, label="backend->authoritative", transcript=self.transcript)
        stream_id = secrets.token_hex(6)
        try:
            header = await xs.expect_header()
            await xs.send(stream_header(ns=NS_SERVER, dialback=True, from_=header.get("to"),
                                        to=header.get("from"), id=stream_id))
            await xs.send("<stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>"
                          "</stream:features>")
            async with trio.open_nursery() as nursery:
                while True:
                    stanza = await xs.expect_stanza(timeout=30)
                    if stanza.tag == f"{{{NS_DIALBACK}}}verify":
                        key = stanza.element.text or ""
                        ok = self.keys.get(key) == stanza.get("to")
                        self.verified.append((stanza.get("to"), "valid" if ok else "invalid"))
                        await xs.send(f"<db:verify from='{stanza.get('to')}' to='{stanza.get('from')}' "
                                      f"id='{stanza.get('id')}' type='{'valid' if ok else 'invalid'}'/>")
                    elif stanza.tag == f"{{{NS_DIALBACK}}}result":
                        # In the background: answering inline would block reading the
                        # <db:verify> that follows.
                        nursery.start_soon(self._result, xs, stanza, stream_id)
        except (XmppError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await xs.aclose(close_stream=False)

    async def _result(self, xs: XmppStream, result, stream_id: str) -> None:
        sender, target = result.get("from"), result.get("to")
        answer = await self.verify_back(sender, target, stream_id, result.element.text or "")
        self.verified_back.append((sender, answer))
        await xs.send(f"<db:result from='{target}' to='{sender}' type='{answer}'/>")


async def _raw_peer_stream(site: Site, identity: tuple[Path, Path], sender: str, transcript: list, *,
                           label: str = "raw-peer") -> XmppStream:
    """Connect to the proxy as `sender`, STARTTLS with `identity`, restart; return the stream
    after the backend's header and features."""
    xs = await XmppStream.connect(*site.proxy.inbound, label=label, transcript=transcript)
    await xs.send(stream_header(ns=NS_SERVER, dialback=True, from_=sender, to=site.domain))
    await xs.expect_header()
    features = await xs.expect_stanza()
    assert features.element.find(f"{{{NS_TLS}}}starttls") is not None
    await xs.send(f"<starttls xmlns='{NS_TLS}'/>")
    assert (await xs.expect_stanza()).name == "proceed"
    tls = TlsStream(xs.stream, client_context(cert_file=identity[0], key_file=identity[1]),
                    server_side=False, server_hostname=site.domain)
    with trio.fail_after(TIMEOUT):
        await tls.do_handshake()
    xs.stream = tls
    xs.restart()
    await xs.send(stream_header(ns=NS_SERVER, dialback=True, from_=sender, to=site.domain))
    header = await xs.expect_header()
    assert header.get("id"), header.raw
    features = await xs.expect_stanza()
    assert features.tag == f"{{{NS_STREAM}}}features"
    assert features.element.find(f"{{{NS_TLS}}}starttls") is None, "the backend's <starttls/> must be withheld"
    return xs


def test_piggybacked_domains_on_one_stream_each_judged_alone(prosody_factory, dns_env, tmp_path, pki):
    good, blocked, unmatched = (dns_env.fresh(dns_env.secure, "p") for _ in range(3))
    # One certificate naming all three, as a multi-domain server would present; it matches
    # every domain's TLSA except `unmatched`'s -- only the policy and the TLSA differ.
    cert = self_signed([good, blocked, unmatched])
    identity = cert.write(tmp_path / "raw", "multi")
    transcript: list = []
    with ExitStack() as stack:
        site = start_site(stack, prosody_factory, dns_env, tmp_path, pki,
                          policies={good: {"require": "dane"}, blocked: {"require": "block"}})

        async def verify_back(sender: str, target: str, stream_id: str, key: str) -> str:
            # XEP-0220 §2.1.2: ask the sender's authoritative server (the backend, behind the
            # proxy) on a stream of our own; `target` is the peer domain being asked.
            check = await _raw_peer_stream(site, identity, target, transcript, label="verify-back")
            await check.send(f"<db:verify from='{target}' to='{sender}' id='{stream_id}'>{key}</db:verify>")
            answer = await check.wait_for(lambda s: s.tag == f"{{{NS_DIALBACK}}}verify", timeout=TIMEOUT)
            await check.aclose()
            return answer.get("type")

        authoritative = Authoritative(transcript, verify_back)
        with dns_env.batch():
            publish_peer(dns_env, PeerDomain(good, cert, cert.cert), AUTHORITATIVE_IP, authoritative.port)
            publish_peer(dns_env, PeerDomain(blocked, cert, cert.cert), AUTHORITATIVE_IP, authoritative.port)
            publish_peer(dns_env, PeerDomain(unmatched, cert, self_signed([unmatched]).cert),
                         AUTHORITATIVE_IP, authoritative.port)
        keys = {d: secrets.token_hex(16) for d in (good, blocked, unmatched)}
        authoritative.keys = {k: d for d, k in keys.items()}

        async def main():
            async with trio.open_nursery() as nursery:
                await nursery.start(authoritative.serve)
                user = await C2SClient.login(*site.backend.c2s_addr, f"{USER}@{site.domain}", PASSWORD)
                await user.send_presence()
                xs = await _raw_peer_stream(site, identity, good, transcript)
                # Three assertions on one stream, answered in any order.
                for domain in (blocked, good, unmatched):
                    await xs.send(f"<db:result from='{domain}' to='{site.domain}'>{keys[domain]}</db:result>")
                answers = {}
                while len(answers) < 3:
                    stanza = await xs.expect_stanza(timeout=TIMEOUT)
                    if stanza.tag == f"{{{NS_DIALBACK}}}result":
                        answers[stanza.get("to")] = stanza
                assert answers[good].get("type") == "valid", answers[good].raw
                for domain in (blocked, unmatched):
                    assert answers[domain].get("type") == "error", answers[domain].raw
                    assert answers[domain].get("from") == site.domain
                    assert b"not-authorized" in answers[domain].raw, answers[domain].raw

                # The accepted domain may now send; the stanza reaches the backend user.
                await xs.send(f"<message from='alice@{good}/r' to='{USER}@{site.domain}' type='chat' id='g1'>"
                              f"<body>piggybacked and accepted</body></message>")
                got = await user.wait_for_message("piggybacked and accepted", timeout=TIMEOUT)
                assert got.get("from") == f"alice@{good}/r"

                # A rejected domain may not: invalid-from (RFC 6120 §4.9.3.9), stream closed.
                await xs.send(f"<message from='mallory@{blocked}' to='{USER}@{site.domain}' type='chat' id='b1'>"
                              f"<body>from the blocked domain</body></message>")
                with pytest.raises(XmppError, match="invalid-from"):
                    await xs.wait_for(lambda s: False, timeout=TIMEOUT)
                await xs.aclose(close_stream=False)
                await user.aclose()
                nursery.cancel_scope.cancel()

        try:
            trio.run(main)
        finally:
            print("--- transcript\n" + format_transcript(transcript))
            print("--- backend log tail\n" + "\n".join(site.backend.log_text().splitlines()[-40:]))
            print("--- proxy log\n" + site.proxy.log.text())

        verdicts = {d: site.proxy.wait_for_decision(d) for d in (good, blocked, unmatched)}
        assert (verdicts[good]["verdict"], verdicts[good]["prooftype"]) == ("accept", "dane-ee")
        assert verdicts[blocked]["verdict"] == "reject" and "blocked by policy" in verdicts[blocked]["reason"]
        assert verdicts[unmatched]["verdict"] == "reject"
        assert "no usable TLSA record matches" in verdicts[unmatched]["reason"]
        # All three judged on the one connection.
        assert len({v["peer"] for v in verdicts.values()}) == 1
        # The backend got the accepted domain's dialback and stanza, nothing of the others.
        conns = site.relay.wait_for(lambda cs: all(c.closed for c in cs) and cs, TIMEOUT, "relayed streams closed")
        # Two streams: the piggybacking one, and our verify-back stream (db:verify only).
        (main_conn,) = [c for c in conns if b"<db:result" in c.upstream]
        (verify_conn,) = [c for c in conns if b"<db:verify" in c.upstream]
        assert [e.name for e in elements(verify_conn.upstream)] == ["verify"]
        assert [e.get("type") for e in elements(verify_conn.downstream) if e.name == "verify"] == ["valid"]
        upstream = bytes(main_conn.upstream)
        sent = elements(upstream)
        assert [e.element.text for e in sent if is_dialback_result(e, good, site.domain)] == [keys[good]], sent
        assert [e.body for e in sent if e.name == "message"] == ["piggybacked and accepted"], sent
        for domain in (blocked, unmatched):
            assert f"from='{domain}'".encode() not in upstream and keys[domain].encode() not in upstream
        assert b"from the blocked domain" not in upstream
        # The backend verified only the accepted domain's key with its authoritative server.
        assert authoritative.verified == [(good, "valid")]
        assert authoritative.verified_back == [(site.domain, "valid")]
