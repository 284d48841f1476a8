"""`xmpp-dane-proxy check DOMAIN` (DESIGN §5): what the outbound proxy would do for DOMAIN,
live, shown to a person (or to a script with `--json`).

It gathers the DNS evidence exactly as the proxy does (SRV for both services, addresses,
TLSA, each with its DNSSEC status), then for *every* target — not just until one is
accepted — connects, negotiates STARTTLS or Direct TLS, shows the chain the server presented
and the verdict of DOMAIN's policy on it, with the reason.  The connection code is the
proxy's own (`proxy.connect.attempt_target`), so a verdict here is the proxy's verdict.
Only what the policy can use is looked up, as the proxy would: DOMAIN's POSH document (RFC
7711) only when the policy uses POSH (`require = "posh"`, `posh = true`), host-meta and its
WebSocket endpoints only when `transports` names "websocket", TCP targets only when it names
"tcp"; a blocked domain needs no lookup, and a failed SRV lookup ends the check (the domain
fails closed), so a resolver that is down costs one lookup timeout, not several.  Answers
are shown with their status and what they said (`secure, NXDOMAIN`, `insecure, NODATA`).
`--inbound` applies the inbound rules instead (proxy/check_inbound.py).

Settings: `-c FILE` gives the resolver (`[dns]`), the policy directory and trust store
(`[policy]`), the per-target timeout (`limits.handshake_timeout`) and the client certificate
(the first `[[domain]]`, as the proxy would present it); `--nameserver HOST[:PORT]` replaces
the resolver.  Without `-c`, /etc/xmpp-dane-proxy/config.toml is used when it exists (as
`run` does); without any file: resolver 127.0.0.1 (a local validating unbound, as the proxy
expects), the built-in default policy, the system trust store, no client certificate.

Exit status: 0 when every target was accepted, 1 when any was rejected or could not be
reached (or DNS gave no target at all), 2 for bad input (unreadable config, bad nameserver).
"""
from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from cryptography import x509

from policy.chain_tlsa import chain_values, mismatch_lines
from policy.dns import Answer, Resolver, parse_nameserver
from policy.evidence import Evidence
from policy.decide import decide
from policy.peer_evidence import PeerEvidence, SrvTarget, gather
from policy.pkix import TrustStore, TrustStoreError
from policy.pkix_names import normalise_domain, presented_ids
from policy.policyfile import DANE_USE_NAMES, Policy, PolicyError, PolicySet
from policy.posh import PoshResult, posh_url
from policy.verdict import Verdict, reject
from proxy.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from proxy.connect import TargetAttempt, TlsContexts, attempt_target
from proxy.metrics import reason_category
from proxy.posh_fetch import PoshFetcher, shared_fetcher
from proxy.websocket_outbound import attempt_websocket, discoverer_for
from proxy.tls import TlsConfigError

__all__ = ["CHECK_TIMEOUT", "EXIT_ACCEPT", "EXIT_BAD_INPUT", "EXIT_REJECT", "CheckResult", "run_check"]

EXIT_ACCEPT, EXIT_REJECT, EXIT_BAD_INPUT = 0, 1, 2
# A person is waiting: 10 s per target (TCP + STARTTLS + TLS) is plenty for a live server;
# with -c the configured limits.handshake_timeout applies, as in the proxy.
CHECK_TIMEOUT = 10.0
_USE_NAMES = {v: k for k, v in DANE_USE_NAMES.items()}


class _BadInput(Exception):
    pass


# `check` without -c reads the file `run` reads, when it exists (a module global so tests can
# point it elsewhere).
DEFAULT_CONFIG = DEFAULT_CONFIG_PATH


def config_or_default(path: str | None) -> str | None:
    """`-c FILE`, else the default config file if it exists, else None (built-in defaults)."""
    if path is not None:
        return path
    return DEFAULT_CONFIG if Path(DEFAULT_CONFIG).exists() else None


