"""proxy.metrics: scraped over real HTTP on loopback, the text parsed and checked line by line."""
from __future__ import annotations

import math
import re
import urllib.error
import urllib.request

import pytest
import trio

from pki import TestCA
from policy.decide import decide
from policy.evidence import DnsStatus, Evidence
from policy.pkix import TrustStore
from policy.policyfile import Policy
from policy.tlsa import record_for
from proxy import metrics as metrics_mod
from proxy.metrics import Metrics, open_metrics_listeners, reason_category, serve_metrics

# --- a parser for the text exposition format 0.0.4, independent of prometheus_client -------

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)",?')


def _unescape(v: str) -> str:
    return re.sub(r'\\(.)', lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], v)


def parse_exposition(text: str):
    """({name: type}, {name: help}, {(name, frozenset(labels)): value}); asserts well-formedness."""
    types, helps, samples = {}, {}, {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, doc = line[7:].partition(" ")
            helps[name] = doc
        elif line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped")
            types[name] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            labels = {}
            if m.group(2):
                pos = 0
                for lm in _LABEL.finditer(m.group(2)):
                    assert lm.start() == pos, f"bad label syntax in {line!r}"
                    labels[lm.group(1)] = _unescape(lm.group(2))
                    pos = lm.end()
                assert pos == len(m.group(2)), f"bad label syntax in {line!r}"
            key = (m.group(1), frozenset(labels.items()))
            assert key not in samples, f"duplicate sample {line!r}"
            samples[key] = float(m.group(3))
    return types, helps, samples


def value(samples, name, **labels):
    return samples[(name, frozenset(labels.items()))]


# --- serving ----------------------------------------------------------------------------------

def with_server(test, m: Metrics | None = None):
    """Run `test(m, port)` (async) against a metrics endpoint on a free loopback port."""
    m = m or Metrics()

    async def main():
        listeners = await open_metrics_listeners("127.0.0.1:0")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_metrics, m, listeners)
            await test(m, port)
            nursery.cancel_scope.cancel()

    trio.run(main)


async def http_get(port: int, path: str = "/metrics", method: str = "GET", headers=None):
    """A real HTTP client (urllib) run in a worker thread; returns (status, headers, body)."""

    def fetch():
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    return await trio.to_thread.run_sync(fetch)


