"""The gate against a hostile peer, with a real Prosody and a real ejabberd backend (issue 10,
breaches 1 and 3).

The setup is test_inbound_prosody.py's piggybacking one: a raw TLS peer (our own client,
any bytes we like) speaks for a parent zone's domains through the proxy to a real Prosody
backend; a raw authoritative server answers the backend's dialback checks for those domains
with `valid`, so whatever the proxy lets through, the backend WOULD authenticate.  Only the
proxy stands between the hostile stream and the backend's users.

Breach 1 (two readings of one domain): the peer proves `xn--strae-oqa.P` (its TLSA matches),
then asserts `straße.P`.  UTS #46 reads that as the proven domain; Prosody's nameprep reads
it as `strasse.P`, whose policy is `block`.  Before the fix the proxy forwarded it as "a
renewed key for an accepted pair", Prosody authenticated strasse.P and delivered
`mallory@straße.P` to a local user as `mallory@strasse.P`.

Breach 3 (stanzas outside jabber:server): once a pair is authenticated, a `<message>` in
`jabber:client`, in no namespace, or an element in an unknown namespace, went to the backend.

Both over STARTTLS and Direct TLS (XEP-0368), each with Prosody 0.12 and ejabberd 23.01 as
the backend receiving the same hostile stream.
"""
from __future__ import annotations

import secrets
from contextlib import ExitStack
from pathlib import Path

import pytest
import trio

from ejabberdenv import EjabberdHost
from pki import self_signed
from prosodyenv import VirtualHost
from proxy.tls import TlsStream, client_context
from proxyenv import RecordingRelay, RunningProxy, write_config, write_policies
from test_inbound_prosody import (  # noqa: F401  (pki is a fixture)
    AUTHORITATIVE_IP, BACKEND_IP, NS_DIALBACK, NS_SERVER, NS_STREAM, NS_TLS, PASSWORD, PROXY_IP, TIMEOUT, USER,
    Authoritative, PeerDomain, Site, elements, format_transcript, pki, publish_peer, validating_dns,
)
from xmppclient import C2SClient, XmppError, XmppStream, stream_header


async def raw_peer(site: Site, identity: tuple[Path, Path], sender: str, transcript: list, *,
                   direct_tls: bool, label: str = "raw-peer") -> XmppStream:
    """A TLS stream to the proxy as `sender` (STARTTLS or Direct TLS, XEP-0368) presenting
    `identity`; returned after the backend's header and features."""
    xs = await XmppStream.connect(*site.proxy.inbound, label=label, transcript=transcript)
    if not direct_tls:
        await xs.send(stream_header(ns=NS_SERVER, dialback=True, from_=sender, to=site.domain))
        await xs.expect_header()
        await xs.expect_stanza()
        await xs.send(f"<starttls xmlns='{NS_TLS}'/>")
        assert (await xs.expect_stanza()).name == "proceed"
    tls = TlsStream(xs.stream, client_context(cert_file=identity[0], key_file=identity[1],
                                              alpn=[b"xmpp-server"] if direct_tls else []),
                    server_side=False, server_hostname=site.domain)
    with trio.fail_after(TIMEOUT):
        await tls.do_handshake()
    xs.stream = tls
    xs.restart()
    await xs.send(stream_header(ns=NS_SERVER, dialback=True, from_=sender, to=site.domain))
    assert (await xs.expect_header()).get("id")
    features = await xs.expect_stanza()
    assert features.tag == f"{{{NS_STREAM}}}features"
    return xs


def start_site(stack: ExitStack, request, dns_env, tmp_path: Path, pki, *, backend_kind: str, policies: dict,
               authoritative_names: list[str]) -> Site:
    """A backend (Prosody or ejabberd, plaintext S2S, dialback) serving a fresh domain B, the
    recording relay, the proxy; B's SRV points at the proxy.  The backend finds the peer
    domains' authoritative server (`authoritative_names`, SRV targets) through the test DNS."""
    domain = dns_env.fresh(dns_env.secure, "b")
    cert = pki.ca.issue([domain], xmpp=[domain])
    cert_path, key_path = cert.write(tmp_path / "proxy", domain)
    if backend_kind == "prosody":
        backend = request.getfixturevalue("prosody_factory")(
            [VirtualHost(domain, cert=cert, users={USER: PASSWORD})], mode="backend", address=BACKEND_IP,
            dns=validating_dns(dns_env))
    else:
        backend = request.getfixturevalue("ejabberd_factory")(
            [EjabberdHost(domain, cert=cert, users={USER: PASSWORD})], mode="backend", address=BACKEND_IP,
            ca_file=pki.ca_file, nameserver=dns_env.resolver_address,
            etc_hosts={name: AUTHORITATIVE_IP for name in authoritative_names})
    relay = stack.enter_context(RecordingRelay(backend.s2s_addr))
    config = write_config(
        tmp_path / "proxy" / "config.toml", listen=[f"{PROXY_IP}:0"], backend=relay.hostport,
        domains=[(domain, cert_path, key_path)], nameservers=[dns_env.resolver_address],
        policy_dir=write_policies(tmp_path / "policy.d", policies), ca_file=pki.ca_file)
    proxy = stack.enter_context(RunningProxy(config))
    dns_env.publish_xmpp(domain, f"xmpp.{domain}", proxy.inbound[1], PROXY_IP, None)
    return Site(domain, backend, relay, proxy)


