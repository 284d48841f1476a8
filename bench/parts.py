#!/usr/bin/env python3
"""In-process cost of the proxy's parts, without sockets: where `bench/run.py`'s figures go.

    python3 bench/parts.py [--quick]

- the XML framing alone (`proxy.xmlstream.XmlStreamParser.feed`), beside bare expat;
- the inbound protocol in the relay state (`proxy.inbound_session.InboundSession.peer_data`: framing +
  the per-stanza from/to check + building the actions), fed TLS-record-sized chunks;
- one verdict with a warm DNS cache: policy lookup, the proxy's `evidence_for`
  (`proxy.server.dns_evidence` -> `policy.peer_evidence.gather`) against the test resolver
  (nsd + unbound from tests/dnsenv.py), `policy.decide.decide`; with the peer's evidence in DNS
  and in the policy file.

Each figure is the best of a few rounds (the least disturbed by other work on the machine),
pinned to core 0.  Use it to check an optimisation quickly; `bench/run.py` is the comparison
that counts.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import xml.parsers.expat as expat
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests"), str(HERE)]

from loadclient import DB_RESULT, HEADER, LOCAL, PEER, STARTTLS, stanza  # noqa: E402

RECORD = 16384        # a TLS record's worth of plaintext: what one SSL_read returns


def best_of(rounds: int, fn) -> float:
    return min(fn() for _ in range(rounds))


def data_for(size: int, total: int) -> tuple[bytes, int]:
    blob = b"".join(stanza(size, i) for i in range(max(1, 65536 // size)))
    data = blob * max(1, total // len(blob))
    return data, len(data) // size


def framing(size: int, total: int, rounds: int) -> float:
    from proxy.xmlstream import XmlStreamParser

    data, n = data_for(size, total)

    def once() -> float:
        parser = XmlStreamParser()
        parser.feed(HEADER)
        started = time.perf_counter()
        for i in range(0, len(data), RECORD):
            parser.feed(data[i:i + RECORD])
        return (time.perf_counter() - started) / n
    return best_of(rounds, once)


def bare_expat(size: int, total: int, rounds: int) -> float:
    data, n = data_for(size, total)

    def once() -> float:
        p = expat.ParserCreate(encoding="UTF-8", namespace_separator=" ")
        p.Parse(HEADER, False)
        started = time.perf_counter()
        for i in range(0, len(data), RECORD):
            p.Parse(data[i:i + RECORD], False)
        return (time.perf_counter() - started) / n
    return best_of(rounds, once)


def relay_session():
    """An `InboundSession` driven, in memory, to the relay state with PEER -> LOCAL authenticated."""
    from proxy.inbound_session import InboundSession
    from proxy.tls import TlsInfo

    s = InboundSession([LOCAL])
    s.peer_data(HEADER)
    s.peer_data(STARTTLS)
    s.tls_established(TlsInfo("1.3", "TLSv1.3", "TLS_AES_256_GCM_SHA384", None, LOCAL, ()))
    s.peer_data(HEADER)
    s.backend_connected()
    s.backend_data(b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                   b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
                   b"id='b1' from='" + LOCAL.encode() + b"' version='1.0'><stream:features/>")
    s.peer_data(DB_RESULT)
    s.verdict(PEER, LOCAL, True, "accepted for the benchmark")
    s.backend_data(f"<db:result from='{LOCAL}' to='{PEER}' type='valid'/>".encode())
    if not s.authenticated:
        raise RuntimeError(f"could not drive InboundSession to the relay state (state {s.state})")
    return s


def session(size: int, total: int, rounds: int) -> float:
    data, n = data_for(size, total)

    def once() -> float:
        s = relay_session()
        relayed = 0
        started = time.perf_counter()
        for i in range(0, len(data), RECORD):
            for action in s.peer_data(data[i:i + RECORD]):
                relayed += len(getattr(action, "data", b""))
        elapsed = time.perf_counter() - started
        if relayed != len(data):
            raise RuntimeError(f"the session relayed {relayed} of {len(data)} bytes")
        return elapsed / n
    return best_of(rounds, once)


def verdict_path(count: int, rounds: int) -> dict[str, dict]:
    """One verdict with a warm cache, the way the proxy gets it: `PolicySet.for_domain`, the
    production `evidence_for` (`proxy.server.dns_evidence`), `decide` — for the peer's
    evidence from DNS and from a policy file with static tlsa/srv."""
    import trio
    from cryptography import x509

    from dnsenv import dns_environment
    from policy.decide import decide
    from policy.dns import Resolver
    from policy.pkix import TrustStore
    from policy.policyfile import PolicySet
    from proxy.server import dns_evidence
    from run import EVIDENCE_MODES, make_pki, publish_peer, write_proxy_config

    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="xdp-parts-") as tmp, dns_environment() as env:
        workdir = Path(tmp)
        world = make_pki(workdir)
        publish_peer(env, world)
        trust = TrustStore.load(str(world.root))
        chain = x509.load_pem_x509_certificates(world.peer_cert.read_bytes())
        for mode in EVIDENCE_MODES:
            write_proxy_config(world, 1, env.resolver_address, mode)
            policies = PolicySet.load(workdir / "policy.d")
            evidence_for = dns_evidence(Resolver([env.resolver_address]))

            async def main() -> dict:
                policy = policies.for_domain(PEER)
                evidence = await evidence_for(PEER, policy)      # fills the cache
                verdict = decide(chain, evidence, policy, trust=trust)
                if not verdict.accepted:
                    raise RuntimeError(f"benchmark peer rejected ({mode}): {verdict.reason}")
                best = {"policy": float("inf"), "evidence": float("inf"), "decide": float("inf")}
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    for _ in range(count):
                        policies.for_domain(PEER)
                    t1 = time.perf_counter()
                    for _ in range(count):
                        evidence = await evidence_for(PEER, policy)
                    t2 = time.perf_counter()
                    for _ in range(count):
                        decide(chain, evidence, policy, trust=trust)
                    t3 = time.perf_counter()
                    for key, seconds in (("policy", t1 - t0), ("evidence", t2 - t1), ("decide", t3 - t2)):
                        best[key] = min(best[key], seconds / count)
                best["statuses"] = {k: v.value for k, v in evidence.statuses.items()}
                return best

            out[mode] = trio.run(main)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="in-process cost of the proxy's parts")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    os.sched_setaffinity(0, {0})
    total, rounds, count = (5_000_000, 2, 200) if args.quick else (30_000_000, 3, 1000)
    print("per stanza, fed in 16 KiB chunks (best of %d):" % rounds)
    for size in (1024, 65536):
        b = bare_expat(size, total, rounds)
        f = framing(size, total, rounds)
        s = session(size, total, rounds)
        print(f"  {size:>6} B stanzas: bare expat {1e6 * b:7.2f} µs | XmlStreamParser.feed {1e6 * f:7.2f} µs"
              f" | InboundSession.peer_data (relay) {1e6 * s:7.2f} µs")
    for mode, v in verdict_path(count, rounds).items():
        print(f"one verdict, evidence from {mode} (warm cache): policy lookup {1e6 * v['policy']:.1f} µs, "
              f"evidence_for {1e6 * v['evidence']:.1f} µs, decide {1e6 * v['decide']:.1f} µs")
        print(f"  evidence: {v['statuses']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