class RecordingResolver:
    """A `policy.dns.Resolver` that remembers every answer it gave, so `check` can show
    NXDOMAIN/NODATA beside the status, and tests can see which lookups were made."""

    def __init__(self, inner: Resolver) -> None:
        self._inner = inner
        self.answers: dict[str, Answer] = {}
        self.lookups: list[Answer] = []

    async def lookup(self, name: Any, rdtype: Any) -> Answer:
        answer = await self._inner.lookup(name, rdtype)
        self.lookups.append(answer)
        self.answers[answer.key] = answer
        return answer

    @property
    def inner(self) -> Resolver:
        """The resolver being recorded."""
        return self._inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def describe(self, key: str, status: object) -> str:
        """`secure`, or `secure, NXDOMAIN` / `insecure, NODATA` / `bogus: reason` for `key`."""
        answer = self.answers.get(key)
        if answer is None:
            return str(status)
        if answer.failed:
            return f"{status}" + (f": {answer.reason}" if answer.reason else "")
        if answer.nxdomain:
            return f"{status}, NXDOMAIN"
        if answer.nodata:
            return f"{status}, NODATA"
        via = f" via {' -> '.join(answer.cname_chain)}" if answer.cname_chain else ""
        return f"{status}, {len(answer.rrset)} record(s){via}"


class CheckResult:
    """Everything `check` found, for printing or as JSON."""

    def __init__(self, domain: str, policy: Policy, resolver: Resolver, client: str | None) -> None:
        self.domain = domain
        self.policy = policy
        self.resolver = resolver
        self.client = client
        self.evidence: PeerEvidence | None = None
        self.domain_verdict: Verdict | None = None    # refused before any target (SRV bogus, no service)
        self.attempts: list[TargetAttempt] = []
        self.posh: PoshResult | None = None           # DOMAIN's POSH document (RFC 7711), always fetched
        self.websocket = None                         # proxy.websocket_outbound.Discovery (XEP-0156/0468)

    @property
    def accepted(self) -> bool:
        return self.domain_verdict is None and bool(self.attempts) and all(a.accepted for a in self.attempts)

    # -- JSON -------------------------------------------------------------------------------

    def as_json_obj(self) -> dict[str, Any]:
        ev = self.evidence
        return {
            "domain": self.domain,
            "result": "accept" if self.accepted else "reject",
            "policy": _policy_obj(self.policy),
            "resolver": [{"address": str(ns), "ad_trusted": self.resolver.trusted(ns)}
                         for ns in self.resolver.nameservers],
            "client_certificate": self.client,
            "evidence": None if ev is None else {
                "statuses": {k: str(v) for k, v in ev.statuses.items()},
                "answers": {k: _describe(self.resolver, k, v) for k, v in ev.statuses.items()},
                "failure": str(ev.failure) if ev.failure else None,
                "reason": ev.reason or None,
                "no_service": ev.no_service,
                "domain_tlsa": None if ev.domain_tlsa_status is None else {
                    "name": ev.domain_tlsa_name, "status": str(ev.domain_tlsa_status),
                    "records": [str(r) for r in ev.domain_tlsa]},
            },
            "domain_verdict": self.domain_verdict.as_json_obj() if self.domain_verdict else None,
            "posh": _posh_obj(self.posh, self.policy),
            "websocket": None if self.websocket is None else {
                "used": "websocket" in self.policy.transports, "endpoints": list(self.websocket.urls),
                "source": self.websocket.source, "reason": self.websocket.reason or None},
            "targets": [{**_attempt_obj(a), "posh_match": _posh_match(self.posh, a)} for a in self.attempts],
        }

    # -- text -------------------------------------------------------------------------------

    def render(self) -> str:
        lines: list[str] = []
        p = self.policy
        lines.append(f"check {self.domain}")
        lines.append(f"  policy    require={p.require} dane_uses={_uses(p)} tls_min_version={p.tls_min_version}"
                     + (" posh=true" if p.posh else "") + f"  ({p.source})")
        lines.append("  resolver  " + ", ".join(
            f"{ns} ({'AD trusted' if self.resolver.trusted(ns) else 'AD NOT trusted: nothing can be secure'})"
            for ns in self.resolver.nameservers))
        lines.append(f"  client    {self.client or 'no client certificate'}")
        ev = self.evidence
        if ev is not None:
            lines.append("")
            lines.append("DNS evidence")
            width = max((len(k) for k in ev.statuses), default=0)
            for key, status in ev.statuses.items():
                lines.append(f"  {key:<{width}}  {_describe(self.resolver, key, status)}")
            if ev.failure:
                lines.append(f"  FAILED CLOSED ({ev.failure}): {ev.reason}")
            elif ev.no_service:
                lines.append("  no XMPP server-to-server service (SRV target '.')")
            if not ev.targets and ev.domain_tlsa_status is not None:
                lines.append(f"  TLSA {ev.domain_tlsa_name} [{ev.domain_tlsa_status}]: "
                             + (", ".join(_short(r) for r in ev.domain_tlsa)
                                or _none(self.resolver, f"TLSA {ev.domain_tlsa_name}")))
        if self.posh is not None:
            lines.append("")
            lines += _render_posh(self.posh, self.policy)
        if self.websocket is not None:
            lines.append("")
            lines.append("WebSocket (XEP-0468): used, transports = " + ", ".join(p.transports))
            lines += [f"  {url}" for url in self.websocket.urls] or [f"  no endpoint: {self.websocket.reason}"]
        if "tcp" not in p.transports and self.domain_verdict is None:
            lines.append("")
            lines.append("TCP targets: not tried (policy transports = " + ", ".join(p.transports) + ")")
        if self.domain_verdict is not None:
            lines.append("")
            lines.append(f"REJECTED before any target: {self.domain_verdict.reason}")
        for n, a in enumerate(self.attempts, 1):
            lines.append("")
            lines += _render_attempt(n, a, self.posh, self.resolver)
        if self.attempts:
            lines.append("")
            lines.append("Summary")
            lines += _table(
                ["#", "target", "mode", "address", "TLS", "verdict", "prooftype", "reason"],
                [[str(n), f"{a.target.host}:{a.target.port}", a.mode, a.address or "-",
                  a.tls.protocol if a.tls else "-",
                  a.verdict.verdict if a.verdict else "failed",
                  (a.verdict.prooftype or "-") if a.verdict else "-",
                  _clip(a.reason, 70)] for n, a in enumerate(self.attempts, 1)])
        lines.append("")
        total = len(self.attempts)
        good = sum(a.accepted for a in self.attempts)
        if self.accepted:
            lines.append(f"RESULT: accept — all {total} target(s) of {self.domain} accepted")
        else:
            lines.append(f"RESULT: reject — {good} of {total} target(s) of {self.domain} accepted")
        return "\n".join(lines)


