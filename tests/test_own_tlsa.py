"""The rollover guard for our own TLSA (policy/own_tlsa.py, proxy/own_tlsa.py) over the signed
test zones of tests/dnsenv.py: `tlsa --check` for a matching, a mismatching and a bogus RRset,
a staged next key before and after it is published, the no-SRV fallback and Direct TLS
targets; and a real `run` process that refuses a reload whose new certificate peers doing
DANE would reject, accepts it when forced (SIGUSR2), and exports `own_tlsa_match`.
"""
from __future__ import annotations

import datetime as _dt
import io
import json
import re
import signal
from pathlib import Path

import trio

from pki import self_signed
from policy.evidence import DnsStatus
from policy.own_tlsa import NextKey, TlsaSite, assess
from policy.tlsa import record_for
from proxy.cli import main as cli_main
from proxy.own_tlsa import run_tlsa_check
from test_inbound_openssl import FakeBackend, Peer
from test_run_process import ProxyProcess, base_env, free_port, metric, proxy_argv, scrape


def _config(tmp_path: Path, dns_env, domain: str, cert: Path, key: Path, *, next_cert: Path | None = None,
            next_key: Path | None = None, extra: str = "") -> Path:
    (tmp_path / "policy.d").mkdir(exist_ok=True)
    nxt = (f'next_cert = "{next_cert}"\n' if next_cert else "") + (f'next_key = "{next_key}"\n' if next_key else "")
    path = tmp_path / "config.toml"
    path.write_text(f'{extra}\n[dns]\nnameservers = ["{dns_env.resolver_address}"]\ntimeout = 3.0\n'
                    f'[policy]\ndir = "policy.d"\n'
                    f'[[domain]]\nname = "{domain}"\ncert = "{cert}"\nkey = "{key}"\n{nxt}')
    return path


def _check(domain: str, config: Path, **kwargs) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = trio.run(lambda: run_tlsa_check(domain, config=config, out=out, err=err, **kwargs))
    return code, out.getvalue() + err.getvalue()


def test_served_chain_matches_published_record(dns_env, tmp_path):
    domain = dns_env.fresh(dns_env.secure, "om")
    current = self_signed([domain])
    cert, key = current.write(tmp_path, "current")
    dns_env.publish_xmpp(domain, f"xmpp.{domain}", 5269, "127.0.0.1", current.cert)
    code, text = _check(domain, _config(tmp_path, dns_env, domain, cert, key))
    assert code == 0, text
    assert re.search(rf"_5269\._tcp\.xmpp\.{re.escape(domain)}  \[secure, TTL \d+ s\]  -> MATCH", text), text
    assert f"served       {record_for(current.cert)}" in text
    assert f"RESULT: match — served chain matches _5269._tcp.xmpp.{domain}" in text
    assert "Steps" not in text   # nothing to do


def test_mismatch_exits_1_and_names_the_record_to_publish(dns_env, tmp_path):
    domain = dns_env.fresh(dns_env.secure, "ox")
    current, old = self_signed([domain]), self_signed([domain])
    cert, key = current.write(tmp_path, "current")
    dns_env.publish_xmpp(domain, f"xmpp.{domain}", 5269, "127.0.0.1", old.cert)   # the zone still has the old key
    code, text = _check(domain, _config(tmp_path, dns_env, domain, cert, key))
    assert code == 1, text
    assert "-> MISMATCH" in text and "RESULT: MISMATCH — served chain matches none of the 1 usable record(s)" in text
    assert f"-            {record_for(old.cert)}" in text   # published, matched by nothing served
    fix = f"_5269._tcp.xmpp.{domain}. IN TLSA {record_for(current.cert)}"
    assert re.search(r"1\. add \(safe from now\): the served chain matches no usable record", text), text
    assert f"       {fix}" in text
    # --json carries the same verdict for scripts.
    out = io.StringIO()
    code = trio.run(lambda: run_tlsa_check(domain, config=tmp_path / "config.toml", as_json=True, out=out))
    obj = json.loads(out.getvalue())
    assert code == 1 and obj["result"] == "mismatch" and obj["sites"][0]["state"] == "mismatch"
    assert obj["steps"][0]["records"] == [fix]


