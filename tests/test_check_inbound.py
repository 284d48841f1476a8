"""`xmpp-dane-proxy check D --inbound [--cert CHAIN]` agrees with the running proxy.

For every inbound scenario shape of the inbound tests (tests/test_inbound_openssl.py,
tests/test_inbound_prosody.py: DANE-EE match and mismatch, DANE-TA, bogus TLSA, bogus zone,
PKIX, wrong name, no certificate, blocked, require=dane without TLSA, static policy TLSA,
require=tls) and the shapes where inbound and outbound rules differ (a second target's TLSA,
a bogus second target, SRV "." with `_5269._tcp.D`), the real proxy (production DNS evidence
through nsd + unbound) judges a scripted peer presenting a chain, and `check --inbound` judges
the same chain: the verdict, prooftype, matched record, reason and reason category must be the
same.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import trio

from pki import self_signed
from policy.tlsa import record_for
from proxy.check import run_check
from proxy.config import DnsConfig
from proxy.metrics import reason_category
from test_inbound_openssl import FakeBackend, Peer, db_result, make_config, running_proxy, world  # noqa: F401
from test_tls import write_identity


@dataclass
class Shape:
    """DNS published, policy files and the identity the peer presents (None: no certificate)."""

    domain: str
    identity: object | None
    policies: dict[str, str]
    expect: tuple[str, str]          # (verdict, reason category), to keep each scenario honest


def _shape_dane_ee_match(env, w, tmp):
    d = env.fresh(env.secure, "ia")
    ident = write_identity(self_signed([d]), tmp, "ia")
    env.publish_xmpp(d, f"xmpp.{d}", 5269, "127.0.0.1", ident.issued.cert)
    return Shape(d, ident, {}, ("accept", "accepted"))


def _shape_dane_ee_mismatch(env, w, tmp):
    d = env.fresh(env.secure, "ib")
    ident = write_identity(self_signed([d]), tmp, "ib")
    env.publish_xmpp(d, f"xmpp.{d}", 5269, "127.0.0.1", self_signed([d]).cert)
    return Shape(d, ident, {}, ("reject", "dane-mismatch"))


def _shape_dane_ta(env, w, tmp):
    d = env.fresh(env.secure, "ic")
    inter = w.ca.intermediate("Inbound check CA")
    ident = write_identity(inter.issue(dns=[d]), tmp, "ic")
    env.publish_xmpp(d, f"xmpp.{d}", 5269, "127.0.0.1", inter.cert, "2 1 1")
    return Shape(d, ident, {}, ("accept", "accepted"))


def _shape_bogus_tlsa(env, w, tmp):
    d = env.fresh(env.secure, "id")
    ident = write_identity(self_signed([d]), tmp, "id")
    with env.batch():
        env.publish_xmpp(d, f"xmpp.{d}", 5269, "127.0.0.1", None)
        env.publish(None, f"_5269._tcp.xmpp.{d}", "TLSA", str(record_for(ident.issued.cert)), broken_signature=True)
    return Shape(d, ident, {}, ("reject", "dnssec-bogus"))


def _shape_bogus_zone(env, w, tmp):
    d = env.fresh(env.bogus, "ie")
    ident = write_identity(self_signed([d]), tmp, "ie")
    env.publish_xmpp(d, f"xmpp.{d}", 5269, "127.0.0.1", ident.issued.cert)
    return Shape(d, ident, {}, ("reject", "dnssec-bogus"))


def _shape_insecure_pkix(env, w, tmp):
    d = env.fresh(env.insecure, "if")
    ident = write_identity(w.ca.issue(dns=[d]), tmp, "if")
    env.publish_xmpp(d, f"xmpp.{d}", 5269, "127.0.0.1", None)
    return Shape(d, ident, {}, ("accept", "accepted"))


def _shape_pkix_wrong_name(env, w, tmp):
    d = env.fresh(env.insecure, "ig")
    ident = write_identity(w.ca.issue(dns=["someone-else.example"]), tmp, "ig")
    return Shape(d, ident, {}, ("reject", "name-mismatch"))


def _shape_no_certificate(env, w, tmp):
    d = env.fresh(env.secure, "ih")
    env.publish_xmpp(d, f"xmpp.{d}", 5269, "127.0.0.1", self_signed([d]).cert)
    return Shape(d, None, {}, ("reject", "no-certificate"))


def _shape_blocked(env, w, tmp):
    d = env.fresh(env.secure, "ii")
    ident = write_identity(self_signed([d]), tmp, "ii")
    env.publish_xmpp(d, f"xmpp.{d}", 5269, "127.0.0.1", ident.issued.cert)
    return Shape(d, ident, {d: 'require = "block"\n'}, ("reject", "blocked"))


def _shape_require_dane_without_tlsa(env, w, tmp):
    d = env.fresh(env.secure, "ij")
    ident = write_identity(w.ca.issue(dns=[d]), tmp, "ij")
    env.publish_xmpp(d, f"xmpp.{d}", 5269, "127.0.0.1", None)
    return Shape(d, ident, {d: 'require = "dane"\n'}, ("reject", "no-tlsa"))


def _shape_static_policy_tlsa(env, w, tmp):
    d = env.fresh(env.insecure, "ik")
    ident = write_identity(self_signed([d]), tmp, "ik")
    return Shape(d, ident, {d: f'require = "dane"\ntlsa = ["{record_for(ident.issued.cert)}"]\n'},
                 ("accept", "accepted"))


def _shape_require_tls(env, w, tmp):
    d = env.fresh(env.insecure, "il")
    ident = write_identity(self_signed(["not-the-domain.example"]), tmp, "il")
    return Shape(d, ident, {d: 'require = "tls"\n'}, ("accept", "accepted"))


def _shape_second_target_tlsa(env, w, tmp):
    """Inbound uses the union of the targets' TLSA: a chain matching only the second target's
    record is accepted (outbound `check D` would reject the first target)."""
    d = env.fresh(env.secure, "im")
    ident = write_identity(self_signed([d]), tmp, "im")
    with env.batch():
        env.publish_xmpp(d, f"one.{d}", 5269, "127.0.0.1", self_signed([d]).cert, priority=0)
        env.publish_xmpp(d, f"two.{d}", 5269, "127.0.0.1", ident.issued.cert, priority=10)
    return Shape(d, ident, {}, ("accept", "accepted"))


def _shape_bogus_second_target(env, w, tmp):
    """Any bogus target fails the inbound domain closed, although the first one matches."""
    d = env.fresh(env.secure, "in")
    ident = write_identity(self_signed([d]), tmp, "in")
    with env.batch():
        env.publish_xmpp(d, f"one.{d}", 5269, "127.0.0.1", ident.issued.cert, priority=0)
        env.publish_xmpp(d, f"two.{d}", 5269, "127.0.0.1", None, priority=10)
        env.publish(None, f"_5269._tcp.two.{d}", "TLSA", str(record_for(ident.issued.cert)), broken_signature=True)
    return Shape(d, ident, {}, ("reject", "dnssec-bogus"))


def _shape_srv_dot_with_domain_tlsa(env, w, tmp):
    """SRV "." (no service for us to reach) but `_5269._tcp.D` TLSA: an inbound peer is judged by it."""
    d = env.fresh(env.secure, "io")
    ident = write_identity(self_signed([d]), tmp, "io")
    with env.batch():
        env.publish(None, f"_xmpp-server._tcp.{d}", "SRV", "0 0 0 .")
        env.publish(None, f"_5269._tcp.{d}", "TLSA", str(record_for(ident.issued.cert)))
    return Shape(d, ident, {}, ("accept", "accepted"))


SHAPES: dict[str, Callable] = {
    "dane-ee-match": _shape_dane_ee_match,
    "dane-ee-mismatch": _shape_dane_ee_mismatch,
    "dane-ta": _shape_dane_ta,
    "bogus-tlsa": _shape_bogus_tlsa,
    "bogus-zone": _shape_bogus_zone,
    "insecure-pkix": _shape_insecure_pkix,
    "pkix-wrong-name": _shape_pkix_wrong_name,
    "no-certificate": _shape_no_certificate,
    "blocked": _shape_blocked,
    "require-dane-without-tlsa": _shape_require_dane_without_tlsa,
    "static-policy-tlsa": _shape_static_policy_tlsa,
    "require-tls": _shape_require_tls,
    "second-target-tlsa": _shape_second_target_tlsa,
    "bogus-second-target": _shape_bogus_second_target,
    "srv-dot-with-domain-tlsa": _shape_srv_dot_with_domain_tlsa,
}


async def _proxy_verdict(port: int, shape: Shape):
    """Drive a peer of shape.domain through the proxy; the dialback answer it got."""
    peer = await Peer.connect(port)
    await peer.open_stream(from_=shape.domain)
    await peer.starttls(shape.identity)
    await peer.open_stream(from_=shape.domain)
    await peer.expect(object)                          # features
    await peer.send(db_result(sender=shape.domain))
    answer = await peer.expect(object)
    await peer.aclose()
    return answer


@pytest.mark.parametrize("name", list(SHAPES))
def test_check_inbound_agrees_with_the_running_proxy(name, world, dns_env, tmp_path, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="xmpp_dane_proxy")
    shape = SHAPES[name](dns_env, world, tmp_path)
    out = io.StringIO()

    async def main():
        async with FakeBackend().running() as backend:
            config = dataclasses.replace(
                make_config(world, f"127.0.0.1:{backend.port}", tmp_path, policies=shape.policies),
                dns=DnsConfig(nameservers=[dns_env.resolver_address], timeout=3.0))
            async with running_proxy(config, evidence_for=None) as listening:
                answer = await _proxy_verdict(listening.inbound[0][1], shape)
            cert = str(shape.identity.cert) if shape.identity else None
            code = await run_check(shape.domain, config=config, inbound=True, cert=cert, as_json=True, out=out)
        return answer, code

    answer, code = trio.run(main)
    (record,) = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "decision"]
    proxy = record.fields
    check = json.loads(out.getvalue())
    got = check["verdict"]
    # The proxy's own verdict is what the scenario says it is ...
    assert (proxy["verdict"], reason_category(_V(proxy))) == shape.expect, proxy["reason"]
    assert answer.attrs.get("type") == ("valid" if shape.expect[0] == "accept" else "error")
    # ... and check --inbound says exactly the same, for the same reason.
    assert got["verdict"] == proxy["verdict"]
    assert (got["prooftype"] or "-") == proxy["prooftype"]
    assert (got["matched"] or "-") == proxy["record"]
    assert got["reason"] == proxy["reason"]
    assert check["category"] == reason_category(_V(proxy))
    if shape.identity is not None:
        assert code == (0 if shape.expect[0] == "accept" else 1)


@dataclass
class _V:
    """A decision line's fields as the minimal verdict `reason_category` reads."""

    fields: dict

    @property
    def accepted(self) -> bool:
        return self.fields["verdict"] == "accept"

    @property
    def reason(self) -> str:
        return self.fields["reason"]


