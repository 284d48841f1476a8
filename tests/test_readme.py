"""README shows the decision log line and the metrics list exactly as the program prints them
(issue 14): both are regenerated here from the real code and compared."""
from __future__ import annotations

import io
import logging
import re

from pki import self_signed
from policy.decide import decide
from policy.evidence import DnsStatus, Evidence
from policy.pkix import TrustStore
from policy.policyfile import Policy
from policy.tlsa import record_for
from proxy.logsetup import DECISION_LOGGER, LogfmtFormatter, log_decision
from proxy.metrics import CONNECTION_OUTCOMES, REASON_CATEGORIES, Metrics
from proxyenv import REPO

README = (REPO / "README.md").read_text()


def decision_line(domain: str, peer: str, *, matching: bool) -> str:
    cert = self_signed([domain])
    published = cert.cert if matching else self_signed([domain]).cert
    evidence = Evidence(domain, tlsa=(record_for(published, 3, 1, 1),), tlsa_status=DnsStatus.SECURE)
    verdict = decide(cert.chain, evidence, Policy(), trust=TrustStore.load(None))
    out = io.StringIO()
    logger = logging.Logger(DECISION_LOGGER)      # not registered: nothing else sees the record
    handler = logging.StreamHandler(out)
    handler.setFormatter(LogfmtFormatter(timestamps=False))   # as under systemd
    logger.addHandler(handler)
    log_decision("inbound", peer, domain, verdict.log_fields(), logger=logger)
    return out.getvalue().strip()


def shape(line: str) -> str:
    """The line with what differs per certificate (hex digests) made alike."""
    return re.sub(r"[0-9a-f]{16,}", "HEX", line)


def test_readme_decision_lines_are_what_the_proxy_logs():
    shown = [line for line in README.splitlines() if line.startswith("level=info logger=xmpp_dane_proxy.decision")]
    assert len(shown) == 2, shown
    for line, matching in zip(shown, (True, False)):
        peer = re.search(r" peer=(\S+)", line).group(1)
        domain = re.search(r" domain=(\S+)", line).group(1)
        real = decision_line(domain, peer, matching=matching)
        assert shape(line) == shape(real), f"README:\n{line}\nprogram:\n{real}"


def metrics_paragraph() -> str:
    start = README.index("**Metrics**")
    return README[start:README.index("\n\n", start)]


def test_readme_metrics_list_is_what_the_endpoint_serves():
    text = metrics_paragraph()
    body, _ = Metrics().exposition()
    families = {m.group(1) for m in re.finditer(r"^# TYPE xmpp_dane_proxy_(\S+) ", body.decode(), re.M)}
    listed = set(re.findall(r"`([a-z][a-z_]+)(?:\{[^}]*\})?`", text))
    assert families - listed == set(), f"served but not in README: {families - listed}"
    assert {n for n in listed if "_" in n and not n.startswith(("process_", "python_", "xmpp_dane_proxy_"))} - families == set()
    tokens = re.findall(r"`([a-z-]+)`", text)
    assert [t for t in tokens if t in REASON_CATEGORIES] == list(REASON_CATEGORIES)
    assert [t for t in tokens if t in CONNECTION_OUTCOMES] == list(CONNECTION_OUTCOMES)