async def raw_exchange(port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        out = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                out += chunk
    return out


def test_scrape_counts_every_metric_family():
    async def test(m: Metrics, port: int):
        m.connection_opened("inbound")
        m.connection_opened("inbound")
        m.connection_closed("inbound", "ok")
        m.connection_opened("outbound")
        m.connection_closed("outbound", "remote-connection-failed")
        m.connection_opened("outbound")
        m.connection_closed("outbound", "made-up-outcome")      # bounded: counted as internal-error
        m.dns_lookup("TLSA", "secure")
        m.dns_lookup("tlsa", DnsStatus.BOGUS)
        m.dns_lookup("SRV", "secure", cached=True)
        m.dns_lookup("MX", "insecure")                           # bounded: rrtype "other"
        for s in (0.003, 0.04, 0.04, 7.0, 31.0):
            m.handshake("inbound", s)
        m.relayed("inbound", "peer", 1000)
        m.relayed("inbound", "backend", 250)
        m.relayed("inbound", "peer", 24)
        m.reload_result(True, when=1700000000.0)
        m.certificates({"example.org": 1800000000.0})

        status, headers, body = await http_get(port)
        assert status == 200
        assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        types, helps, samples = parse_exposition(body.decode())

        P = "xmpp_dane_proxy_"
        assert types[P + "connections_total"] == "counter"
        assert types[P + "connections_open"] == "gauge"
        assert types[P + "handshake_seconds"] == "histogram"
        assert types[P + "relayed_bytes_total"] == "counter"
        assert all(helps[n] for n in types)
        assert value(samples, P + "connections_total", direction="inbound", outcome="ok") == 1
        assert value(samples, P + "connections_total", direction="outbound", outcome="remote-connection-failed") == 1
        assert value(samples, P + "connections_total", direction="outbound", outcome="internal-error") == 1
        assert value(samples, P + "connections_total", direction="inbound", outcome="not-authorized") == 0
        assert value(samples, P + "connections_open", direction="inbound") == 1
        assert value(samples, P + "connections_open", direction="outbound") == 0
        assert value(samples, P + "dns_lookups_total", rrtype="TLSA", status="secure", source="resolver") == 1
        assert value(samples, P + "dns_lookups_total", rrtype="TLSA", status="bogus", source="resolver") == 1
        assert value(samples, P + "dns_lookups_total", rrtype="SRV", status="secure", source="cache") == 1
        assert value(samples, P + "dns_lookups_total", rrtype="other", status="insecure", source="resolver") == 1
        # Histogram: cumulative buckets, +Inf == count, sum of observations.
        h = P + "handshake_seconds"
        assert value(samples, h + "_bucket", direction="inbound", le="0.005") == 1
        assert value(samples, h + "_bucket", direction="inbound", le="0.05") == 3
        assert value(samples, h + "_bucket", direction="inbound", le="10.0") == 4
        assert value(samples, h + "_bucket", direction="inbound", le="30.0") == 4
        assert value(samples, h + "_bucket", direction="inbound", le="+Inf") == 5
        assert value(samples, h + "_count", direction="inbound") == 5
        assert math.isclose(value(samples, h + "_sum", direction="inbound"), 38.083)
        assert value(samples, h + "_count", direction="outbound") == 0
        assert value(samples, P + "relayed_bytes_total", direction="inbound", source="peer") == 1024
        assert value(samples, P + "relayed_bytes_total", direction="inbound", source="backend") == 250
        assert value(samples, P + "config_reloads_total", result="success") == 1
        assert value(samples, P + "config_last_reload_successful") == 1
        assert value(samples, P + "config_last_reload_success_timestamp_seconds") == 1700000000.0
        assert value(samples, P + "certificate_expiry_timestamp_seconds", domain="example.org") == 1800000000.0
        assert value(samples, P + "build_info", version="0.1.0") == 1
        # Process metrics under their standard names; no _created clutter.
        assert ("process_open_fds", frozenset()) in samples
        assert not any(name.endswith("_created") for name, _ in samples)

    with_server(test)


def test_label_values_are_escaped():
    async def test(m: Metrics, port: int):
        m.certificates({'we"ird\\name\nx': 1.0})
        _, _, body = await http_get(port)
        assert b'domain="we\\"ird\\\\name\\nx"' in body
        _, _, samples = parse_exposition(body.decode())
        assert value(samples, "xmpp_dane_proxy_certificate_expiry_timestamp_seconds", domain='we"ird\\name\nx') == 1.0

    with_server(test)


def test_openmetrics_on_request_and_head():
    async def test(m: Metrics, port: int):
        status, headers, body = await http_get(port, headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert status == 200
        assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
        assert body.endswith(b"# EOF\n")
        status, headers, body = await http_get(port, method="HEAD")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 1000

    with_server(test)


def test_http_errors():
    async def test(m: Metrics, port: int):
        status, _, body = await http_get(port, "/")
        assert status == 404 and b"/metrics" in body
        status, _, _ = await http_get(port, "/metrics/extra")
        assert status == 404
        status, headers, _ = await http_get(port, method="POST")
        assert status == 405 and headers["Allow"] == "GET, HEAD"
        assert (await raw_exchange(port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        assert (await raw_exchange(port, b"GET /metrics HTTP/1.1\r\nX: \xff\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        assert (await raw_exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nX: \xff\r\n\r\n")).startswith(
            b"HTTP/1.1 400 ")
        # RFC 9112 §3.2: an HTTP/1.1 request without Host is answered 400; HTTP/1.0 needs none.
        assert (await raw_exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        reply = await raw_exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200 ") and b"xmpp_dane_proxy_build_info" in reply
        huge = b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 20000 + b"\r\n\r\n"
        assert (await raw_exchange(port, huge)).startswith(b"HTTP/1.1 431 ")
        # Query strings are ignored, as Prometheus' own exporters do.
        status, _, _ = await http_get(port, "/metrics?name[]=x")
        assert status == 200

    with_server(test)


def test_slow_client_times_out(monkeypatch):
    monkeypatch.setattr(metrics_mod, "REQUEST_TIMEOUT", 0.3)

    async def test(m: Metrics, port: int):
        start = trio.current_time()
        reply = await raw_exchange(port, b"GET /metrics HTTP/1.1\r\n")   # head never completed
        assert reply.startswith(b"HTTP/1.1 408 ")
        assert trio.current_time() - start >= 0.3

    with_server(test)


def test_concurrent_scrapes_are_bounded():
    async def test(m: Metrics, port: int):
        n = metrics_mod.MAX_CONCURRENT_SCRAPES + 1
        streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(n)]
        for s in streams:
            await s.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")   # incomplete: holds a slot
        first: list[tuple[int, bytes]] = []
        refused = trio.Event()

        async def watch(i, s):
            data = await s.receive_some(65536)
            first.append((i, data))
            refused.set()

        async with trio.open_nursery() as nursery:
            for i, s in enumerate(streams):
                nursery.start_soon(watch, i, s)
            with trio.fail_after(10):
                await refused.wait()
            nursery.cancel_scope.cancel()
        assert len(first) == 1 and first[0][1].startswith(b"HTTP/1.1 503 ")
        statuses = []
        for i, s in enumerate(streams):
            if i == first[0][0]:
                continue
            await s.send_all(b"\r\n")
            data = b""
            with trio.fail_after(10):
                while chunk := await s.receive_some(65536):
                    data += chunk
            statuses.append(data.split(b" ", 2)[1])
        assert statuses == [b"200"] * (n - 1)
        for s in streams:
            await s.aclose()

    with_server(test)


def test_metrics_listen_disabled():
    assert trio.run(open_metrics_listeners, "") == []


# --- reason categories, from real decisions ---------------------------------------------------

@pytest.fixture(scope="module")
def peer():
    ca = TestCA()
    return ca, ca.issue(dns=["example.net"]), TrustStore((ca.root.cert,), "test CA")


def _decide(chain, *, require="dane-or-pkix", tlsa=(), tlsa_status=DnsStatus.SECURE, statuses=None, trust):
    ev = Evidence("example.net", tlsa=tuple(tlsa), tlsa_status=tlsa_status, statuses=statuses or {})
    return decide(chain, ev, Policy(require=require, source="test"), trust=trust)


def test_reason_categories_of_real_verdicts(peer):
    ca, leaf, trust = peer
    chain = leaf.chain
    other = TestCA("Other").issue(dns=["example.net"])
    wrong_name = ca.issue(dns=["other.example"])
    cases = {
        "accepted": _decide(chain, tlsa=[record_for(leaf.cert)], trust=trust),
        "dane-mismatch": _decide(chain, tlsa=[record_for(other.cert)], trust=trust),
        "blocked": _decide(chain, require="block", trust=trust),
        "dnssec-bogus": _decide(chain, statuses={"SRV _xmpp-server._tcp.example.net": DnsStatus.BOGUS}, trust=trust),
        "dns-timeout": _decide(chain, tlsa_status=DnsStatus.TIMEOUT, trust=trust),
        "no-tlsa": _decide(chain, require="dane", tlsa_status=DnsStatus.INSECURE, trust=trust),
        "pkix-invalid": _decide(other.chain, tlsa_status=None, trust=trust),
        "name-mismatch": _decide(wrong_name.chain, tlsa_status=None, trust=trust),
        "no-certificate": _decide([], tlsa_status=None, trust=trust),
    }
    got = {want: reason_category(v) for want, v in cases.items()}
    assert got == {want: want for want in cases}, {w: cases[w].reason for w in cases if got[w] != w}
    assert cases["accepted"].prooftype == "dane-ee"
    # And counted under those labels, accepted ones with their prooftype.
    m = Metrics(process_metrics=False)
    for v in cases.values():
        m.verdict("inbound", v)
    _, _, samples = parse_exposition(m.exposition()[0].decode())
    name = "xmpp_dane_proxy_verdicts_total"
    assert value(samples, name, direction="inbound", verdict="accept", prooftype="dane-ee", reason="accepted") == 1
    assert value(samples, name, direction="inbound", verdict="reject", prooftype="-", reason="dane-mismatch") == 1
    reasons = {dict(lbl)["reason"] for n, lbl in samples if n == name}
    assert reasons <= set(metrics_mod.REASON_CATEGORIES)