def test_inbound_mismatch_prints_the_leafs_own_values(dns_env, tmp_path, world):  # noqa: F811
    """Text output: the reason, the published records and the presented chain's own
    `3 1 1` / `3 1 2` values in full (as posttls-finger and ldns-dane print them)."""
    d = dns_env.fresh(dns_env.secure, "ip")
    ident = write_identity(self_signed([d]), tmp_path, "ip")
    other = self_signed([d]).cert
    dns_env.publish_xmpp(d, f"xmpp.{d}", 5269, "127.0.0.1", other)
    out = io.StringIO()
    config = dataclasses.replace(make_config(world, "127.0.0.1:1", tmp_path),
                                 dns=DnsConfig(nameservers=[dns_env.resolver_address], timeout=3.0))
    code = trio.run(lambda: run_check(d, config=config, inbound=True, cert=str(ident.cert), out=out))
    text = out.getvalue()
    assert code == 1, text
    assert "[dane-mismatch]" in text and "no fallback to PKIX" in text
    assert f"    {record_for(other)}" in text
    assert f"      {record_for(ident.issued.cert)}" in text
    assert f"      {record_for(ident.issued.cert, 3, 1, 2)}" in text
    assert "RESULT: reject" in text

    # Without --cert: what a peer must present, and exit 0 (a peer with the right key is accepted).
    out = io.StringIO()
    code = trio.run(lambda: run_check(d, config=config, inbound=True, out=out))
    assert code == 0, out.getvalue()
    assert "A peer must present: a chain matching one of the 1 usable TLSA record(s)" in out.getvalue()
    assert f"RESULT: possible — a peer of {d} presenting what is described above is accepted" in out.getvalue()

    # require = "dane" and a bogus TLSA RRset: nobody can be accepted, exit 1.
    bad = dns_env.fresh(dns_env.secure, "iq")
    with dns_env.batch():
        dns_env.publish_xmpp(bad, f"xmpp.{bad}", 5269, "127.0.0.1", None)
        dns_env.publish(None, f"_5269._tcp.xmpp.{bad}", "TLSA", str(record_for(other)), broken_signature=True)
    out = io.StringIO()
    code = trio.run(lambda: run_check(bad, config=config, inbound=True, out=out, as_json=True))
    obj = json.loads(out.getvalue())
    assert code == 1 and obj["result"] == "reject" and obj["category"] == "dnssec-bogus"
