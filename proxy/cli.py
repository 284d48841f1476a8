"""Command line (DESIGN §5): run, check-config, verify, tlsa, check.

Exit codes: 0 success/accept, 1 rejection or configuration errors, 2 bad input (usage errors,
unreadable files, values that make no sense).  Every error is one line an operator can act on.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
from collections.abc import Sequence

from cryptography import x509

from policy import tlsa as tlsa_mod
from policy.decide import decide
from policy.evidence import DnsStatus, Evidence
from policy.pkix import TrustStore, TrustStoreError
from policy.pkix_names import normalise_domain
from policy.policyfile import DEFAULT_DANE_USES, DANE_USE_NAMES, REQUIRE_MODES, Policy
from policy.tlsa import parse_tlsa_lenient, record_for
from proxy import certfiles
from proxy.config import DEFAULT_CONFIG_PATH

EXIT_OK, EXIT_REJECT, EXIT_BAD_INPUT = 0, 1, 2
_DNSSEC_CHOICES = ("secure", "insecure", "bogus")


class BadInput(Exception):
    """Input the command cannot work with; printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    # argparse exits 2 on usage errors already; keep its one-line message, drop the usage dump.
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from proxy import __version__

    p = _Parser(prog="xmpp-dane-proxy", description="DANE for XMPP server-to-server traffic.",
                epilog="Exit status: 0 success or accept, 1 reject or configuration errors, 2 bad input.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    config_help = f"the configuration file (default {DEFAULT_CONFIG_PATH})"

    run = sub.add_parser("run", help="run the proxy in the foreground",
                         description="Run the proxy in the foreground (systemd Type=notify). SIGHUP reloads "
                                     "config, policy and certificates; SIGTERM drains and stops.")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG_PATH, help=config_help)

    cc = sub.add_parser("check-config", help="validate the config and every policy file",
                        description="Check the configuration, every policy file and every domain's "
                                    "certificate and key; print each problem as file:line: message.")
    cc.add_argument("-c", "--config", default=DEFAULT_CONFIG_PATH, help=config_help)

    v = sub.add_parser("verify", help="offline verdict for a certificate chain")
    v.add_argument("--chain", required=True, help="PEM file, leaf first, as the peer presents it")
    v.add_argument("--domain", required=True, help="the peer domain D")
    v.add_argument("--srv-target", action="append", default=[], help="securely delegated SRV target")
    v.add_argument("--tlsa", action="append", default=[], help='a TLSA record "U S M HEX"')
    v.add_argument("--dnssec", default="secure", help="DNSSEC status of the TLSA RRset: secure|insecure|bogus")
    v.add_argument("--require", default="dane-or-pkix", help="|".join(REQUIRE_MODES))
    v.add_argument("--dane-uses", default=None, help="comma list, e.g. DANE-EE,DANE-TA")
    v.add_argument("--ca-file", default=None, help="PKIX trust anchors (default: system store)")
    v.add_argument("--at", default=None, help="validation time, ISO-8601")
    v.add_argument("--posh", action="store_true", help="a POSH match counts where PKIX would (policy posh = true)")
    v.add_argument("--posh-file", default=None,
                   help="D's POSH document (RFC 7711 JSON, as served at /.well-known/posh/xmpp-server.json)")
    v.add_argument("--json", action="store_true", help="print one JSON object")

    t = sub.add_parser("tlsa", help="print the TLSA record for a certificate, or check our own (--check)")
    t.add_argument("--cert", default=None,
                   help="PEM chain to print a record for; with --check: a candidate chain to compare instead of the served one")
    t.add_argument("--check", metavar="DOMAIN", default=None,
                   help="compare a [[domain]]'s published TLSA with the served chain and staged next key")
    t.add_argument("-c", "--config", default=DEFAULT_CONFIG_PATH, help="with --check: the proxy's config file")
    t.add_argument("--nameserver", default=None, help="with --check: resolver HOST[:PORT] instead of [dns]")
    t.add_argument("--json", action="store_true", help="with --check: print one JSON object")
    t.add_argument("--usage", default="3", help="0-3 or PKIX-TA, PKIX-EE, DANE-TA, DANE-EE (default 3)")
    t.add_argument("--selector", default="1", help="0/CERT or 1/SPKI (default 1)")
    t.add_argument("--mtype", default="1", help="0/FULL, 1/SHA2-256 or 2/SHA2-512 (default 1)")
    t.add_argument("--host", default=None, help="owner name host (default: the leaf's first DNS name)")
    t.add_argument("--port", type=int, default=5269, help="owner name port (default 5269)")

    cp = sub.add_parser("contrib-path", help="print where the backends' modules (contrib/) are installed",
                        description="Print the directory of the installed backend modules, for "
                                    "Prosody's plugin_paths or ejabberd's modules directory.")
    cp.add_argument("backend", nargs="?", default=None,
                    help="a backend (prosody, ejabberd): print its subdirectory instead of contrib/ itself")

    man = sub.add_parser("manpage", help="print the manual page (roff), generated from these options",
                         description="Print the manual page, e.g. > /usr/local/share/man/man1/xmpp-dane-proxy.1")
    del man
    comp = sub.add_parser("completion", help="print a shell completion script",
                          description="Print a completion script, e.g. "
                                      "> /etc/bash_completion.d/xmpp-dane-proxy")
    comp.add_argument("shell", choices=("bash", "zsh", "tcsh"), help="the shell")

    ch = sub.add_parser("check", help="live check of a peer domain")
    ch.add_argument("domain", help="the peer domain to check")
    ch.add_argument("-c", "--config", default=None, help="the proxy's configuration (resolver, policy.d, trust store)")
    ch.add_argument("--nameserver", default=None, help="a DNSSEC-validating resolver, HOST[:PORT]")
    ch.add_argument("--json", action="store_true", help="print one JSON object")
    ch.add_argument("--inbound", action="store_true",
                    help="apply the inbound rules (a peer of DOMAIN connecting to us) instead of the outbound ones")
    ch.add_argument("--cert", default=None, help="with --inbound: the chain the peer presented (PEM, leaf first)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"run": cmd_run, "check-config": cmd_check_config, "verify": cmd_verify,
               "tlsa": cmd_tlsa, "check": cmd_check, "contrib-path": cmd_contrib_path,
               "manpage": cmd_manpage, "completion": cmd_completion}[args.command]
    try:
        return handler(args)
    except BadInput as exc:
        print(f"xmpp-dane-proxy {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


# --- helpers ----------------------------------------------------------------------------------

def read_chain(path: str) -> list[x509.Certificate]:
    try:
        return certfiles.read_chain(path)
    except certfiles.CertFileError as exc:
        raise BadInput(str(exc)) from None


def read_posh_file(path: str, domain: str):
    """`verify --posh-file`: a POSH document read from disk stands for a successful fetch."""
    from policy.posh import PoshError, PoshResult, PoshStatus, cache_seconds, parse_document

    try:
        with open(path, "rb") as f:
            doc = parse_document(f.read())
    except OSError as exc:
        raise BadInput(f"--posh-file {path}: {exc.strerror}") from None
    except PoshError as exc:
        raise BadInput(f"--posh-file {path}: {exc}") from None
    if doc.reference is not None:
        raise BadInput(f"--posh-file {path}: a reference to {doc.reference.url}; give the referenced document")
    return PoshResult(domain, PoshStatus.OK, descriptors=doc.descriptors, url=path, notes=doc.notes,
                      cache_seconds=cache_seconds(doc.expires))


def parse_time(text: str) -> _dt.datetime:
    try:
        when = _dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise BadInput(f"--at {text!r} is not an ISO-8601 time (e.g. 2026-01-31T12:00:00Z)") from None
    return when if when.tzinfo else when.replace(tzinfo=_dt.timezone.utc)


def parse_uses(text: str) -> frozenset[int]:
    uses = set()
    for item in (x.strip() for x in text.split(",")):
        if item.upper() in DANE_USE_NAMES:
            uses.add(DANE_USE_NAMES[item.upper()])
        elif item in ("0", "1", "2", "3"):
            uses.add(int(item))
        else:
            raise BadInput(f"--dane-uses: unknown usage {item!r} (use {', '.join(DANE_USE_NAMES)})")
    return frozenset(uses)


# --- commands ---------------------------------------------------------------------------------

def cmd_verify(args: argparse.Namespace) -> int:
    if args.dnssec not in _DNSSEC_CHOICES:
        raise BadInput(f"--dnssec {args.dnssec!r}: use one of {', '.join(_DNSSEC_CHOICES)}")
    if args.require not in REQUIRE_MODES:
        raise BadInput(f"--require {args.require!r}: use one of {', '.join(REQUIRE_MODES)}")
    uses = parse_uses(args.dane_uses) if args.dane_uses is not None else DEFAULT_DANE_USES
    now = parse_time(args.at) if args.at else None
    chain = read_chain(args.chain)
    try:
        trust = TrustStore.load(args.ca_file)
    except TrustStoreError as exc:
        raise BadInput(str(exc)) from None
    domain = normalise_domain(args.domain)
    if not domain:
        raise BadInput("--domain is empty")
    evidence = Evidence(
        domain=domain,
        tlsa=tuple(parse_tlsa_lenient(t) for t in args.tlsa),
        tlsa_status=DnsStatus(args.dnssec),
        delegated_targets=tuple(normalise_domain(t) for t in args.srv_target),
    )
    policy = Policy(require=args.require, dane_uses=uses, posh=args.posh, source="command line")
    posh = read_posh_file(args.posh_file, domain) if args.posh_file else None
    verdict = decide(chain, evidence, policy, trust=trust, now=now, posh=posh)
    if args.json:
        print(verdict.to_json())
    else:
        print(f"verdict:   {verdict.verdict}")
        print(f"prooftype: {verdict.prooftype or '-'}")
        print(f"matched:   {verdict.matched or '-'}")
        print(f"identity:  {verdict.identity or '-'}")
        print(f"reason:    {verdict.reason}")
        from proxy.metrics import reason_category

        if chain and reason_category(verdict) == "dane-mismatch":
            # As posttls-finger / ldns-dane do: the chain's own values beside the records, in full.
            from policy.chain_tlsa import mismatch_lines

            print("\n".join(mismatch_lines(chain, evidence.tlsa, indent="")))
    return EXIT_OK if verdict.accepted else EXIT_REJECT


def _field(text: str, mnemonics: dict[str, int], flag: str, allowed: tuple[int, ...]) -> int:
    value = mnemonics.get(text.upper(), int(text) if text.isdigit() else None)
    if value not in allowed:
        raise BadInput(f"{flag} {text!r}: use one of {', '.join(map(str, allowed))} or its mnemonic")
    return value


def cmd_tlsa(args: argparse.Namespace) -> int:
    if args.check is not None:
        import functools

        import trio

        from proxy.own_tlsa import run_tlsa_check

        return trio.run(functools.partial(run_tlsa_check, args.check, config=args.config,
                                          nameserver=args.nameserver, cert=args.cert, as_json=args.json))
    if args.cert is None:
        raise BadInput("--cert PEM is needed (or --check DOMAIN)")
    usage = _field(args.usage, {v: k for k, v in tlsa_mod.USAGE_NAMES.items()}, "--usage", (0, 1, 2, 3))
    selector = _field(args.selector, {"CERT": 0, "SPKI": 1}, "--selector", (0, 1))
    mtype = _field(args.mtype, {"FULL": 0, "SHA2-256": 1, "SHA2-512": 2}, "--mtype", (0, 1, 2))
    if not 0 < args.port <= 65535:
        raise BadInput(f"--port {args.port}: must be 1-65535")
    chain = read_chain(args.cert)
    # A trust-anchor usage designates the top of the chain (the CA the operator controls);
    # an end-entity usage designates the leaf.
    cert = chain[-1] if usage in (tlsa_mod.PKIX_TA, tlsa_mod.DANE_TA) else chain[0]
    record = record_for(cert, usage, selector, mtype)
    host = args.host
    if host is None:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = [n for n in san.get_values_for_type(x509.DNSName) if "*" not in n]
        except x509.ExtensionNotFound:
            names = []
        host = names[0] if names and usage in (tlsa_mod.PKIX_EE, tlsa_mod.DANE_EE) else None
    if host:
        print(f"_{args.port}._tcp.{normalise_domain(host)}. IN TLSA {record}")
    else:
        print(str(record))
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    from proxy.check_config import check_config_file

    report = check_config_file(args.config)
    for line in report.errors:
        print(line, file=sys.stderr)
    if not report.ok:
        return EXIT_REJECT
    print(report.summary())
    from proxy.config import load_config

    for line in probe_warnings(load_config(args.config)):
        print(line, file=sys.stderr)
    return EXIT_OK


def probe_warnings(cfg) -> list[str]:
    """DESIGN §2.1 item 5: ask each resolver for `dns.probe` now; a resolver that does not
    validate is a warning here (the files are fine, and at boot the resolver may not be up
    yet), while the running proxy fails closed: insecure answers count as unvalidated."""
    import trio

    from policy.dns import Resolver

    resolver = Resolver(cfg.dns.nameservers, cfg.dns.trust_ad_from, cfg.dns.timeout, probe=cfg.dns.probe)
    return [f"warning: dns: {r.describe()}; while it does not, every answer that would be insecure "
            f"counts as unvalidated and rejects" for r in trio.run(resolver.probe) if not r.ok]


def cmd_run(args: argparse.Namespace) -> int:
    import trio

    from proxy.listen import ListenError
    from proxy.reload import StateLoadError
    from proxy.runner import run_proxy
    from proxy.socket_activation import SocketActivationError

    try:
        trio.run(run_proxy, args.config)
    except StateLoadError as exc:
        for line in exc.messages:
            print(line, file=sys.stderr)
        return EXIT_REJECT
    except SocketActivationError as exc:
        print(f"xmpp-dane-proxy run: {exc}", file=sys.stderr)
        return EXIT_REJECT
    except ListenError as exc:
        # EADDRINUSE / EACCES when binding a listen address: the message names it.
        print(f"xmpp-dane-proxy run: {exc}", file=sys.stderr)
        return EXIT_REJECT
    except OSError as exc:
        print(f"xmpp-dane-proxy run: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_REJECT
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    import functools

    import trio

    from proxy.check import config_or_default, run_check

    return trio.run(functools.partial(run_check, args.domain, config=config_or_default(args.config),
                                      nameserver=args.nameserver, as_json=args.json,
                                      inbound=args.inbound, cert=args.cert))


def cmd_contrib_path(args: argparse.Namespace) -> int:
    from proxy.contrib_path import backends, contrib_dir

    root = contrib_dir()
    if root is None:
        raise BadInput("contrib/ is not installed with this copy of the proxy; reinstall it with pip")
    if args.backend is None:
        print(root)
    elif args.backend in backends():
        print(root / args.backend)
    else:
        raise BadInput(f"no modules for {args.backend!r} (there are: {', '.join(backends())})")
    return EXIT_OK


def cmd_manpage(args: argparse.Namespace) -> int:
    from proxy.cli_docs import manpage

    print(manpage(build_parser()), end="")
    return EXIT_OK


def cmd_completion(args: argparse.Namespace) -> int:
    from proxy.cli_docs import completion

    print(completion(build_parser(), args.shell), end="")
    return EXIT_OK