def test_candidate_chain_by_cli_and_bad_input(dns_env, tmp_path):
    """`tlsa --check D --cert NEW` judges a renewed chain before it is installed (a deploy hook)."""
    domain = dns_env.fresh(dns_env.secure, "oc")
    current, renewed = self_signed([domain]), self_signed([domain])
    cert, key = current.write(tmp_path, "current")
    new_cert, _ = renewed.write(tmp_path, "renewed")
    dns_env.publish_xmpp(domain, f"xmpp.{domain}", 5269, "127.0.0.1", current.cert)
    config = _config(tmp_path, dns_env, domain, cert, key)
    assert cli_main(["tlsa", "--check", domain, "-c", str(config)]) == 0
    assert cli_main(["tlsa", "--check", domain, "-c", str(config), "--cert", str(new_cert)]) == 1
    assert cli_main(["tlsa", "--check", "not-ours.example", "-c", str(config)]) == 2
    assert cli_main(["tlsa"]) == 2


def test_staged_next_key_unpublished_then_published(dns_env, tmp_path):
    domain = dns_env.fresh(dns_env.secure, "on")
    current, nxt = self_signed([domain]), self_signed([domain])
    cert, key = current.write(tmp_path, "current")
    next_cert, next_key = nxt.write(tmp_path, "next")
    dns_env.publish_xmpp(domain, f"xmpp.{domain}", 5269, "127.0.0.1", current.cert)
    config = _config(tmp_path, dns_env, domain, cert, key, next_cert=next_cert, next_key=next_key)
    before = _dt.datetime.now(_dt.timezone.utc)

    code, text = _check(domain, config)
    assert code == 0, text                        # what is served matches; the next key is a plan
    add = f"_5269._tcp.xmpp.{domain}. IN TLSA {record_for(nxt.cert)}"
    wait = int(re.search(r"keep both for at least 2×TTL = (\d+) s", text).group(1))
    assert wait == 2 * 300        # the zone's TTL (RRSIG original TTL), not what a cache has left of it
    assert f"       {add}" in text
    switch = re.search(r"2\. switch \(safe from (\S+)\)", text).group(1)
    at = _dt.datetime.strptime(switch, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=_dt.timezone.utc)
    assert before + _dt.timedelta(seconds=wait - 2) <= at <= before + _dt.timedelta(seconds=wait + 60)

    # The operator publishes the next record beside the current one.
    dns_env.publish(None, f"_5269._tcp.xmpp.{domain}", "TLSA", str(record_for(current.cert)), str(record_for(nxt.cert)))
    code, text = _check(domain, config)
    assert code == 0, text
    assert f"served       {record_for(current.cert)}" in text and f"next         {record_for(nxt.cert)}" in text
    assert "1. switch (safe from now): the next key is published everywhere" in text
    assert re.search(r"2\. remove \(once the switch is done\): after the switch", text), text
    assert f"       _5269._tcp.xmpp.{domain}. IN TLSA {record_for(current.cert)}" in text


