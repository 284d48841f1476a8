"""POSH (RFC 7711) as a prooftype (RFC 7712 §5.2): documents, fetches, verdicts, wiring.

The pure half (policy/posh.py, policy/decide.py) is tested in memory.  The fetch
(proxy/posh_fetch.py) runs against `PoshServer`: a real HTTPS server on a loopback address,
its certificate issued by the test PKI for the peer domain D, serving whatever each test puts
at each path; the fetcher trusts the test CA the way the proxy trusts `policy.ca_file`.  The
fetcher is pointed at the server with its `overrides` map (host → loopback address and port),
except in one test where D's address comes from the validating resolver of tests/dnsenv.py.
At the end, the proxy's three users of POSH: outbound (`connect_peer`), `check`, and inbound
(a dialback asserted by a peer that presents a self-signed certificate), plus `verify
--posh-file`.

Reading of RFC 7711 for `expires` (§3.1, §6): it is a caching lifetime — the number of
seconds after which the information is stale and the whole process must run again.  `expires`
0 is therefore a document that is stale as soon as it has been used: it serves the
verification it was fetched for and is not kept (the next stream fetches again).  It is not a
document that never counted: a freshly fetched document is the result of the process.  What
never counts is a cached result past its lifetime (tested with an injected clock) and any
fetch that failed or timed out.
"""
from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import io
import json
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pki import TestCA, self_signed
from policy.decide import decide, posh_consulted
from policy.evidence import DnsStatus, Evidence
from policy.pkix import TrustStore
from policy.policyfile import Policy, PolicyError, parse_policy_document
from policy.posh import (
    MAX_CACHE_SECONDS, PoshError, PoshResult, PoshStatus, cache_seconds, match_certificate,
    parse_document, parse_reference,
)
from policy.tlsa import record_for
from policy.tomlfile import TomlDocument
from proxy.metrics import reason_category
from proxy.posh_fetch import MAX_BODY_BYTES, PoshFetcher, decide_with_posh, shared_fetcher
from test_inbound_openssl import world  # noqa: F401  (a fixture, for the inbound test)

D = "a.example"                  # the peer domain
HOSTING = "hosting.example"      # a hosting provider a reference points to
PATH = "/.well-known/posh/xmpp-server.json"
TIMEOUT = 10.0

CA = TestCA("POSH Test Root")
TRUST = TrustStore((CA.cert,), "posh test CA")
STRANGER_CA = TestCA("Untrusted Root")

# The XMPP server's certificate names the hosting service, not D: the situation POSH is for.
XMPP_CERT = self_signed(["xmpp.hosting.example"]).cert
OTHER_CERT = self_signed(["xmpp.hosting.example"]).cert
NOW = _dt.datetime.now(_dt.timezone.utc)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def der(cert) -> bytes:
    return cert.public_bytes(Encoding.DER)


def descriptor(cert, *algorithms: str) -> dict[str, str]:
    """A fingerprint descriptor: {"sha-256": base64(SHA-256(DER certificate)), ...}."""
    return {a: b64(hashlib.new(a.replace("-", ""), der(cert)).digest()) for a in algorithms or ("sha-256",)}


def document(*certs, expires: int | None = 3600, algorithms: tuple[str, ...] = ("sha-256",), **extra) -> bytes:
    obj: dict = {"fingerprints": [descriptor(c, *algorithms) for c in certs], **extra}
    if expires is not None:
        obj["expires"] = expires
    return json.dumps(obj).encode()


def reference(url: str, expires: int = 3600) -> bytes:
    return json.dumps({"url": url, "expires": expires}).encode()


# =============================================================================== documents


def test_rfc7711_example_shape_parses_strongest_digest_first():
    doc = parse_document(document(XMPP_CERT, algorithms=("sha-256", "sha-512"), expires=604800))
    assert doc.expires == 604800 and doc.reference is None and doc.notes == ()
    (only,) = doc.descriptors
    assert [f.algorithm for f in only] == ["sha-512", "sha-256"]
    assert only[0].digest == hashlib.sha512(der(XMPP_CERT)).digest()


def test_fingerprint_is_of_the_whole_certificate_not_of_its_key():
    """RFC 7711 §3.1: the certificate's fingerprint.  A digest of the SubjectPublicKeyInfo (what
    TLSA selector 1 hashes) matches nothing, and a re-issued certificate with the same key does
    not match the old one's fingerprint."""
    spki = XMPP_CERT.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    by_key = parse_document(json.dumps({"fingerprints": [{"sha-256": b64(hashlib.sha256(spki).digest())}]}))
    assert match_certificate(XMPP_CERT, by_key.descriptors) is None
    by_cert = parse_document(document(XMPP_CERT))
    assert str(match_certificate(XMPP_CERT, by_cert.descriptors)) == "sha-256:" + b64(hashlib.sha256(der(XMPP_CERT)).digest())
    issued = self_signed(["xmpp.hosting.example"])
    reissued = self_signed(["xmpp.hosting.example"], key=issued.key)
    assert match_certificate(reissued.cert, parse_document(document(issued.cert)).descriptors) is None


