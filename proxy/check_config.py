"""`xmpp-dane-proxy check-config`: every problem of the configuration in one run (DESIGN §5).

The proxy itself refuses to start on the first file that is wrong; an operator fixing files
wants the whole list at once.  So the configuration is read leniently (a bad value is listed
and left at its default), and the policy directory, the trust store and every `[[domain]]`'s
certificate and key are checked even when the configuration itself has errors — except where
the broken value is the one that says where to look (a bad `policy.dir` is not replaced by the
default directory, which would report problems of files the operator never meant).

Every problem is one `file:line: message` line, with the line of the key it is about.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field

from cryptography import x509

from policy.pkix import TrustStore, TrustStoreError
from policy.pkix_names import match_identity
from policy.policyfile import PolicyError, PolicySet
from policy.tomlfile import TomlDocument, TomlFileError
from proxy import certfiles
from proxy.config import Config, DomainConfig, config_and_errors
from proxy.own_tlsa import next_key_problems


@dataclass
class ConfigReport:
    """What `check-config` found: `errors` (each `file:line: message`) and counts for the ok line."""

    path: str
    errors: list[str] = field(default_factory=list)
    domains: int = 0
    policy_files: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        return f"{self.path}: ok ({self.domains} domains, {self.policy_files} policy files)"


def check_config_file(path: str, *, now: _dt.datetime | None = None) -> ConfigReport:
    """Check the configuration at `path` and everything it points to."""
    report = ConfigReport(str(path))
    try:
        doc = TomlDocument.read(path)
    except TomlFileError as exc:        # unreadable or not TOML: nothing else can be known
        report.errors.extend(exc.messages)
        return report
    cfg, errors = config_and_errors(doc)
    report.errors.extend(errors)
    report.domains = len(cfg.domains)
    # "FILE:LINE: section.key message" -> "section.key", for the keys whose value was refused.
    bad_keys = {m[len(doc.path):].split(": ", 1)[-1].split(" ", 1)[0] for m in errors}

    if "domain" not in doc.data:
        # The proxy would start, but every peer would get host-unknown and the backend's
        # outgoing streams would have no certificate to present.
        report.errors.append(f"{doc.path}:1: no [[domain]]: add one per domain the backend serves "
                             "(name, cert, key)")
    if "policy.dir" not in bad_keys:
        try:
            report.policy_files = PolicySet.load(cfg.policy.dir or None).files
        except PolicyError as exc:
            report.errors.extend(_locate_policy_dir(exc.messages, doc, cfg))
    if cfg.policy.ca_file and "policy.ca_file" not in bad_keys:
        try:
            TrustStore.load(cfg.policy.ca_file)
        except TrustStoreError as exc:
            report.errors.append(f"{doc.where('ca_file', 'policy')}: policy.ca_file: {exc}")
    when = now or _dt.datetime.now(_dt.timezone.utc)
    for dom in cfg.domains:
        report.errors.extend(check_domain(doc, dom, when))
        report.errors.extend(next_key_problems(doc, dom))    # the staged TLSA rollover key (own_tlsa)
    return report


def _locate_policy_dir(messages: list[str], doc: TomlDocument, cfg: Config) -> list[str]:
    # "policy directory does not exist" is reported by PolicySet at <dir>:0; the line that
    # needs fixing is `dir =` in the configuration.
    missing = f"{cfg.policy.dir}:0: policy directory does not exist"
    return [f"{doc.where('dir', 'policy')}: policy.dir: {cfg.policy.dir} does not exist" if m == missing else m
            for m in messages]


def check_domain(doc: TomlDocument, dom: DomainConfig, now: _dt.datetime) -> list[str]:
    """Problems with one local domain's certificate and key, at the lines of `cert =` / `key =`."""
    cert_at = doc.where("cert", "domain", dom.index) if dom.index >= 0 else f"{doc.path}:0"
    key_at = doc.where("key", "domain", dom.index) if dom.index >= 0 else f"{doc.path}:0"
    try:
        chain, _ = certfiles.load_identity(dom.cert, dom.key)
    except certfiles.CertFileError as exc:
        text = str(exc)
        at = key_at if text.startswith(dom.key) and not text.startswith(dom.cert) else cert_at
        return [f"{at}: domain {dom.name}: {text}"]
    errors = []
    for i, cert in enumerate(chain):
        which = "certificate" if i == 0 else f"chain certificate [{i}] ({cert.subject.rfc4514_string()})"
        if cert.not_valid_after_utc < now:
            errors.append(f"{cert_at}: domain {dom.name}: {which} expired on "
                          f"{_iso(cert.not_valid_after_utc)} ({dom.cert}); peers reject it")
        elif cert.not_valid_before_utc > now:
            errors.append(f"{cert_at}: domain {dom.name}: {which} is not valid before "
                          f"{_iso(cert.not_valid_before_utc)} ({dom.cert}); peers reject it until then")
    if match_identity(chain[0], [dom.name]) is None:
        errors.append(f"{cert_at}: domain {dom.name}: the certificate does not name {dom.name} "
                      f"(it names {_names(chain[0])}); peers that check names (PKIX, DANE-TA) reject it")
    return errors


def _iso(when: _dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _names(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    return ", ".join(names) or "no DNS name"