def _describe(resolver: Any, key: str, status: object) -> str:
    return resolver.describe(key, status) if isinstance(resolver, RecordingResolver) else str(status)


def _posh_use(p: Policy) -> str:
    if p.require == "posh":
        return 'required (require = "posh")'
    if p.posh and p.require in ("pkix", "dane-or-pkix"):
        return "counts where PKIX would (posh = true)"
    return "not used by this policy"


def _posh_obj(posh: PoshResult | None, p: Policy) -> dict[str, Any] | None:
    if posh is None:
        return None
    return {"use": _posh_use(p), "url": posh.url, "via": posh.via, "status": str(posh.status),
            "reason": posh.reason, "fingerprints": [str(f) for f in posh.fingerprints],
            "cache_seconds": posh.cache_seconds, "notes": list(posh.notes)}


def _posh_match(posh: PoshResult | None, a: TargetAttempt) -> str | None:
    """The fingerprint the target's leaf matches, "none", or None (no POSH document / no chain)."""
    if posh is None or not posh.ok or not a.chain:
        return None
    match = posh.match(a.chain[0])
    return str(match) if match else "none"


def _render_posh(posh: PoshResult, p: Policy) -> list[str]:
    lines = [f"POSH (RFC 7711): {_posh_use(p)}",
             f"  {posh_url(posh.domain)}" + (f" -> {posh.url}" if posh.via else ""),
             f"  {posh.describe()}"]
    lines += [f"  fingerprint {f}" for f in posh.fingerprints]
    lines += [f"  note: {n}" for n in posh.notes]
    return lines


def _uses(p: Policy) -> str:
    return ",".join(_USE_NAMES.get(u, str(u)) for u in sorted(p.dane_uses)) or "none"


def _policy_obj(p: Policy) -> dict[str, Any]:
    return {"require": p.require, "dane_uses": [_USE_NAMES.get(u, str(u)) for u in sorted(p.dane_uses)],
            "tls_min_version": p.tls_min_version, "source": p.source,
            "static_tlsa": [str(r) for r in p.tlsa], "static_srv": [str(s) for s in p.srv]}