def test_any_descriptor_may_match_and_the_strongest_digest_in_one_decides():
    wrong512 = {**descriptor(XMPP_CERT, "sha-256"), "sha-512": b64(b"\0" * 64)}
    doc = parse_document(json.dumps({"fingerprints": [wrong512], "expires": 60}))
    # sha-256 would match, but sha-512 is present and does not: this descriptor is no match.
    assert match_certificate(XMPP_CERT, doc.descriptors) is None
    rollover = parse_document(json.dumps({"fingerprints": [descriptor(OTHER_CERT), wrong512,
                                                           descriptor(XMPP_CERT, "sha-384")]}))
    assert match_certificate(XMPP_CERT, rollover.descriptors).algorithm == "sha-384"
    assert match_certificate(OTHER_CERT, rollover.descriptors).algorithm == "sha-256"


def test_unusable_entries_are_skipped_and_noted():
    good = descriptor(XMPP_CERT)["sha-256"]
    doc = parse_document(json.dumps({"expires": 5, "fingerprints": [
        {"sha-1": b64(hashlib.sha1(der(XMPP_CERT)).digest()), "md5": "AAAA"},
        {"blake3": good},
        {"sha-256": "not base64!"},
        {"sha-256": b64(b"short")},
        {"sha-256": 42},
        {"SHA-256": good},
    ]}))
    assert len(doc.descriptors) == 1 and match_certificate(XMPP_CERT, doc.descriptors)
    notes = " | ".join(doc.notes)
    for words in ("fingerprints[0].sha-1: weak hash", "fingerprints[0].md5: weak hash",
                  "fingerprints[1].blake3: unknown hash name", "fingerprints[2].sha-256: not base64",
                  "fingerprints[3].sha-256: 5 bytes, sha-256 has 32", "fingerprints[4].sha-256: not a string",
                  "fingerprints[0]: no usable digest"):
        assert words in notes, notes