def test_bare_next_key_fallback_target_and_direct_tls(dns_env, tmp_path):
    """No SRV: peers use `_5269._tcp.D`.  A bare `next_key` (no certificate yet) is checked by
    its `3 1 1` value.  With a Direct TLS SRV target its TLSA RRset is checked too."""
    domain = dns_env.fresh(dns_env.secure, "of")
    current, nxt = self_signed([domain]), self_signed([domain])
    cert, key = current.write(tmp_path, "current")
    _, next_key = nxt.write(tmp_path, "next")
    dns_env.publish_xmpp(domain, None, 5269, "127.0.0.1", current.cert)
    config = _config(tmp_path, dns_env, domain, cert, key, next_key=next_key)
    code, text = _check(domain, config)
    assert code == 0 and f"_5269._tcp.{domain}  [secure" in text, text
    assert f"_5269._tcp.{domain}. IN TLSA {record_for(nxt.cert)}" in text   # same SPKI as the next cert

    d2 = dns_env.fresh(dns_env.secure, "od")
    c2 = self_signed([d2])
    cert2, key2 = c2.write(tmp_path, "d2")
    with dns_env.batch():
        dns_env.publish_xmpp(d2, f"xmpp.{d2}", 5269, "127.0.0.1", c2.cert)
        dns_env.publish_xmpp(d2, f"tls.{d2}", 5223, "127.0.0.1", self_signed([d2]).cert, direct_tls=True)
    code, text = _check(d2, _config(tmp_path, dns_env, d2, cert2, key2))
    assert code == 1, text
    assert f"_5269._tcp.xmpp.{d2}  [secure" in text and "-> MATCH" in text
    assert f"_5223._tcp.tls.{d2}  [secure" in text and "-> MISMATCH" in text
    assert f"tls.{d2}:5223 (direct-tls)" in text


def test_bogus_tlsa_is_a_failure(dns_env, tmp_path):
    domain = dns_env.fresh(dns_env.secure, "ob")
    current = self_signed([domain])
    cert, key = current.write(tmp_path, "current")
    with dns_env.batch():
        dns_env.publish_xmpp(domain, f"xmpp.{domain}", 5269, "127.0.0.1", None)
        dns_env.publish(None, f"_5269._tcp.xmpp.{domain}", "TLSA", str(record_for(current.cert)),
                        broken_signature=True)
    code, text = _check(domain, _config(tmp_path, dns_env, domain, cert, key))
    assert code == 1 and "-> FAILED" in text, text
    assert f"the DNS lookup for _5269._tcp.xmpp.{domain} is bogus" in text


def test_assess_without_dane_is_no_mismatch():
    """Pure: an insecure or absent RRset is not checked by peers; nothing to guard."""
    cert = self_signed(["x.example"]).cert
    sites = [TlsaSite("_5269._tcp.x.example", ("x.example:5269",), ("x.example",), DnsStatus.INSECURE,
                      (record_for(self_signed(["x.example"]).cert),), 300)]
    report = assess("x.example", sites, [cert], next_key=NextKey((cert,), None, "next.pem"))
    assert report.matches and report.dane_sites == () and report.next_published is None
    assert report.summary().startswith("no usable DNSSEC-secure TLSA published")


