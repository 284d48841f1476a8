"""The rollover guard for our own TLSA records: lookups, logging, the reload veto and the
`xmpp-dane-proxy tlsa --check DOMAIN` command.  The comparison itself is `policy.own_tlsa`.

For each `[[domain]]` the proxy looks up what a peer will look up to authenticate us — the
domain's SRV targets (RFC 6120 §3.2.1, XEP-0368 `_xmpps-server`) and their TLSA RRsets (RFC
7673), or `_5269._tcp.<domain>` without secure SRV — with `policy.peer_evidence.gather`, the
code our own outbound side uses for peers, so "what a peer sees" is computed by the same rules.

When it runs: after start-up (in the background: a slow resolver must not delay serving), after
every reload, and daily (`CHECK_INTERVAL`).  Each run logs one `event=own-tlsa` line per domain
(ERROR when peers doing DANE would reject the served chain; WARNING when a staged next key is
not published yet, with the exact records and the wait) and sets the gauge
`xmpp_dane_proxy_own_tlsa_match{domain}` (1 match or no DANE in use, 0 mismatch or failed
lookups).

The reload veto: a reload that *changes* a domain's certificate to one that matches none of the
usable published records is refused — the old certificate stays, the reload fails with the
reason — unless it is forced (SIGUSR2 instead of SIGHUP: `systemctl kill -s USR2 --kill-whom=main
xmpp-dane-proxy`).  A reload that keeps the certificate is never refused for DNS reasons, and a
lookup that fails (bogus/timeout) only warns: a resolver outage must not block a renewal, which
would turn into an expiry outage.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import trio
from cryptography.hazmat.primitives import serialization

from policy.dns import Resolver
from policy.evidence import DnsStatus
from policy.own_tlsa import NextKey, OwnTlsaReport, TlsaSite, assess
from policy.peer_evidence import gather
from policy.pkix import TrustStore
from policy.pkix_names import references_for
from proxy.certfiles import CertFileError, read_chain
from proxy.config import DomainConfig
from proxy.logsetup import log_event

__all__ = ["CHECK_INTERVAL", "OwnTlsaGuard", "find_sites", "load_next_key", "next_key_problems", "render_report",
           "run_tlsa_check"]

log = logging.getLogger("xmpp_dane_proxy.own_tlsa")

# Daily, as the issue and common practice (e.g. the dane-check cron jobs operators run) ask;
# renewals happen days ahead, so a day's delay still warns in time.
CHECK_INTERVAL = 86400.0
EXIT_MATCH, EXIT_MISMATCH, EXIT_BAD_INPUT = 0, 1, 2


async def find_sites(domain: str, resolver: Resolver) -> list[TlsaSite]:
    """Every TLSA RRset a peer consults to authenticate `domain`, with its status and TTL."""
    peer = await gather(domain, resolver)
    if peer.failed:
        # SRV bogus/timeout: peers fail closed for the whole domain.
        key = next((k for k, v in peer.srv_statuses.items() if v.failed), f"SRV {domain}")
        return [TlsaSite(key, (), (domain,), peer.failure, reason=peer.reason)]
    sites: dict[str, TlsaSite] = {}
    for t in peer.targets:
        name = t.tlsa_name or f"_{t.port}._tcp.{t.host}"
        where = f"{t.host}:{t.port} ({'direct-tls' if t.direct_tls else 'starttls'})"
        refs = tuple(references_for(peer.domain, (t.host,) if t.delegated else ()))
        old = sites.get(name)
        if old is not None:
            sites[name] = TlsaSite(old.name, old.targets + (where,), tuple(dict.fromkeys(old.references + refs)),
                                   old.status, old.records, old.ttl, old.reason)
            continue
        ttl, reason = 0, ""
        if t.tlsa_status is not None:
            # Asked again: the resolver's cache answers, and the Answer carries the TTL.
            answer = await resolver.lookup(name, "TLSA")
            ttl, reason = answer.ttl, answer.reason
            if t.tlsa_status is DnsStatus.SECURE and answer.rrset:
                ttl = max(ttl, await zone_ttl(resolver, name) or 0)
        sites[name] = TlsaSite(name, (where,), refs, t.tlsa_status, t.tlsa, ttl, reason)
    return list(sites.values())


async def zone_ttl(resolver: Resolver, name: str) -> int | None:
    """The TTL the zone gives the TLSA RRset at `name`: the RRSIG's Original TTL (RFC 4034
    §3.1.4).  Every cache counts the TTL down, and the rollover wait (2×TTL, RFC 7671 §8.1)
    must be counted from the full one, so the remaining TTL a resolver reports is not enough.
    None if no signature came back (the caller keeps the reported TTL)."""
    import dns.asyncbackend
    import dns.asyncquery
    import dns.exception
    import dns.message
    import dns.rdatatype

    query = dns.message.make_query(name, "TLSA", want_dnssec=True)
    backend = dns.asyncbackend.get_backend("trio")
    for ns in resolver.nameservers:
        with trio.move_on_after(resolver.timeout):
            try:
                response = await dns.asyncquery.udp(query, ns.host, port=ns.port, backend=backend,
                                                    ignore_unexpected=True)
            except (OSError, dns.exception.DNSException):
                continue
            ttls = [sig.original_ttl for rrset in response.answer
                    if rrset.rdtype == dns.rdatatype.RRSIG and rrset.covers == dns.rdatatype.TLSA for sig in rrset]
            return max(ttls) if ttls else None
    return None


def load_next_key(dom: DomainConfig) -> NextKey | None:
    """The staged next identity of `dom` (None: none); CertFileError if its files are bad."""
    if not dom.next_cert and not dom.next_key:
        return None
    chain = tuple(read_chain(dom.next_cert)) if dom.next_cert else ()
    spki = None
    if dom.next_key:
        try:
            with open(dom.next_key, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
        except OSError as exc:
            raise CertFileError(f"{dom.next_key}: cannot read: {exc.strerror}") from None
        except (ValueError, TypeError) as exc:
            raise CertFileError(f"{dom.next_key}: not an unencrypted PEM private key ({type(exc).__name__})") from None
        spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        if chain and chain[0].public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != spki:
            raise CertFileError(f"{dom.next_key} does not belong to the first certificate of {dom.next_cert}")
    return NextKey(chain, spki, dom.next_cert or dom.next_key)


def next_key_problems(doc: Any, dom: DomainConfig) -> list[str]:
    """`check-config`: a staged `next_cert`/`next_key` that cannot be used, as `file:line: message`
    at the line of the key (`doc` is the config's `policy.tomlfile.TomlDocument`)."""
    try:
        load_next_key(dom)
    except CertFileError as exc:
        text = str(exc)
        key = "next_key" if dom.next_key and text.startswith(dom.next_key) else "next_cert"
        at = doc.where(key, "domain", dom.index) if dom.index >= 0 else f"{doc.path}:0"
        return [f"{at}: domain {dom.name}: {text}"]
    return []


async def report_for(dom: DomainConfig, chain: Sequence, resolver: Resolver, *, trust: TrustStore | None,
                     now: _dt.datetime | None = None) -> tuple[OwnTlsaReport, str]:
    """The report for one domain and a problem with its staged next key ("" if none)."""
    problem = ""
    try:
        nxt = load_next_key(dom)
    except CertFileError as exc:
        nxt, problem = None, str(exc)
    sites = await find_sites(dom.name, resolver)
    return assess(dom.name, sites, chain, next_key=nxt, trust=trust, now=now), problem


# ------------------------------------------------------------------------------- in the proxy


class OwnTlsaGuard:
    """Runs the comparison for the running proxy: logs, metrics, the reload veto."""

    def __init__(self, resolver: Resolver, *, metrics: Any = None) -> None:
        self.resolver = resolver
        self.metrics = metrics
        self.last: dict[str, OwnTlsaReport] = {}
        self.runs = 0                       # scheduled checks completed (start + daily)
        self._ran = trio.Event()

    async def wait_runs(self, count: int) -> None:
        """Return once `count` scheduled checks have completed (for tests and tooling)."""
        while self.runs < count:
            await self._ran.wait()

    def _record(self, report: OwnTlsaReport, problem: str, when: str, cert_path: str) -> None:
        self.last[report.domain] = report
        # A timeout (or any failure other than bogus) is our resolver's problem, not what peers
        # see: it leaves the gauge as it was.  A bogus answer is what every validating peer sees
        # too: peers fail closed (0).
        bogus = any(s.site.status is DnsStatus.BOGUS for s in report.failed)
        ours = bool(report.failed) and not bogus and not report.mismatched
        if self.metrics is not None and hasattr(self.metrics, "own_tlsa") and not ours:
            self.metrics.own_tlsa(report.domain, report.matches)
        state = "match" if report.matches and report.dane_sites else (
            "mismatch" if report.mismatched else "failed" if report.failed else "no-tlsa")
        level = logging.INFO if report.matches else logging.WARNING if ours else logging.ERROR
        fields: dict[str, Any] = {"domain": report.domain, "result": state, "when": when, "cert": cert_path,
                                  "reason": report.summary()}
        fix = [line for step in report.steps() if step.purpose == "repair" for line in step.lines]
        if fix:
            fields["publish"] = " | ".join(fix)
        log_event(log, level, "own-tlsa", **fields)
        if problem:
            log_event(log, logging.ERROR, "own-tlsa", domain=report.domain, result="next-key-unreadable",
                      when=when, reason=problem)
        if report.next_published is False:
            adds = [line for s in report.dane_sites for line in
                    (f"{s.site.name}. IN TLSA {r}" for r in s.add_for_next)]
            wait = report.wait_seconds
            log_event(log, logging.WARNING, "own-tlsa", domain=report.domain, result="next-unpublished",
                      when=when, publish=" | ".join(adds), wait=f"{wait}s",
                      reason=f"the staged next key ({report.next_key.source}) is not published: add these "
                             f"records beside the current ones and wait at least 2xTTL = {wait} s before "
                             f"switching (RFC 7671 §8.1)")

    async def _find(self, state: Any) -> dict[str, tuple[OwnTlsaReport, str, str]]:
        """name -> (report, next-key problem, cert path) for every domain of a RuntimeState."""
        found: dict[str, tuple[OwnTlsaReport, str, str]] = {}

        async def one(dom: DomainConfig, chain: Sequence) -> None:
            report, problem = await report_for(dom, chain, self.resolver, trust=state.trust)
            found[dom.name] = (report, problem, dom.cert)

        # All domains at once: a resolver outage then costs one lookup budget, not one per domain.
        async with trio.open_nursery() as nursery:
            for dom in state.config.domains:
                material = state.domains.get(dom.name)
                if material is not None:
                    nursery.start_soon(one, dom, material.chain)
        return {d.name: found[d.name] for d in state.config.domains if d.name in found}

    def _record_all(self, found: Mapping[str, tuple[OwnTlsaReport, str, str]], when: str) -> dict[str, OwnTlsaReport]:
        for report, problem, cert_path in found.values():
            self._record(report, problem, when, cert_path)
        return {name: item[0] for name, item in found.items()}

    async def check_state(self, state: Any, when: str) -> dict[str, OwnTlsaReport]:
        """Check every domain of a `proxy.reload.RuntimeState`; log and record each."""
        return self._record_all(await self._find(state), when)

    async def vet_reload(self, old: Any, new: Any, force: bool) -> list[str]:
        """The reload veto: problems that refuse `new` (empty: install it).  Only a domain
        whose certificate chain changed can refuse.  What is logged and exported is always
        about the chain that is served afterwards: the new one, or (refused) the old one."""
        errors: list[str] = []
        found = await self._find(new)
        forced: list[tuple[str, OwnTlsaReport]] = []
        for name, (report, _problem, _path) in found.items():
            before = old.domains.get(name)
            after = new.domains[name]
            if before is not None and before.chain == after.chain:
                continue
            if report.mismatched:
                if force:
                    forced.append((name, report))
                    continue
                errors.append(
                    f"{after.cert_path}: own TLSA: the new certificate for {name} is refused: "
                    f"{report.summary()}; still serving the previous one. Publish the record(s) "
                    f"`xmpp-dane-proxy tlsa --check {name}` lists, wait 2xTTL, reload again; or force "
                    f"with SIGUSR2 (systemctl kill -s USR2 --kill-whom=main xmpp-dane-proxy)")
            elif report.failed:
                log_event(log, logging.WARNING, "own-tlsa", domain=name, result="unverified",
                          reason=f"new certificate installed without a TLSA check: {report.summary()}")
        if errors:
            # The old state stays: report on what is still served (its lookups are cached now).
            await self.check_state(old, "reload")
            return errors
        for name, report in forced:
            log_event(log, logging.ERROR, "own-tlsa", domain=name, result="forced",
                      reason=f"reload forced (SIGUSR2): installing a certificate peers doing DANE "
                             f"reject: {report.summary()}")
        self._record_all(found, "reload")
        return errors

    async def run(self, holder: Any, *, interval: float = CHECK_INTERVAL,
                  task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Check at start, then every `interval` seconds, until cancelled."""
        task_status.started()
        when = "start"
        while True:
            try:
                await self.check_state(holder.state, when)
            except Exception:  # noqa: BLE001 — a bug here must never take the proxy down
                log.exception("own TLSA check failed")
            self.runs += 1
            self._ran.set()
            self._ran = trio.Event()
            when = "daily"
            await trio.sleep(interval)


# ------------------------------------------------------------------------------- the command


def _iso(when: _dt.datetime | None) -> str:
    return "now" if when is None else when.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def render_report(report: OwnTlsaReport, *, served_source: str, problem: str = "") -> str:
    """`tlsa --check` text: published vs served vs next, then the steps with their times."""
    lines = [f"tlsa --check {report.domain}",
             f"  served    {served_source}"]
    if report.next_key is not None:
        lines.append(f"  next      {report.next_key.source}"
                     + ("" if report.next_key.chain else " (bare key: only 3 1 x / 1 1 x records can be checked)"))
    else:
        lines.append("  next      none staged (next_cert / next_key in [[domain]])")
    if problem:
        lines.append(f"  next      ERROR: {problem}")
    if not report.sites:
        lines.append("")
        lines.append("  no XMPP server-to-server service published (SRV target '.'): nothing to check")
    for s in report.sites:
        site = s.site
        lines.append("")
        status = str(site.status) if site.status is not None else "not looked up"
        lines.append(f"{site.name}  [{status}{f', TTL {site.ttl} s' if site.ttl else ''}]  -> {s.state.upper()}")
        if site.targets:
            lines.append(f"  used by   {', '.join(site.targets)}; names a peer accepts: {', '.join(site.references)}")
        if site.reason:
            lines.append(f"  lookup    {site.reason}")
        if s.state == "not-applicable":
            lines.append("  no TLSA applies here (SRV or addresses not DNSSEC-secure): peers use PKIX")
        for rec in s.usable:
            marks = []
            if s.served == rec:
                marks.append("served")
            if s.next == rec:
                marks.append("next")
            lines.append(f"  {'+'.join(marks) or '-':<12} {rec}")
        for text, why in s.ignored:
            lines.append(f"  {'unusable':<12} {text} ({why})")
        if s.state == "mismatch":
            lines.append(f"  served chain: {s.served_reason}")
        if site.status is DnsStatus.SECURE and not site.records:
            lines.append("  (no records)")
    lines.append("")
    lines.append(f"RESULT: {'match' if report.matches else 'MISMATCH'} — {report.summary()}")
    steps = report.steps()
    if steps:
        lines.append("")
        lines.append("Steps (RFC 7671 §8.1: publish, wait >= 2xTTL, switch, then remove the old record)")
        for n, step in enumerate(steps, 1):
            when = f"once the {step.after} is done" if step.after else f"safe from {_iso(step.not_before)}"
            lines.append(f"  {n}. {step.action} ({when}): {step.why}")
            lines += [f"       {line}" for line in step.lines]
    return "\n".join(lines)


def _report_obj(report: OwnTlsaReport, problem: str) -> dict[str, Any]:
    return {
        "domain": report.domain, "result": "match" if report.matches else "mismatch",
        "summary": report.summary(), "next_key": report.next_key.source if report.next_key else None,
        "next_key_error": problem or None, "next_published": report.next_published,
        "wait_seconds": report.wait_seconds,
        "sites": [{"name": s.site.name, "status": str(s.site.status) if s.site.status else None,
                   "ttl": s.site.ttl, "targets": list(s.site.targets), "state": s.state,
                   "records": [str(r) for r in s.site.records],
                   "served_match": str(s.served) if s.served else None,
                   "next_match": str(s.next) if s.next else None} for s in report.sites],
        "steps": [{"action": st.action, "records": list(st.lines), "not_before": _iso(st.not_before),
                   "after": st.after or None, "purpose": st.purpose, "why": st.why} for st in report.steps()],
    }


async def run_tlsa_check(domain: str, *, config: Any, nameserver: str | None = None, cert: str | None = None,
                         as_json: bool = False, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """`xmpp-dane-proxy tlsa --check DOMAIN [-c FILE] [--cert CHAIN]`; returns the exit status
    (0 the served chain matches — or no DANE is in use —, 1 it does not or a lookup failed,
    2 bad input).  `--cert` compares a candidate chain (e.g. a renewed one) instead of the
    configured one."""
    from policy.pkix_names import normalise_domain
    from proxy.config import ConfigError, load_config

    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr

    def bad(text: str) -> int:
        print(f"xmpp-dane-proxy tlsa: error: {text}", file=err)
        return EXIT_BAD_INPUT

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        return bad("\n".join(exc.messages))
    d = normalise_domain(domain)
    dom = cfg.domain(d)
    if dom is None:
        known = ", ".join(x.name for x in cfg.domains) or "none"
        return bad(f"{domain!r} is not a [[domain]] of {cfg.path} (configured: {known})")
    source = cert or dom.cert
    try:
        chain = read_chain(source)
    except CertFileError as exc:
        return bad(str(exc))
    try:
        resolver = Resolver([nameserver] if nameserver else cfg.dns.nameservers, cfg.dns.trust_ad_from,
                            cfg.dns.timeout)
        trust = TrustStore.load(cfg.policy.ca_file or None)
    except ValueError as exc:
        return bad(str(exc))
    except Exception as exc:  # noqa: BLE001 — TrustStoreError and friends: bad input
        return bad(f"policy.ca_file: {exc}")
    report, problem = await report_for(dom, chain, resolver, trust=trust)
    if as_json:
        print(json.dumps(_report_obj(report, problem), indent=2), file=out)
    else:
        print(render_report(report, served_source=source, problem=problem), file=out)
    return EXIT_MATCH if report.matches else EXIT_MISMATCH


def states(reports: Mapping[str, OwnTlsaReport]) -> dict[str, bool]:
    """domain -> matches (for tests and status lines)."""
    return {d: r.matches for d, r in reports.items()}
