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
    assert 0 < wait <= 2 * 300                     # the zone's TTL is 300 s
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

                # Forced: installed, and loudly reported.
                mark = len(proxy.lines)
                proxy.signal(signal.SIGUSR2)
                await proxy.wait_log(r"event=own-tlsa .*result=forced", after=mark)
                await proxy.wait_log(r"configuration reloaded", after=mark)
                assert await served_leaf() == renewed.cert
                text = await scrape(metrics_port)
                assert metric(text, "xmpp_dane_proxy_own_tlsa_match", domain=domain) == 0
                assert re.search(r"^xmpp_dane_proxy_config_last_reload_successful 1", text, re.M)
                assert any("level=error" in ln and "result=mismatch" in ln for ln in proxy.lines[mark:])

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