def test_reload_refuses_a_certificate_peers_reject_unless_forced(dns_env, tmp_path):
    """A real `run` process: the start-up check logs a match and exports 1; a SIGHUP with a
    renewed certificate under a new key (the certbot default) is refused — the old
    certificate is still served; SIGUSR2 forces it in, logged loudly, the gauge drops to 0."""
    domain = dns_env.fresh(dns_env.secure, "or")
    current, renewed = self_signed([domain]), self_signed([domain])
    cert, key = current.write(tmp_path, "served")
    dns_env.publish_xmpp(domain, f"xmpp.{domain}", 5269, "127.0.0.1", current.cert)
    listen_port, metrics_port = free_port(), free_port()

    async def served_leaf() -> object:
        peer = await Peer.connect(listen_port)
        await peer.open_stream(to=domain, from_="peer.example")
        tls = await peer.starttls(None, server_name=domain)
        leaf = tls.peer_chain()[0]
        await peer.aclose()
        return leaf

    async def main():
        backend = FakeBackend()
        async with backend.running(), trio.open_nursery() as nursery:
            extra = (f'[inbound]\nlisten = ["127.0.0.1:{listen_port}"]\nbackend = "127.0.0.1:{backend.port}"\n'
                     f'[outbound]\nlisten = []\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n')
            config = _config(tmp_path, dns_env, domain, cert, key, extra=extra)
            proxy = ProxyProcess(proxy_argv(config), base_env())
            await proxy.start(nursery)
            try:
                line = await proxy.wait_log(r"event=own-tlsa .*result=match")
                assert f"domain={domain}" in line and "when=start" in line
                assert metric(await scrape(metrics_port), "xmpp_dane_proxy_own_tlsa_match", domain=domain) == 1

                # certbot renews with a new key; the zone still has the old one.
                renewed.write(tmp_path, "served")
                mark = len(proxy.lines)
                proxy.signal(signal.SIGHUP)
                line = await proxy.wait_log(r"reload: .*own TLSA: the new certificate for", after=mark)
                assert "is refused" in line and f"_5269._tcp.xmpp.{domain}" in line
                await proxy.wait_log(r"reload failed", after=mark)
                assert await served_leaf() == current.cert          # the old certificate is kept
                text = await scrape(metrics_port)
                assert re.search(r"^xmpp_dane_proxy_config_last_reload_successful 0", text, re.M)
                # What is served still matches: the gauge says so, and no mismatch was logged for it.
                assert metric(text, "xmpp_dane_proxy_own_tlsa_match", domain=domain) == 1
                assert not any("result=mismatch" in ln for ln in proxy.lines[mark:])

                # Forced: installed, and loudly reported.
                mark = len(proxy.lines)
                proxy.signal(signal.SIGUSR2)
                await proxy.wait_log(r"event=own-tlsa .*result=forced", after=mark)
                await proxy.wait_log(r"configuration reloaded", after=mark)
                assert await served_leaf() == renewed.cert
                text = await scrape(metrics_port)
                assert metric(text, "xmpp_dane_proxy_own_tlsa_match", domain=domain) == 0
                assert re.search(r"^xmpp_dane_proxy_config_last_reload_successful 1", text, re.M)
                (loud,) = [ln for ln in proxy.lines[mark:] if "result=mismatch" in ln]
                assert "level=error" in loud and f"_5269._tcp.xmpp.{domain}. IN TLSA {record_for(renewed.cert)}" in loud

            finally:
                proxy.signal(signal.SIGTERM)
                await proxy.exit_code()

    trio.run(main)