@pytest.mark.parametrize("text,words", [
    ("not json", "not JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    ("[1, 2]", "a JSON object, not an array"),
    ('{"expires": 10}', "neither 'fingerprints' nor 'url'"),
    ('{"fingerprints": {"sha-256": "x"}}', "'fingerprints' must be an array"),
    ('{"fingerprints": ["abc"]}', "fingerprints[0] must be an object"),
    ('{"fingerprints": [], "expires": -1}', "non-negative"),
    ('{"fingerprints": [], "expires": "3600"}', "'expires' must be a number of seconds, not a string"),
    ('{"fingerprints": [], "expires": true}', "not a boolean"),
    ('{"fingerprints": [], "expires": NaN}', "NaN is not a JSON number"),
    ('{"fingerprints": [], "expires": 1e999}', "non-negative"),
    ('{"fingerprints": [], "expires": 1' + "0" * 5000 + "}", "not JSON"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('{"url": 5}', "'url' must be a string"),
    ('{"url": "http://hosting.example/x.json"}', "not an https URL"),
    ('{"url": "https://127.0.0.1/x.json"}', "names an IP address"),
    ('{"url": "https://[::1]/x.json"}', "names an IP address"),
    ('{"url": "https://user:pw@hosting.example/x.json"}', "carries credentials"),
    ('{"url": "https:///x.json"}', "names no host"),
    ('{"url": "https://hosting.example:99999/x"}', "is not a URL"),
    ('{"url": "https://bad_host.example/x"}', "names no valid host"),
])
def test_malformed_documents_are_errors_that_say_why(text, words):
    with pytest.raises(PoshError) as info:
        parse_document(text)
    assert words in str(info.value)


def test_reference_keeps_port_path_and_query():
    ref = parse_reference("https://Hosting.Example.:8443/posh/x.json?d=a.example#frag")
    assert (ref.host, ref.port, ref.target) == ("hosting.example", 8443, "/posh/x.json?d=a.example")
    assert parse_reference("https://hosting.example").target == "/"
    assert parse_reference("https://bücher.example/x").host == "xn--bcher-kva.example"


def test_a_domain_no_https_url_can_carry_is_a_failure_without_network():
    async def main():
        posh = await PoshFetcher(None).fetch("a.example/../evil", trust=TRUST)
        assert posh.status is PoshStatus.FAILED and "not a host name" in posh.reason
    trio.run(main)


@pytest.mark.parametrize("values,seconds", [
    ((3600,), 3600), ((0,), 0), ((None,), 0), ((100, 50), 50), ((50, 100), 50), ((100, None), 0),
    ((10**9,), MAX_CACHE_SECONDS),
])
def test_cache_lifetime_is_the_lowest_expires_capped_at_a_day(values, seconds):
    assert cache_seconds(*values) == seconds


# =============================================================================== decide()


def _posh(status=PoshStatus.OK, *certs, reason="", url=f"https://{D}{PATH}", keep=3600.0) -> PoshResult:
    descs = parse_document(document(*certs)).descriptors if certs else ()
    return PoshResult(D, status, descriptors=descs, url=url, reason=reason, cache_seconds=keep)


PKIX_GOOD = CA.issue(dns=[D])                       # valid PKIX chain for D (TRUST)
MATCH = _posh(PoshStatus.OK, XMPP_CERT)
MISMATCH = _posh(PoshStatus.OK, OTHER_CERT)
NO_TLSA = Evidence(D)
SECURE_TLSA_OTHER = Evidence(D, tlsa=(record_for(OTHER_CERT),), tlsa_status=DnsStatus.SECURE)
SECURE_TLSA_MATCH = Evidence(D, tlsa=(record_for(XMPP_CERT),), tlsa_status=DnsStatus.SECURE)
BOGUS_SRV = Evidence(D, statuses={f"SRV _xmpp-server._tcp.{D}": DnsStatus.BOGUS})


@pytest.mark.parametrize("name,require,posh_key,chain,evidence,posh,verdict,prooftype,words", [
    ("require posh, match", "posh", False, [XMPP_CERT], NO_TLSA, MATCH, "accept", "posh",
     f"POSH: leaf certificate matches sha-256 fingerprint at https://{D}{PATH}"),
    ("require posh, mismatch", "posh", False, [XMPP_CERT], NO_TLSA, MISMATCH, "reject", None,
     "POSH: leaf certificate matches none of the 1 fingerprint at"),
    ("require posh, absent", "posh", False, [XMPP_CERT], NO_TLSA,
     _posh(PoshStatus.ABSENT, reason="no POSH document at x (HTTP 404)"), "reject", None, "POSH: absent: no POSH"),
    ("require posh, failed", "posh", False, [XMPP_CERT], NO_TLSA,
     _posh(PoshStatus.FAILED, reason="cannot connect"), "reject", None, "POSH: failed: cannot connect"),
    ("require posh, timeout", "posh", False, [XMPP_CERT], NO_TLSA,
     _posh(PoshStatus.TIMEOUT, reason="no POSH document within 5 s"), "reject", None, "POSH: timeout"),
    ("a failed fetch with fingerprints still counts for nothing", "posh", False, [XMPP_CERT], NO_TLSA,
     PoshResult(D, PoshStatus.FAILED, descriptors=MATCH.descriptors, reason="x"), "reject", None, "POSH: failed"),
    ("require posh, not fetched", "posh", False, [XMPP_CERT], NO_TLSA, None, "reject", None, "POSH: not consulted"),
    ("require posh, another domain's result", "posh", False, [XMPP_CERT], NO_TLSA,
     PoshResult("b.example", PoshStatus.OK, descriptors=MATCH.descriptors), "reject", None,
     "POSH: the result is for b.example, not a.example"),
    ("require posh, no certificate", "posh", False, [], NO_TLSA, MATCH, "reject", None,
     "no certificate presented; POSH needs one"),
    ("require posh, PKIX-valid chain is not enough", "posh", False, PKIX_GOOD.chain, NO_TLSA, MISMATCH,
     "reject", None, "POSH: leaf certificate matches none"),
    ("require posh ignores TLSA like pkix does", "posh", False, [XMPP_CERT], SECURE_TLSA_OTHER, MATCH,
     "accept", "posh", "POSH:"),
    ("bogus DNS rejects before POSH", "posh", False, [XMPP_CERT], BOGUS_SRV, MATCH, "reject", None,
     "DNSSEC evidence failed"),
    ("posh=true, dane-or-pkix, PKIX-invalid chain, match", "dane-or-pkix", True, [XMPP_CERT], NO_TLSA, MATCH,
     "accept", "posh", "(PKIX: chain does not verify"),
    ("posh=false, dane-or-pkix, PKIX-invalid chain, match", "dane-or-pkix", False, [XMPP_CERT], NO_TLSA, MATCH,
     "reject", None, "PKIX: chain does not verify"),
    ("posh=true, dane-or-pkix, mismatch: PKIX reason first", "dane-or-pkix", True, [XMPP_CERT], NO_TLSA, MISMATCH,
     "reject", None, "PKIX: chain does not verify"),
    ("posh=true, dane-or-pkix, usable TLSA mismatch: DANE decides", "dane-or-pkix", True, [XMPP_CERT],
     SECURE_TLSA_OTHER, MATCH, "reject", None, "no fallback to PKIX"),
    ("posh=true, dane-or-pkix, usable TLSA match", "dane-or-pkix", True, [XMPP_CERT], SECURE_TLSA_MATCH,
     MISMATCH, "accept", "dane-ee", ""),
    ("posh=true, dane-or-pkix, PKIX valid: pkix", "dane-or-pkix", True, PKIX_GOOD.chain, NO_TLSA, MISMATCH,
     "accept", "pkix", "PKIX: chain verifies"),
    ("posh=true, pkix, PKIX-invalid, match", "pkix", True, [XMPP_CERT], SECURE_TLSA_OTHER, MATCH, "accept", "posh",
     "POSH:"),
    ("posh=true, pkix, failed fetch", "pkix", True, [XMPP_CERT], NO_TLSA,
     _posh(PoshStatus.TIMEOUT, reason="slow"), "reject", None, "; POSH: timeout: slow"),
    ("posh=true, dane: POSH does not count", "dane", True, [XMPP_CERT], NO_TLSA, MATCH, "reject", None,
     "require=dane"),
    ("posh=true, block", "block", True, [XMPP_CERT], NO_TLSA, MATCH, "reject", None, "blocked by policy"),
])
def test_verdicts(name, require, posh_key, chain, evidence, posh, verdict, prooftype, words):
    policy = Policy(require=require, posh=posh_key, source="test")
    v = decide(chain, evidence, policy, trust=TRUST, now=NOW, posh=posh)
    assert (v.verdict, v.prooftype) == (verdict, prooftype), v.reason
    assert words in v.reason, v.reason


def test_expires_zero_is_said_in_the_accepting_reason():
    v = decide([XMPP_CERT], NO_TLSA, Policy(require="posh"), trust=TRUST, posh=_posh(PoshStatus.OK, XMPP_CERT, keep=0))
    assert v.accepted and "document not cached (expires 0 or absent)" in v.reason


def test_posh_consulted_only_where_it_can_change_the_verdict():
    def consulted(require, posh_key, chain=(XMPP_CERT,), evidence=NO_TLSA):
        return posh_consulted(list(chain), evidence, Policy(require=require, posh=posh_key))
    assert consulted("posh", False) and consulted("pkix", True) and consulted("dane-or-pkix", True)
    assert not consulted("dane-or-pkix", False) and not consulted("pkix", False)
    assert not consulted("dane", True) and not consulted("tls", True) and not consulted("block", True)
    assert not consulted("dane-or-pkix", True, evidence=SECURE_TLSA_OTHER)
    assert not consulted("posh", False, evidence=BOGUS_SRV) and not consulted("posh", False, chain=())


def test_metrics_categories_for_posh():
    accepted = decide([XMPP_CERT], NO_TLSA, Policy(require="posh"), trust=TRUST, posh=MATCH)
    failed = decide([XMPP_CERT], NO_TLSA, Policy(require="posh"), trust=TRUST, posh=MISMATCH)
    pkix_first = decide([XMPP_CERT], NO_TLSA, Policy(posh=True), trust=TRUST, posh=MISMATCH)
    assert [reason_category(v) for v in (accepted, failed, pkix_first)] == ["accepted", "posh-failed", "pkix-invalid"]


def test_policy_file_keys(tmp_path):
    path = tmp_path / "a.example.toml"
    path.write_text('require = "posh"\nposh = true\n')
    pol = parse_policy_document(TomlDocument.read(path))
    assert (pol.require, pol.posh) == ("posh", True)
    path.write_text('posh = "yes"\n')
    with pytest.raises(PolicyError) as info:
        parse_policy_document(TomlDocument.read(path))
    assert "posh: must be true or false" in str(info.value)


# =============================================================================== an HTTPS server


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    raw: bytes | None = None          # sent as is instead
    hang: bool = False                # accept the request, never answer

    def encode(self) -> bytes:
        if self.raw is not None:
            return self.raw
        head = [f"HTTP/1.1 {self.status} Whatever", f"Content-Length: {len(self.body)}",
                "Content-Type: application/json", "Connection: close"]
        head += [f"{k}: {v}" for k, v in self.headers]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + self.body


@dataclass
class Request:
    path: str
    headers: dict[str, str]


class PoshServer:
    """HTTPS on a loopback address with a certificate for `names` (test PKI); answers each
    path with its `routes` entry (404 for others) and records every request."""

    _next = iter(range(60, 250))

    def __init__(self, tmp: Path, names=(D,), *, ca: TestCA = CA) -> None:
        self.address = f"127.0.1.{next(self._next)}"
        issued = ca.issue(dns=list(names))
        cert, key = issued.write(tmp, f"https-{self.address}")
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.routes: dict[str, Reply] = {}
        self.requests: list[Request] = []
        self.port = 0

    def serve_document(self, body: bytes, path: str = PATH) -> None:
        self.routes[path] = Reply(body=body)

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.address)
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._handle, listeners, task_status=task_status)

    async def _handle(self, tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, self.ctx, server_side=True, https_compatible=True)
        try:
            with trio.move_on_after(TIMEOUT):
                await stream.do_handshake()
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    data += chunk
                lines = data.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
                self.requests.append(Request(path, headers))
                reply = self.routes.get(path, Reply(404, b"not here"))
                if reply.hang:
                    await trio.sleep_forever()
                await stream.send_all(reply.encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass   # e.g. the client refused our certificate
        finally:
            await trio.aclose_forcefully(stream)


def run(servers, body) -> None:
    """Start the servers, run `body()`, stop everything (also when the body fails)."""
    async def main():
        async with trio.open_nursery() as nursery:
            for s in servers:
                await nursery.start(s.serve)
            with trio.fail_after(30):
                await body()
            nursery.cancel_scope.cancel()
    trio.run(main)


def fetcher_for(*pairs: tuple[str, PoshServer], **kwargs) -> PoshFetcher:
    return PoshFetcher(None, overrides={host: (s.address, s.port) for host, s in pairs}, **kwargs)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# =============================================================================== fetching


def test_match_accepts_and_mismatch_rejects(tmp_path):
    web = PoshServer(tmp_path)
    web.serve_document(document(XMPP_CERT, algorithms=("sha-256", "sha-512")))

    async def body():
        fetcher = fetcher_for((D, web))
        posh = await fetcher.fetch(D, trust=TRUST)
        assert posh.status is PoshStatus.OK and posh.url == f"https://{D}{PATH}" and posh.cache_seconds == 3600
        accepted = decide([XMPP_CERT], NO_TLSA, Policy(require="posh"), trust=TRUST, posh=posh)
        assert (accepted.verdict, accepted.prooftype) == ("accept", "posh")
        assert f"matches sha-512 fingerprint at https://{D}{PATH}" in accepted.reason
        rejected = decide([OTHER_CERT], NO_TLSA, Policy(require="posh"), trust=TRUST, posh=posh)
        assert not rejected.accepted and "matches none of the 1 fingerprint" in rejected.reason
        # One plain GET of the well-known path, Host D, no keep-alive.
        (req,) = web.requests
        assert req.path == PATH and req.headers["host"] == D and req.headers["connection"] == "close"

    run([web], body)


def test_expires_zero_serves_this_verification_and_is_not_kept(tmp_path):
    web = PoshServer(tmp_path)
    web.serve_document(document(XMPP_CERT, expires=0))
    policy = Policy(require="posh")

    async def body():
        fetcher = fetcher_for((D, web))
        first, posh = await decide_with_posh([XMPP_CERT], NO_TLSA, policy, trust=TRUST, fetcher=fetcher)
        assert first.accepted and first.prooftype == "posh" and posh.cache_seconds == 0
        assert fetcher.cached(D, TRUST) is None
        # Not cached: the next stream fetches again and sees the document as it is now.
        web.serve_document(document(OTHER_CERT, expires=0))
        second, _ = await decide_with_posh([XMPP_CERT], NO_TLSA, policy, trust=TRUST, fetcher=fetcher)
        assert not second.accepted and "matches none" in second.reason
        assert len(web.requests) == 2

    run([web], body)


def test_cached_until_expires_then_the_process_runs_again(tmp_path):
    web = PoshServer(tmp_path)
    web.serve_document(document(XMPP_CERT, expires=600))
    policy = Policy(require="posh")

    async def body():
        clock = FakeClock()
        fetcher = fetcher_for((D, web), clock=clock)
        assert (await decide_with_posh([XMPP_CERT], NO_TLSA, policy, trust=TRUST, fetcher=fetcher))[0].accepted
        clock.now += 599
        again, posh = await decide_with_posh([XMPP_CERT], NO_TLSA, policy, trust=TRUST, fetcher=fetcher)
        assert again.accepted and posh.from_cache and len(web.requests) == 1
        # Stale: never used again; the web server now has no document, and that is the answer.
        clock.now += 1
        del web.routes[PATH]
        stale, posh = await decide_with_posh([XMPP_CERT], NO_TLSA, policy, trust=TRUST, fetcher=fetcher)
        assert not stale.accepted and posh.status is PoshStatus.ABSENT and len(web.requests) == 2
        assert f"POSH: absent: no POSH document at https://{D}{PATH} (HTTP 404)" in stale.reason

    run([web], body)


def test_url_reference_is_followed_once_with_the_lower_expires(tmp_path):
    web = PoshServer(tmp_path)
    hosting = PoshServer(tmp_path, names=[HOSTING])
    ref_url = f"https://{HOSTING}/posh/{D}.json"
    web.serve_document(reference(ref_url, expires=7200))
    hosting.serve_document(document(XMPP_CERT, expires=300), path=f"/posh/{D}.json")

    async def body():
        posh = await fetcher_for((D, web), (HOSTING, hosting)).fetch(D, trust=TRUST)
        assert posh.ok and posh.url == ref_url and posh.via == f"https://{D}{PATH}"
        assert posh.cache_seconds == 300        # RFC 7711 §6: the lower of the two
        v = decide([XMPP_CERT], NO_TLSA, Policy(require="posh"), trust=TRUST, posh=posh)
        assert v.accepted and f"at {ref_url} (via https://{D}{PATH})" in v.reason
        # The referenced host was asked with its own name (and verified for it: its
        # certificate names only hosting.example).
        assert hosting.requests[0].headers["host"] == HOSTING

    run([web, hosting], body)


def test_a_reference_to_a_reference_is_refused(tmp_path):
    web = PoshServer(tmp_path)
    hosting = PoshServer(tmp_path, names=[HOSTING])
    web.serve_document(reference(f"https://{HOSTING}/one.json"))
    hosting.serve_document(reference(f"https://{HOSTING}/two.json"), path="/one.json")
    hosting.serve_document(document(XMPP_CERT), path="/two.json")

    async def body():
        posh = await fetcher_for((D, web), (HOSTING, hosting)).fetch(D, trust=TRUST)
        assert posh.status is PoshStatus.FAILED and "only one reference is followed" in posh.reason
        assert [r.path for r in hosting.requests] == ["/one.json"]
        v = decide([XMPP_CERT], NO_TLSA, Policy(require="posh"), trust=TRUST, posh=posh)
        assert not v.accepted

    run([web, hosting], body)


def test_http_redirect_is_not_followed(tmp_path):
    web = PoshServer(tmp_path)
    hosting = PoshServer(tmp_path, names=[HOSTING])
    web.routes[PATH] = Reply(301, headers=(("Location", f"https://{HOSTING}{PATH}"),))
    hosting.serve_document(document(XMPP_CERT))

    async def body():
        posh = await fetcher_for((D, web), (HOSTING, hosting)).fetch(D, trust=TRUST)
        assert posh.status is PoshStatus.FAILED
        assert f"answered HTTP 301 (redirect to https://{HOSTING}{PATH}); not followed" in posh.reason
        assert hosting.requests == []

    run([web, hosting], body)


@pytest.mark.parametrize("case,status,words", [
    ("404", PoshStatus.ABSENT, f"no POSH document at https://{D}{PATH} (HTTP 404)"),
    ("500", PoshStatus.FAILED, "answered HTTP 500"),
    ("malformed JSON", PoshStatus.FAILED, f"malformed POSH document at https://{D}{PATH}: not JSON"),
    ("not a POSH document", PoshStatus.FAILED, "neither 'fingerprints' nor 'url'"),
    ("http url reference", PoshStatus.FAILED, "not an https URL"),
    ("missing referenced document", PoshStatus.FAILED, "which is missing (HTTP 404)"),
    ("oversized", PoshStatus.FAILED, "over the 64 KiB limit"),
    ("oversized, announced", PoshStatus.FAILED, "document of 10000000 bytes is over the 64 KiB limit"),
    ("garbage HTTP", PoshStatus.FAILED, "bad HTTP response"),
    ("cut short", PoshStatus.FAILED, "bad HTTP response"),
    ("HTTPS certificate for another name", PoshStatus.FAILED, "certificate does not verify (Hostname mismatch"),
    ("HTTPS certificate from an unknown CA", PoshStatus.FAILED, "certificate does not verify (unable to get local issuer"),
    ("unreachable", PoshStatus.FAILED, "cannot connect for https://"),
    ("no trust store", PoshStatus.FAILED, "no PKIX trust store configured"),
    ("timeout", PoshStatus.TIMEOUT, f"no POSH document within 0.5 s (waiting for the HTTP response from https://{D}{PATH})"),
])
def test_failures_are_statuses_with_reasons_and_reject(tmp_path, case, status, words):
    names = {"HTTPS certificate for another name": [HOSTING]}.get(case, [D])
    web = PoshServer(tmp_path, names=names, ca=STRANGER_CA if "unknown CA" in case else CA)
    trust = None if case == "no trust store" else TRUST
    reply = {
        "500": Reply(500, b"oops"),
        "malformed JSON": Reply(body=b"{'fingerprints': []}"),
        "not a POSH document": Reply(body=b'{"keys": []}'),
        "http url reference": Reply(body=reference(f"http://{HOSTING}/x.json")),
        "missing referenced document": Reply(body=reference(f"https://{D}/elsewhere.json")),
        "oversized": Reply(raw=b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b" " * (MAX_BODY_BYTES + 1)),
        "oversized, announced": Reply(raw=b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n{}"),
        "garbage HTTP": Reply(raw=b"SMTP ready\r\n\r\n"),
        "cut short": Reply(raw=b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{\"fing"),
        "timeout": Reply(hang=True),
    }.get(case, Reply(body=document(XMPP_CERT)))
    if case != "404":
        web.routes[PATH] = reply

    async def body():
        port = web.port
        if case == "unreachable":
            closed = trio.socket.socket()        # bound, never listening: connection refused
            await closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        fetcher = PoshFetcher(None, overrides={D: (web.address if case != "unreachable" else "127.0.0.1", port)},
                              timeout=0.5 if case == "timeout" else 5.0)
        posh = await fetcher.fetch(D, trust=trust)
        assert posh.status is status and words in posh.reason, posh.reason
        v = decide([XMPP_CERT], NO_TLSA, Policy(require="posh"), trust=TRUST, posh=posh)
        assert not v.accepted and f"POSH: {status}: " in v.reason and words in v.reason, v.reason
        # Nothing but a timeout is even briefly remembered.
        assert (fetcher.cached(D, TRUST) is not None) == (status is not PoshStatus.TIMEOUT and trust is not None)

    run([web], body)


def test_failures_are_remembered_for_seconds_and_timeouts_not_at_all(tmp_path):
    web = PoshServer(tmp_path)
    web.routes[PATH] = Reply(hang=True)

    async def body():
        clock = FakeClock()
        fetcher = fetcher_for((D, web), timeout=0.5, clock=clock)
        assert (await fetcher.fetch(D, trust=TRUST)).status is PoshStatus.TIMEOUT
        web.routes[PATH] = Reply(500)
        assert (await fetcher.fetch(D, trust=TRUST)).status is PoshStatus.FAILED
        assert (await fetcher.fetch(D, trust=TRUST)).from_cache          # within 5 s: remembered
        clock.now += 5
        web.serve_document(document(XMPP_CERT))
        assert (await fetcher.fetch(D, trust=TRUST)).ok
        assert len(web.requests) == 3 and fetcher.stats == {"timeout": 1, "failed": 1, "ok": 1}

    run([web], body)


def test_concurrent_streams_share_one_fetch(tmp_path):
    web = PoshServer(tmp_path)
    web.serve_document(document(XMPP_CERT, expires=0))

    async def body():
        fetcher = fetcher_for((D, web))
        results = []

        async def one():
            results.append(await fetcher.fetch(D, trust=TRUST))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(one)
        assert len(results) == 5 and all(r.ok for r in results)
        assert len(web.requests) == 1

    run([web], body)


def test_decide_with_posh_fetches_only_when_the_verdict_depends_on_it(tmp_path):
    web = PoshServer(tmp_path)
    web.serve_document(document(XMPP_CERT))

    async def body():
        fetcher = fetcher_for((D, web))
        # PKIX already accepts: no fetch.
        v, posh = await decide_with_posh(PKIX_GOOD.chain, NO_TLSA, Policy(posh=True), trust=TRUST, fetcher=fetcher)
        assert v.prooftype == "pkix" and posh is None
        # Usable secure TLSA that do not match: DANE decides, no fetch, reject.
        v, posh = await decide_with_posh([XMPP_CERT], SECURE_TLSA_OTHER, Policy(posh=True), trust=TRUST,
                                         fetcher=fetcher)
        assert not v.accepted and posh is None and "no fallback to PKIX" in v.reason
        # The policy does not use POSH: no fetch.
        v, posh = await decide_with_posh([XMPP_CERT], NO_TLSA, Policy(), trust=TRUST, fetcher=fetcher)
        assert not v.accepted and posh is None
        assert web.requests == []
        # PKIX fails and posh = true: fetched, and the match accepts.
        v, posh = await decide_with_posh([XMPP_CERT], NO_TLSA, Policy(posh=True), trust=TRUST, fetcher=fetcher)
        assert v.prooftype == "posh" and posh.ok and len(web.requests) == 1

    run([web], body)


def test_web_server_address_comes_from_the_validating_resolver(tmp_path, dns_env):
    """No override: D's A record (published in the signed test zone) is where the fetch goes."""
    domain = dns_env.fresh(dns_env.insecure, "posh")
    web = PoshServer(tmp_path, names=[domain])
    web.serve_document(document(XMPP_CERT))

    async def body():
        dns_env.publish(None, domain, "A", web.address)
        fetcher = PoshFetcher(dns_env.resolver(), https_port=web.port)
        posh = await fetcher.fetch(domain, trust=TRUST)
        assert posh.ok and posh.url == f"https://{domain}{PATH}", posh.reason
        nowhere = await fetcher.fetch(dns_env.fresh(dns_env.insecure, "none"), trust=TRUST)
        assert nowhere.status is PoshStatus.FAILED and "has no A/AAAA record" in nowhere.reason
        bogus = dns_env.fresh(dns_env.bogus, "posh")
        dns_env.publish(None, bogus, "A", web.address)
        broken = await fetcher.fetch(bogus, trust=TRUST)
        assert broken.status is PoshStatus.FAILED and "address lookup for" in broken.reason and "bogus" in broken.reason

    run([web], body)


def test_shared_fetcher_is_one_per_resolver():
    from policy.dns import Resolver

    a, b = Resolver(["127.0.0.1"]), Resolver(["127.0.0.1"])
    assert shared_fetcher(a) is shared_fetcher(a) and shared_fetcher(a) is not shared_fetcher(b)
    assert shared_fetcher(a).resolver is a


# =============================================================================== the proxy's paths


def test_outbound_posh_accepts_a_pkix_invalid_peer_and_dane_still_decides(tmp_path, dns_env):
    """connect_peer (the outbound proxy's verdict): `posh = true` under dane-or-pkix."""
    from proxy.connect import PeerUnreachable, TlsContexts, connect_peer
    from test_outbound import StandInPeer

    plain = dns_env.fresh(dns_env.insecure, "po")      # no DNSSEC: PKIX (or POSH) must decide
    danish = dns_env.fresh(dns_env.secure, "pd")       # secure TLSA for another key: DANE decides
    issued = self_signed(["xmpp.hosting.example"])
    peer = StandInPeer(plain, issued, tmp_path)
    peer2 = StandInPeer(danish, issued, tmp_path)
    web = PoshServer(tmp_path, names=[plain, danish])
    web.serve_document(document(issued.cert))
    policy = Policy(posh=True, source="test")

    async def body():
        dns_env.publish_xmpp(plain, f"xmpp.{plain}", peer.port, peer.address, None)
        dns_env.publish_xmpp(danish, f"xmpp.{danish}", peer2.port, peer2.address, OTHER_CERT)
        fetcher = PoshFetcher(None, overrides={plain: (web.address, web.port), danish: (web.address, web.port)})
        kwargs = dict(resolver=dns_env.resolver(), policy=policy, trust=TRUST, contexts=TlsContexts(),
                      local_domain=None, timeout=TIMEOUT, posh=fetcher)
        conn = await connect_peer(plain, **kwargs)
        try:
            assert conn.attempt.verdict.prooftype == "posh", conn.attempt.verdict.reason
            assert conn.attempt.posh.ok and "PKIX: chain does not verify" in conn.attempt.verdict.reason
        finally:
            await conn.stream.aclose()
        with pytest.raises(PeerUnreachable) as info:
            await connect_peer(danish, **kwargs)
        assert "no fallback to PKIX" in info.value.reason and info.value.attempts[0].posh is None
        assert len(web.requests) == 1          # DANE decided the second domain without POSH

    run([web, peer, peer2], body)


def test_check_shows_the_posh_document_and_the_verdict(tmp_path, dns_env):
    from proxy.check import run_check
    from test_check import _config
    from test_outbound import StandInPeer

    domain = dns_env.fresh(dns_env.insecure, "pc")
    issued = self_signed(["xmpp.hosting.example"])
    peer = StandInPeer(domain, issued, tmp_path)
    web = PoshServer(tmp_path, names=[domain])
    web.serve_document(document(issued.cert, algorithms=("sha-256", "sha-512"), expires=0))
    ca_file = tmp_path / "posh-ca.pem"
    CA.write_root(ca_file)
    config = _config(tmp_path, dns_env, ca_file=ca_file, policies={f"{domain}.toml": 'require = "posh"\n'})
    outputs = []

    async def body():
        dns_env.publish_xmpp(domain, f"xmpp.{domain}", peer.port, peer.address, None)
        fetcher = PoshFetcher(None, overrides={domain: (web.address, web.port)})
        for as_json in (False, True):
            out = io.StringIO()
            outputs.append((await run_check(domain, config=config, as_json=as_json, out=out, posh=fetcher),
                            out.getvalue()))

    run([web, peer], body)
    (code, text), (json_code, json_text) = outputs
    assert code == 0 and json_code == 0, text
    assert 'POSH (RFC 7711): required (require = "posh")' in text
    assert f"https://{domain}{PATH}" in text and "ok: 1 certificate fingerprint" in text and "not cached" in text
    assert "fingerprint sha-512:" in text and "POSH       leaf matches sha-512:" in text
    assert "verdict    ACCEPT (posh)" in text
    obj = json.loads(json_text)
    assert obj["posh"]["status"] == "ok" and obj["posh"]["use"].startswith("required")
    assert obj["targets"][0]["posh_match"].startswith("sha-512:")
    assert obj["targets"][0]["verdict"]["prooftype"] == "posh"


class _EvidenceWithPosh:
    """An injected `evidence_for` (no TLSA) that carries a POSH fetcher, as dns_evidence does."""

    def __init__(self, posh: PoshFetcher) -> None:
        self.posh = posh

    async def __call__(self, domain: str, policy) -> Evidence:
        return Evidence(domain)


@pytest.mark.parametrize("served,accepted", [("match", True), ("mismatch", False), ("absent", False)])
def test_inbound_dialback_with_posh(world, tmp_path, served, accepted):  # noqa: F811
    """A peer presenting a self-signed certificate (PKIX-invalid) asserts a.example; its policy
    has `posh = true`; a.example's web server publishes the certificate's fingerprint (or
    another one, or nothing)."""
    from test_inbound_openssl import PEER, FakeBackend, Peer, db_result, make_config, running_proxy

    web = PoshServer(tmp_path, names=[PEER], ca=world.ca)
    if served != "absent":
        web.serve_document(document(world.peer_self.issued.cert if served == "match" else OTHER_CERT))
    answers = []

    async def body():
        fetcher = PoshFetcher(None, overrides={PEER: (web.address, web.port)})
        async with FakeBackend().running() as backend:
            config = make_config(world, f"127.0.0.1:{backend.port}", tmp_path, policies={PEER: "posh = true\n"})
            async with running_proxy(config, evidence_for=_EvidenceWithPosh(fetcher)) as listening:
                peer = await Peer.connect(listening.inbound[0][1])
                await peer.negotiate(world.peer_self)
                await peer.send(db_result())
                answers.append(await peer.expect(object))
                await peer.aclose()
            answers.append(bytes(backend.connections[0].received) if backend.connections else b"")

    run([web], body)
    result, backend_got = answers
    assert result.attrs.get("type") == ("valid" if accepted else "error"), result.raw
    assert (db_result() in backend_got) == accepted
    assert len(web.requests) == 1


def test_verify_with_a_posh_file(tmp_path, cli):
    chain = tmp_path / "peer.pem"
    chain.write_bytes(XMPP_CERT.public_bytes(Encoding.PEM))
    good, bad, ref = tmp_path / "good.json", tmp_path / "bad.json", tmp_path / "ref.json"
    good.write_bytes(document(XMPP_CERT))
    bad.write_bytes(document(OTHER_CERT))
    ref.write_bytes(reference(f"https://{HOSTING}/x.json"))
    code, out, _ = cli("verify", "--chain", chain, "--domain", D, "--require", "posh", "--posh-file", good, "--json")
    obj = json.loads(out)
    assert code == 0 and obj["prooftype"] == "posh" and f"fingerprint at {good}" in obj["reason"]
    code, out, _ = cli("verify", "--chain", chain, "--domain", D, "--posh", "--posh-file", bad, "--json")
    assert code == 1 and "; POSH: leaf certificate matches none" in json.loads(out)["reason"]
    code, _, err = cli("verify", "--chain", chain, "--domain", D, "--require", "posh", "--posh-file", ref)
    assert code == 2 and "give the referenced document" in err
    code, out, _ = cli("verify", "--chain", chain, "--domain", D, "--require", "posh")
    assert code == 1 and "POSH: not consulted" in out