def _short(record: object, keep: int = 16) -> str:
    text = str(record)
    parts = text.split()
    if len(parts) == 4 and len(parts[3]) > keep:
        return " ".join(parts[:3] + [parts[3][:keep] + "…"])
    return text


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  " + "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header).rstrip(), fmt.format(*["-" * w for w in widths]).rstrip()] + \
        [fmt.format(*r).rstrip() for r in rows]


def _cert_obj(cert: x509.Certificate) -> dict[str, Any]:
    return {"subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
            "san": presented_ids(cert).describe(),
            "not_before": cert.not_valid_before_utc.isoformat(), "not_after": cert.not_valid_after_utc.isoformat()}


def _target_obj(t: SrvTarget) -> dict[str, Any]:
    return {"host": t.host, "port": t.port, "mode": "direct-tls" if t.direct_tls else "starttls",
            "priority": t.priority, "weight": t.weight, "srv_secure": t.srv_secure,
            "delegated": t.delegated, "fallback": t.fallback,
            "addresses": list(t.addresses), "address_status": str(t.address_status) if t.address_status else None,
            "tlsa_name": t.tlsa_name, "tlsa_status": str(t.tlsa_status) if t.tlsa_status else None,
            "tlsa": [str(r) for r in t.tlsa], "statuses": {k: str(v) for k, v in t.statuses.items()}}


def _attempt_obj(a: TargetAttempt) -> dict[str, Any]:
    return {
        "target": _target_obj(a.target),
        "address": a.address,
        "starttls_offered": a.starttls_offered,
        "tls": None if a.tls is None else {"protocol": a.tls.protocol, "cipher": a.tls.cipher,
                                           "alpn": a.tls.alpn, "server_name": a.tls.server_name},
        "chain": [_cert_obj(c) for c in a.chain],
        "error": a.error,
        "verdict": a.verdict.as_json_obj() if a.verdict else None,
        "presented_tlsa": [{"depth": c.depth, "record": str(c.record)} for c in chain_values(a.chain)]
        if a.chain and a.verdict is not None and reason_category(a.verdict) == "dane-mismatch" else None,
        "seconds": round(a.seconds, 3),
    }


def _none(resolver: Any, key: str) -> str:
    """"none", with why when the answer said (NXDOMAIN/NODATA)."""
    answer = resolver.answers.get(key) if isinstance(resolver, RecordingResolver) else None
    if answer is not None and (answer.nxdomain or answer.nodata):
        return f"none ({'NXDOMAIN' if answer.nxdomain else 'NODATA'})"
    return "none"


def _render_attempt(n: int, a: TargetAttempt, posh: PoshResult | None = None, resolver: Any = None) -> list[str]:
    t = a.target
    notes = [f"priority {t.priority} weight {t.weight}"]
    if t.fallback:
        notes.append("no SRV: the domain itself")
    else:
        notes.append("securely delegated" if t.delegated else "not securely delegated")
    out = [f"Target {n}: {t.host}:{t.port} ({a.mode}), " + ", ".join(notes)]

    def row(label: str, text: str) -> None:
        out.append(f"  {label:<10} {text}")

    row("addresses", (", ".join(t.addresses) or _none(resolver, f"A {t.host}"))
        + f" [{t.address_status or '-'}]")
    if t.tlsa_status is None:
        row("TLSA", "not looked up (no secure delegation and no TLSA for the domain)")
    else:
        row("TLSA", f"{t.tlsa_name} [{t.tlsa_status}]: "
            + (", ".join(_short(r) for r in t.tlsa) or _none(resolver, f"TLSA {t.tlsa_name}")))
    if a.address:
        how = "Direct TLS" if t.direct_tls else (
            "STARTTLS" + ("" if a.starttls_offered is None else
                          " (offered)" if a.starttls_offered else " (NOT offered; sent anyway)"))
        tls = f", {a.tls.protocol} {a.tls.cipher or ''}".rstrip() if a.tls else ""
        alpn = f", ALPN {a.tls.alpn}" if a.tls and a.tls.alpn else ""
        row("connected", f"{a.address}, {how}{tls}{alpn}")
    for i, cert in enumerate(a.chain):
        row("chain" if i == 0 else "", f"[{i}] {cert.subject.rfc4514_string()}")
        row("", f"    SAN: {presented_ids(cert).describe()}; issuer {cert.issuer.rfc4514_string()}; "
                f"until {cert.not_valid_after_utc:%Y-%m-%d}")
    match = _posh_match(posh, a)
    if match is not None:
        row("POSH", f"leaf matches {match}" if match != "none" else "leaf matches no POSH fingerprint")
    if a.verdict is not None:
        v = a.verdict
        extra = []
        if v.matched:
            extra.append(f"record {_short(v.matched)}")
        if v.identity:
            extra.append(f"identity {v.identity}")
        row("verdict", f"{v.verdict.upper()}" + (f" ({v.prooftype})" if v.prooftype else "")
            + (", " + ", ".join(extra) if extra else ""))
        row("reason", v.reason)
        if a.error:
            row("note", a.error)
        if a.chain and reason_category(v) == "dane-mismatch":
            out += mismatch_lines(a.chain, t.tlsa, indent="  ")
    else:
        row("verdict", "FAILED (no verdict)")
        row("reason", a.error or "-")
    return out