def test_check_config_reports_a_bad_staged_next_key_at_its_line(tmp_path, capsys):
    current, other = self_signed(["home.example"]), self_signed(["home.example"])
    cert, key = current.write(tmp_path, "current")
    next_cert, _ = current.write(tmp_path, "next")
    _, wrong_key = other.write(tmp_path, "other")
    (tmp_path / "policy.d").mkdir()
    config = tmp_path / "config.toml"
    config.write_text(f'[policy]\ndir = "policy.d"\n[[domain]]\nname = "home.example"\ncert = "{cert}"\n'
                      f'key = "{key}"\nnext_cert = "{next_cert}"\nnext_key = "{wrong_key}"\n')
    assert cli_main(["check-config", "-c", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{config}:8: domain home.example: {wrong_key} does not belong to the first certificate of {next_cert}" in err
    config.write_text(config.read_text().replace(f'next_key = "{wrong_key}"\n', 'next_key = "missing.key"\n'))
    assert cli_main(["check-config", "-c", str(config)]) == 1
    assert f"{config}:8: domain home.example: {tmp_path / 'missing.key'}: cannot read" in capsys.readouterr().err


# ------------------------------------------------------------------------------ pure: policy.own_tlsa


def _site(*records, status=DnsStatus.SECURE, name="_5269._tcp.xmpp.x.example", ttl=300):
    return TlsaSite(name, ("xmpp.x.example:5269 (starttls)",), ("x.example", "xmpp.x.example"), status,
                    tuple(records), ttl)


def test_digest_agility_applies_to_our_own_records_too():
    """RFC 7671 §9: with 3 1 1 and 3 1 2 published, peers use only 3 1 2.  A 3 1 2 of another
    key therefore hides our matching 3 1 1: that is a mismatch, and the fix is a 3 1 2."""
    served, other = self_signed(["x.example"]), self_signed(["x.example"])
    site = _site(record_for(served.cert), record_for(other.cert, 3, 1, 2))
    report = assess("x.example", [site], served.chain)
    assert not report.matches and report.mismatched[0].usable == (record_for(other.cert, 3, 1, 2),)
    (fix,) = report.steps()
    assert fix.lines == (f"_5269._tcp.xmpp.x.example. IN TLSA {record_for(served.cert, 3, 1, 2)}",)


def test_dane_ta_record_survives_a_renewal_from_the_same_ca():
    """`2 1 1` on the issuing CA: a next certificate from the same CA needs no new record; the
    leaf must still name the domain or the SRV target (RFC 7671 §5.2, RFC 7673 §4)."""
    from pki import TestCA

    ca = TestCA().intermediate("Our CA")
    served, renewed = ca.issue(dns=["xmpp.x.example"]), ca.issue(dns=["x.example"])
    site = _site(record_for(ca.cert, 2, 1, 1))
    report = assess("x.example", [site], served.chain, next_key=NextKey(tuple(renewed.chain), None, "next.pem"))
    assert report.matches and report.next_published is True
    assert [s.action for s in report.steps()] == ["switch"]
    wrong = ca.issue(dns=["elsewhere.example"])
    assert not assess("x.example", [site], wrong.chain).matches


def test_bogus_site_fails_and_insecure_site_is_ignored():
    served = self_signed(["x.example"])
    bogus = assess("x.example", [_site(record_for(served.cert), status=DnsStatus.BOGUS)], served.chain)
    assert not bogus.matches and bogus.failed and "is bogus" in bogus.summary()
    mixed = assess("x.example", [_site(record_for(served.cert)),
                                 _site(record_for(self_signed(["x.example"]).cert), status=DnsStatus.INSECURE,
                                       name="_5269._tcp.x.example")], served.chain)
    assert mixed.matches and [s.state for s in mixed.sites] == ["match", "insecure"]


# ------------------------------------------------------------------------------ property: guard == peer's verdict

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _pool():
    from pki import TestCA

    ca = TestCA().intermediate("Pool CA")
    served = ca.issue(dns=["x.example"])
    other = ca.issue(dns=["x.example"])
    foreign = TestCA().intermediate("Other CA")
    records = [record_for(c, u, s, m) for c in (served.cert, other.cert) for u in (2, 3)
               for s in (0, 1) for m in (1, 2)]
    records += [record_for(ca.cert, 2, s, m) for s in (0, 1) for m in (1, 2)]
    records += [record_for(foreign.cert, 2, 1, 1), record_for(served.cert, 3, 1, 0)]
    from policy.tlsa import parse_tlsa_lenient
    records += [parse_tlsa_lenient("3 1 1 abcd"), parse_tlsa_lenient("3 1 1 zz")]
    return served, records


_SERVED, _POOL = _pool()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_POOL), max_size=6, unique_by=str))
def test_guard_agrees_with_the_verdict_a_dane_peer_reaches(records):
    """For any published RRset, the guard says "match" exactly when a peer that judges us as
    this proxy judges its peers (require = "dane", every usage enabled) accepts our chain."""
    from policy.decide import decide
    from policy.evidence import Evidence
    from policy.policyfile import Policy

    site = _site(*records)
    report = assess("x.example", [site], _SERVED.chain)
    evidence = Evidence("x.example", tlsa=tuple(records), tlsa_status=DnsStatus.SECURE,
                        delegated_targets=("xmpp.x.example",))
    verdict = decide(_SERVED.chain, evidence, Policy(require="dane", dane_uses=frozenset({0, 1, 2, 3})), trust=None)
    if report.dane_sites:
        assert report.matches == verdict.accepted, (records, verdict.reason)
    else:
        assert report.matches and not verdict.accepted and verdict.reason.startswith("require=dane but")