class ClosingAuthoritative(Authoritative):
    """ejabberd closes its verification stream right after the answer; the base class only
    expects that between stanzas, not inside its task group."""

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            await super()._handle(stream)
        except* (XmppError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass


class HostileSetup:
    """Parent zone P with `good` = xn--strae-oqa.P (TLSA matches the raw peer's key, policy
    dane) and `blocked` = strasse.P (policy block), both served by the authoritative server."""

    def __init__(self, stack: ExitStack, request, dns_env, tmp_path: Path, pki, *, direct_tls: bool,
                 backend_kind: str):
        parent = dns_env.fresh(dns_env.secure, "idn")
        self.parent = parent
        self.good = f"xn--strae-oqa.{parent}"
        self.blocked = f"strasse.{parent}"
        self.spoof = f"straße.{parent}"          # nameprep: strasse.P; UTS #46: xn--strae-oqa.P
        self.backend_kind = backend_kind
        cert = self_signed([self.good, self.blocked])
        self.identity = cert.write(tmp_path / "raw", "hostile")
        self.site = start_site(stack, request, dns_env, tmp_path, pki, backend_kind=backend_kind,
                               policies={self.good: {"require": "dane"}, self.blocked: {"require": "block"}},
                               authoritative_names=[f"xmpp.{self.good}", f"xmpp.{self.blocked}"])
        self.direct_tls = direct_tls
        self.transcript: list = []
        self.authoritative = ClosingAuthoritative(self.transcript, self._verify_back)
        with dns_env.batch():
            publish_peer(dns_env, PeerDomain(self.good, cert, cert.cert), AUTHORITATIVE_IP, self.authoritative.port)
            publish_peer(dns_env, PeerDomain(self.blocked, cert, cert.cert), AUTHORITATIVE_IP, self.authoritative.port)
        # Every key is "valid" to the authoritative server: only the proxy can stop anything.
        self.keys = {d: secrets.token_hex(16) for d in (self.good, self.blocked)}
        self.authoritative.keys = {k: d for d, k in self.keys.items()}

    async def _verify_back(self, sender: str, target: str, stream_id: str, key: str) -> str:
        check = await raw_peer(self.site, self.identity, target, self.transcript, direct_tls=self.direct_tls,
                               label="verify-back")
        await check.send(f"<db:verify from='{target}' to='{sender}' id='{stream_id}'>{key}</db:verify>")
        answer = await check.wait_for(lambda s: s.tag == f"{{{NS_DIALBACK}}}verify", timeout=TIMEOUT)
        await check.aclose()
        return answer.get("type")

    async def authenticated_stream(self) -> XmppStream:
        """A stream on which the backend confirmed `good`."""
        xs = await raw_peer(self.site, self.identity, self.good, self.transcript, direct_tls=self.direct_tls)
        await xs.send(f"<db:result from='{self.good}' to='{self.site.domain}'>{self.keys[self.good]}</db:result>")
        answer = await xs.wait_for(lambda s: s.tag == f"{{{NS_DIALBACK}}}result", timeout=TIMEOUT)
        assert answer.get("type") == "valid", answer.raw
        return xs

    def run(self, scenario) -> None:
        async def main():
            async with trio.open_nursery() as nursery:
                await nursery.start(self.authoritative.serve)
                user = await C2SClient.login(*self.site.backend.c2s_addr, f"{USER}@{self.site.domain}", PASSWORD)
                await user.send_presence()
                await scenario(user)
                await user.aclose()
                nursery.cancel_scope.cancel()

        try:
            trio.run(main)
        finally:
            print("--- transcript\n" + format_transcript(self.transcript))
            print("--- backend log tail\n" + "\n".join(self.site.backend.log_text().splitlines()[-40:]))
            print("--- proxy log\n" + self.site.proxy.log.text())

    def upstream(self) -> bytes:
        """Everything the backend was sent, on every relayed connection."""
        conns = self.site.relay.wait_for(lambda cs: all(c.closed for c in cs) and cs, TIMEOUT, "relayed streams closed")
        return b"".join(bytes(c.upstream) for c in conns)


TRANSPORTS = [pytest.param(False, id="starttls"), pytest.param(True, id="direct-tls")]
BACKENDS = ["prosody", "ejabberd"]


@pytest.mark.parametrize("backend_kind", BACKENDS)
@pytest.mark.parametrize("direct_tls", TRANSPORTS)
def test_a_domain_with_two_readings_cannot_speak_for_a_blocked_one(request, dns_env, tmp_path, pki, direct_tls,
                                                                   backend_kind):
    with ExitStack() as stack:
        h = HostileSetup(stack, request, dns_env, tmp_path, pki, direct_tls=direct_tls, backend_kind=backend_kind)
        site = h.site

        async def scenario(user: C2SClient) -> None:
            xs = await h.authenticated_stream()
            # The spoofed assertion: same key material the backend would accept for strasse.P.
            await xs.send(f"<db:result from='{h.spoof}' to='{site.domain}'>{h.keys[h.blocked]}</db:result>")
            answer = await xs.wait_for(lambda s: s.tag == f"{{{NS_DIALBACK}}}result", timeout=TIMEOUT)
            # XEP-0220 §2.4 dialback error, jid-malformed, saying why (DESIGN §2.6).
            assert answer.get("type") == "error", answer.raw
            assert b"jid-malformed" in answer.raw and b"IDNA2003" in answer.raw and b"strasse" in answer.raw, answer.raw
            # The stanza that would follow is refused as well, and the stream ends.
            await xs.send(f"<message from='mallory@{h.spoof}' to='{USER}@{site.domain}' type='chat' id='m1'>"
                          "<body>impersonating the blocked domain</body></message>")
            with pytest.raises(XmppError, match="invalid-from"):
                await xs.wait_for(lambda s: False, timeout=TIMEOUT)
            await xs.aclose(close_stream=False)
            # Nothing reached the local user (it would arrive within a second if it had).
            with pytest.raises(trio.TooSlowError):
                await user.wait_for_message("impersonating the blocked domain", timeout=3)

        h.run(scenario)
        upstream = h.upstream()
        assert "straße".encode() not in upstream and h.blocked.encode() not in upstream, upstream
        assert h.keys[h.blocked].encode() not in upstream
        if backend_kind == "prosody":   # Prosody logs each key it asks about
            assert f"asking {h.blocked}" not in site.backend.log_text()
        assert "strasse" not in "".join(str(v) for v in h.authoritative.verified)


# What breach 3 sent, each on an authenticated stream, and what the peer gets back.
FOREIGN_ELEMENTS = [
    pytest.param("<message xmlns='jabber:client' from='mallory@{blocked}' to='u@{site}' type='chat'>"
                 "<body>client namespace</body></message>", id="jabber-client"),
    pytest.param("<message xmlns='' from='mallory@{blocked}' to='u@{site}' type='chat'>"
                 "<body>no namespace</body></message>", id="empty-namespace"),
    pytest.param("<x xmlns='urn:example:unknown' from='{blocked}'><message from='mallory@{blocked}' "
                 "to='u@{site}'><body>unknown namespace</body></message></x>", id="unknown-namespace"),
    pytest.param("<db:request from='{blocked}' to='{site}'>k</db:request>", id="db-request"),
    # The db prefix bound to another namespace: a backend matching the prefix literally
    # would read a dialback request for the blocked domain.
    pytest.param("<db:result xmlns:db='urn:example:not-dialback' from='{blocked}' to='{site}'>{key}</db:result>",
                 id="db-prefix-rebound"),
    pytest.param("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>", id="sasl-auth"),
]


@pytest.mark.parametrize("backend_kind", BACKENDS)
@pytest.mark.parametrize("direct_tls", TRANSPORTS)
def test_nothing_outside_the_gate_list_reaches_the_backend(request, dns_env, tmp_path, pki, direct_tls, backend_kind):
    with ExitStack() as stack:
        h = HostileSetup(stack, request, dns_env, tmp_path, pki, direct_tls=direct_tls, backend_kind=backend_kind)
        site = h.site
        sent = [p.values[0].format(blocked=h.blocked, site=site.domain, key=h.keys[h.blocked]) for p in FOREIGN_ELEMENTS]

        async def scenario(user: C2SClient) -> None:
            for element in sent:
                xs = await h.authenticated_stream()
                await xs.send(element)
                # RFC 6120 §4.9.3.24, with the element named in the <text>; SASL <auth/> is the
                # proxy's to answer (DESIGN §3.3) and after authentication a policy-violation.
                expected = "policy-violation" if "xmpp-sasl" in element else "unsupported-stanza-type"
                with pytest.raises(XmppError, match=expected) as info:
                    await xs.wait_for(lambda s: False, timeout=TIMEOUT)
                assert "not passed to the backend" in str(info.value), str(info.value)
                await xs.aclose(close_stream=False)
            # And a proper stanza of the authenticated pair still arrives (the gate is not shut).
            xs = await h.authenticated_stream()
            await xs.send(f"<message from='alice@{h.good}/r' to='{USER}@{site.domain}' type='chat' id='ok'>"
                          "<body>allowed</body></message>")
            got = await user.wait_for_message("allowed", timeout=TIMEOUT)
            assert got.get("from") == f"alice@{h.good}/r"
            await xs.aclose()

        h.run(scenario)
        upstream = h.upstream()
        for element in sent:
            assert element.encode() not in upstream, element
        for marker in (b"client namespace", b"no namespace", b"unknown namespace", b"db:request", b"urn:example",
                       b"xmpp-sasl' mechanism", h.keys[h.blocked].encode()):
            assert marker not in upstream, marker
        conns = h.site.relay.snapshot()
        bodies = [e.body for c in conns for e in elements(bytes(c.upstream)) if e.name == "message"]
        assert bodies == ["allowed"], bodies
