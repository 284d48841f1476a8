"""The proxy's resolver, built from `[dns]`, with its DNSSEC probe wired to logs and metrics
(DESIGN §2.1 item 5).

`make_resolver(config.dns)` is what every part of the proxy (run, check) uses, so all of them
probe the same name.  A probe result that changes (validating -> not, or back) is logged loudly
once, at error level when validation is lost; `probe_periodically` asks again every
`policy.dns.PROBE_INTERVAL` seconds while the proxy runs (lookups also re-probe lazily when the
last probe is older than that).
"""
from __future__ import annotations

import logging
from typing import Any

import trio

from policy.dns import ProbeResult, Resolver
from proxy.logsetup import log_event

log = logging.getLogger("xmpp_dane_proxy.dns")

__all__ = ["make_resolver", "probe_periodically"]


def make_resolver(dns: Any, *, metrics: Any = None) -> Resolver:
    """A `policy.dns.Resolver` for a `proxy.config.DnsConfig`, counting lookups and probe
    results into `metrics` (a `proxy.metrics.Metrics`) when given."""

    def on_probe(result: ProbeResult) -> None:
        if metrics is not None:
            metrics.dns_probe(result.server, result.ok)
        if result.ok:
            log_event(log, logging.INFO, "dns-probe", resolver=result.server, probe=result.probe,
                      validating="yes", reason=result.describe())
        else:
            log_event(log, logging.ERROR, "dns-probe", resolver=result.server, probe=result.probe,
                      validating="no",
                      reason=result.describe() + "; every answer that would be insecure now counts "
                      "as unvalidated and rejects (DANE cannot be told from no DANE)")

    on_lookup = None
    if metrics is not None:
        def on_lookup(rdtype: str, status: str, cached: bool) -> None:
            metrics.dns_lookup(rdtype, status, cached=cached)

    return Resolver(dns.nameservers, dns.trust_ad_from, dns.timeout, probe=dns.probe,
                    on_probe=on_probe, on_lookup=on_lookup)


async def probe_periodically(resolver: Resolver, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Probe now, report started, then probe every `resolver.probe_interval` seconds."""
    await resolver.probe()
    task_status.started()
    while True:
        await trio.sleep(resolver.probe_interval)
        await resolver.probe()