def test_a_resolver_outage_never_blocks_a_renewal(dns_env, tmp_path, caplog):
    """The runner's reload path (StateHolder with the guard as its veto): with the resolver
    down, a changed certificate is installed, with a warning that it was not checked."""
    import logging

    from policy.dns import Resolver
    from proxy.metrics import Metrics
    from proxy.own_tlsa import OwnTlsaGuard
    from proxy.reload import StateHolder

    caplog.set_level(logging.INFO, logger="xmpp_dane_proxy")
    domain = "renewing.example"
    first, renewed = self_signed([domain]), self_signed([domain])
    cert, key = first.write(tmp_path, "served")
    config = _config(tmp_path, dns_env, domain, cert, key)
    metrics = Metrics(process_metrics=False)
    holder = StateHolder(config, metrics=metrics)
    guard = OwnTlsaGuard(Resolver([dns_env.blackhole], timeout=0.5), metrics=metrics)
    holder.vet = guard.vet_reload
    renewed.write(tmp_path, "served")
    result = trio.run(holder.reload_async)
    assert result.ok and holder.state.domains[domain].leaf == renewed.cert
    fields = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("event") == "own-tlsa"]
    assert any(f["result"] == "unverified" and "timeout" in f["reason"] for f in fields), fields
    assert any(f["result"] == "failed" for f in fields)
    # A timeout says nothing about what peers see: the gauge is not set from it.
    assert b"own_tlsa_match{" not in metrics.exposition()[0]


def test_scheduled_checks_run_at_start_and_then_every_interval(dns_env, tmp_path, caplog):
    """The same loop the proxy runs daily, with a short interval: each run re-reads DNS, so a
    record that disappears is noticed at the next run."""
    import logging

    from proxy.metrics import Metrics
    from proxy.own_tlsa import OwnTlsaGuard
    from proxy.reload import StateHolder

    caplog.set_level(logging.INFO, logger="xmpp_dane_proxy")
    domain = dns_env.fresh(dns_env.secure, "os")
    current = self_signed([domain])
    cert, key = current.write(tmp_path, "served")
    dns_env.publish_xmpp(domain, None, 5269, "127.0.0.1", current.cert, ttl=1)
    holder = StateHolder(_config(tmp_path, dns_env, domain, cert, key))
    metrics = Metrics(process_metrics=False)
    guard = OwnTlsaGuard(dns_env.resolver(), metrics=metrics)

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: guard.run(holder, interval=1.5, task_status=task_status))
            await guard.wait_runs(1)
            assert guard.last[domain].matches
            # The zone now names another key (TTL 1 s: the cached set is gone by the next run).
            dns_env.publish(None, f"_5269._tcp.{domain}", "TLSA", str(record_for(self_signed([domain]).cert)), ttl=1)
            await guard.wait_runs(2)
            nursery.cancel_scope.cancel()

    trio.run(main)
    fields = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("event") == "own-tlsa"]
    assert [(f["when"], f["result"]) for f in fields] == [("start", "match"), ("daily", "mismatch")]
    assert b'own_tlsa_match{domain="%s"} 0.0' % domain.encode() in metrics.exposition()[0]


def test_bogus_own_tlsa_is_an_error_and_sets_the_gauge_to_0(dns_env, tmp_path, caplog):
    """Unlike a timeout of our resolver, a bogus RRset is what every validating peer sees."""
    import logging

    from proxy.metrics import Metrics
    from proxy.own_tlsa import OwnTlsaGuard
    from proxy.reload import StateHolder

    caplog.set_level(logging.INFO, logger="xmpp_dane_proxy")
    domain = dns_env.fresh(dns_env.secure, "og")
    current = self_signed([domain])
    cert, key = current.write(tmp_path, "served")
    with dns_env.batch():
        dns_env.publish_xmpp(domain, f"xmpp.{domain}", 5269, "127.0.0.1", None)
        dns_env.publish(None, f"_5269._tcp.xmpp.{domain}", "TLSA", str(record_for(current.cert)), broken_signature=True)
    holder = StateHolder(_config(tmp_path, dns_env, domain, cert, key))
    metrics = Metrics(process_metrics=False)
    guard = OwnTlsaGuard(dns_env.resolver(), metrics=metrics)
    trio.run(guard.check_state, holder.state, "start")
    (record,) = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "own-tlsa"]
    assert record.levelno == logging.ERROR and record.fields["result"] == "failed" and "bogus" in record.fields["reason"]
    assert b'own_tlsa_match{domain="%s"} 0.0' % domain.encode() in metrics.exposition()[0]