def _read_chain(path: str) -> list[x509.Certificate]:
    from proxy.certfiles import CertFileError, read_chain

    try:
        return read_chain(path)
    except CertFileError as exc:
        raise _BadInput(f"--cert {exc}") from None


def _settings(config: str | Path | Config | None, nameserver: str | None):
    cfg: Config | None
    if config is None or isinstance(config, Config):
        cfg = config
    else:
        try:
            cfg = load_config(config)
        except ConfigError as exc:
            raise _BadInput("\n".join(exc.messages)) from None
    try:
        if nameserver is not None:
            parse_nameserver(nameserver)
            nameservers: Sequence[str] = [nameserver]
        else:
            nameservers = cfg.dns.nameservers if cfg else ["127.0.0.1"]
        resolver = Resolver(nameservers, cfg.dns.trust_ad_from if cfg else (),
                            cfg.dns.timeout if cfg else 5.0, probe=cfg.dns.probe if cfg else ".")
    except ValueError as exc:
        raise _BadInput(f"--nameserver: {exc}") from None
    try:
        policies = PolicySet.load(cfg.policy.dir or None) if cfg else PolicySet.load(None)
        trust = TrustStore.load((cfg.policy.ca_file or None) if cfg else None)
    except PolicyError as exc:
        raise _BadInput("\n".join(exc.messages)) from None
    except TrustStoreError as exc:
        raise _BadInput(f"policy.ca_file: {exc}") from None
    identities = {d.name: (d.cert, d.key) for d in cfg.domains} if cfg else {}
    client = cfg.domains[0].name if cfg and cfg.domains else None
    timeout = cfg.limits.handshake_timeout if cfg else CHECK_TIMEOUT
    contexts = TlsContexts(identities)
    if client:
        try:
            contexts.get(client)
        except TlsConfigError as exc:
            raise _BadInput(str(exc)) from None
    return resolver, policies, trust, contexts, client, timeout, (cfg.limits.max_stanza_bytes if cfg else None)


def _uses_posh(p: Policy) -> bool:
    """Whether `decide` can consult POSH under this policy (so a fetch is worth making)."""
    return p.require == "posh" or (p.posh and p.require in ("pkix", "dane-or-pkix"))


async def check_domain(domain: str, *, resolver: Resolver, policies: PolicySet, trust: TrustStore | None,
                       contexts: TlsContexts, client: str | None, timeout: float = CHECK_TIMEOUT,
                       posh: PoshFetcher | None = None, **attempt_kwargs: Any) -> CheckResult:
    """Gather DOMAIN's evidence and try every target; the result, unprinted.

    Only what the policy and its `transports` can use is looked up, as the proxy would: no
    lookup at all for a blocked domain, DOMAIN's POSH document only when the policy uses POSH,
    host-meta and WebSocket endpoints only with `transports` naming "websocket", the SRV/TCP
    targets only with "tcp" (their DNS evidence is still gathered: a bogus SRV fails the
    domain closed on every transport).  `posh`: the fetcher (default: the shared one for
    `resolver`)."""
    d = normalise_domain(domain)
    policy = policies.for_domain(d)
    recorder = resolver if isinstance(resolver, RecordingResolver) else RecordingResolver(resolver)
    # The POSH fetcher and host-meta discovery are shared per resolver (their caches, and
    # the test overrides); they belong to the real one, not to this recording view of it.
    base = recorder.inner
    result = CheckResult(d, policy, recorder, client)
    if policy.require == "block":
        result.domain_verdict = decide([], Evidence(domain=d), policy, trust=trust)
        return result
    fetcher = None
    if _uses_posh(policy):
        fetcher = posh if posh is not None else shared_fetcher(base)
    peer = await gather(d, recorder, static_srv=policy.srv, static_tlsa=policy.tlsa)
    result.evidence = peer
    if peer.failed:
        result.domain_verdict = decide([], Evidence(domain=d, statuses=dict(peer.srv_statuses)), policy, trust=trust)
        return result
    if fetcher is not None:
        result.posh = await fetcher.fetch(d, trust=trust)
    use_tcp, use_ws = "tcp" in policy.transports, "websocket" in policy.transports
    if use_ws:
        result.websocket = await discoverer_for(base).discover(d, trust=trust)
    if not peer.targets and not use_ws:
        why = ("it publishes no XMPP server-to-server service (SRV target '.')" if peer.no_service
               else "DNS gave no server to connect to")
        result.domain_verdict = reject(f"{d}: {why}", dns={k: str(v) for k, v in peer.statuses.items()},
                                       policy_source=policy.source)
        return result
    for target in peer.targets if use_tcp else ():
        attempt, _ = await attempt_target(peer, target, policy=policy, trust=trust, contexts=contexts,
                                          local_domain=client, timeout=timeout, connect_anyway=True,
                                          posh=fetcher, **attempt_kwargs)
        result.attempts.append(attempt)
    if use_ws:
        for url in result.websocket.urls:
            attempt, _ = await attempt_websocket(peer, url, policy=policy, trust=trust, contexts=contexts,
                                                 local_domain=client, resolver=base, timeout=timeout,
                                                 keep_open=False, overrides=discoverer_for(base).overrides)
            result.attempts.append(attempt)
    return result


async def run_check(domain: str, *, config: str | Path | Config | None = None, nameserver: str | None = None,
                    as_json: bool = False, out: TextIO | None = None, err: TextIO | None = None,
                    posh: PoshFetcher | None = None, inbound: bool = False, cert: str | None = None) -> int:
    """The `check` command: print the findings for DOMAIN; return the exit status (§5).
    `inbound`: the inbound rules (proxy/check_inbound.py), for a peer presenting `cert`."""
    err = err if err is not None else sys.stderr
    out = out if out is not None else sys.stdout
    d = normalise_domain(domain)
    if not d or any(c in d for c in "@/ "):
        print(f"xmpp-dane-proxy check: error: {domain!r} is not a domain name", file=err)
        return EXIT_BAD_INPUT
    if cert is not None and not inbound:
        print("xmpp-dane-proxy check: error: --cert goes with --inbound (the chain a peer presented)", file=err)
        return EXIT_BAD_INPUT
    try:
        resolver, policies, trust, contexts, client, timeout, max_bytes = _settings(config, nameserver)
        chain = _read_chain(cert) if cert is not None else []
    except _BadInput as exc:
        print(f"xmpp-dane-proxy check: error: {exc}", file=err)
        return EXIT_BAD_INPUT
    if inbound:
        from proxy.check_inbound import check_inbound

        try:
            found = await check_inbound(d, resolver=RecordingResolver(resolver), policies=policies, trust=trust,
                                        chain=chain, chain_source=cert)
        except ValueError as exc:
            print(f"xmpp-dane-proxy check: error: {domain!r}: {exc}", file=err)
            return EXIT_BAD_INPUT
        print(json.dumps(found.as_json_obj(), indent=2) if as_json else found.render(), file=out)
        return EXIT_ACCEPT if found.accepted else EXIT_REJECT
    kwargs: dict[str, Any] = {"max_stanza_bytes": max_bytes} if max_bytes else {}
    if posh is not None:
        kwargs["posh"] = posh
    try:
        result = await check_domain(d, resolver=resolver, policies=policies, trust=trust, contexts=contexts,
                                    client=client, timeout=timeout, **kwargs)
    except ValueError as exc:   # a name DNS cannot carry (label too long, bad IDNA)
        print(f"xmpp-dane-proxy check: error: {domain!r}: {exc}", file=err)
        return EXIT_BAD_INPUT
    if as_json:
        print(json.dumps(result.as_json_obj(), indent=2), file=out)
    else:
        print(result.render(), file=out)
    return EXIT_ACCEPT if result.accepted else EXIT_REJECT
