"""Verdicts that expire with their evidence (DESIGN §3.4).

S2S streams live for days.  Every accepted (peer domain, stream) pair is registered here with
what it was judged on — the peer's certificate chain, the negotiated TLS version and, outbound,
the target connected to — and is judged again:

* when its evidence expires: the shortest TTL of the DNS answers used, or a POSH document's
  cache lifetime (never sooner than `min_interval`, so zero-TTL records cannot make a hot loop);
* after every reload (`reload()`), against the policy just loaded.

Judging again means: fresh evidence (the resolver's cache has expired with the TTL), the
*current* policy, trust store and settings (`inbound_settings()` / `outbound_context()`), the
certificate the peer presented.  Still accepted: nothing visible (a debug line).  Not accepted:
the decision is logged as `event=decision … verdict=reject reason="re-verification: …"` and
counted, and the stream is closed through the callback it registered (a stream error to the
peer naming what changed, the backend's side ended politely).

Sharing and bounds: due pairs are taken in rounds, grouped by (direction, domain); the pairs
of one group are judged together, so their identical lookups are one query in the resolver
(its in-flight sharing and cache: many streams, one lookup).  Groups start at most
`max_per_second` per second and at most `max_concurrent` at once.

Resolver outages: a re-judgement that rejects only because DNS evidence timed out (or the
resolver failed its DNSSEC probe) does not close the stream at once: it is retried (every
`outage_retry` seconds) until `dns.reverify_grace` has passed since the first such failure;
only then is it a rejection like any other.  A resolver restart or a short upstream blip thus
tears nothing down, while a real outage still fails closed within the grace.  Bogus evidence
is never "an outage": it rejects at once (a sign of tampering, DESIGN §2.4).
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import trio
from cryptography import x509

from policy.verdict import Verdict, reject
from proxy.logsetup import log_decision, log_event

log = logging.getLogger("xmpp_dane_proxy.reverify")

__all__ = ["Reverifier", "Watched", "judge_inbound", "judge_outbound", "revocation_condition", "watch_inbound",
           "watch_outbound"]

# Never re-judge one pair more often than this: a zero or tiny TTL (or a POSH document with
# expires 0) would otherwise turn into a lookup loop.  30 s is unbound's default
# serve-expired-reply-ttl scale and keeps the extra load at most two lookups a minute per domain.
MIN_INTERVAL = 30.0
# While the resolver is unreachable, ask again this often (within the grace).
OUTAGE_RETRY = 30.0
# Bounds on re-judgement work: a reload with 10 000 open streams of 2 000 domains spreads over
# ~40 s at 50 domains/s instead of firing every lookup at once; 16 concurrent groups keep the
# resolver's queue short.
MAX_PER_SECOND = 50.0
MAX_CONCURRENT = 16
# Categories (proxy.metrics.reason_category) that mean "the resolver could not answer".
_OUTAGE_CATEGORIES = ("dns-timeout", "dns-unvalidated")

Judge = Callable[[], Awaitable[tuple[Verdict, "float | None"]]]
Revoke = Callable[[str, str], Awaitable[None]]   # (stream error condition, text)


@dataclass(eq=False)
class Watched:
    """One accepted pair on an open stream."""

    direction: str
    domain: str
    peer: str
    judge: Judge
    revoke: Revoke
    first: Verdict
    due: float = math.inf
    outage_since: float | None = None
    rounds: int = 0
    extra: dict[str, str] = field(default_factory=dict)


def revocation_condition(verdict: Verdict) -> str:
    """RFC 6120 §4.9.3 condition for a pair that is no longer accepted (DESIGN §3.5):
    `policy-violation` when the policy now blocks it, `not-authorized` otherwise."""
    return "policy-violation" if "blocked by policy" in verdict.reason else "not-authorized"


class Reverifier:
    """The registry of accepted pairs and the task (`run`) that judges them again."""

    def __init__(self, *, grace: float = 300.0, metrics: Any = None, min_interval: float = MIN_INTERVAL,
                 outage_retry: float = OUTAGE_RETRY, max_per_second: float = MAX_PER_SECOND,
                 max_concurrent: int = MAX_CONCURRENT) -> None:
        self.grace = float(grace)
        self.metrics = metrics
        self.min_interval = float(min_interval)
        self.outage_retry = float(outage_retry)
        self.max_per_second = float(max_per_second)
        self._limiter = trio.CapacityLimiter(max_concurrent)
        self._watched: set[Watched] = set()
        self._changed = trio.Event()
        # Where the current settings come from (set by the runner; None: the ones the stream
        # started with).
        self.inbound_settings: Callable[[], Any] | None = None
        self.outbound_context: Callable[[], Any] | None = None

    def __len__(self) -> int:
        return len(self._watched)

    # -- registration ----------------------------------------------------------------------

    def watch(self, direction: str, domain: str, peer: str, first: Verdict, judge: Judge,
              revoke: Revoke, **extra: str) -> Watched:
        """Register an accepted pair; it is first judged again after `min_interval` (the
        judgement then learns the evidence's lifetime).  Returns the handle for `unwatch`."""
        item = Watched(direction, domain, peer, judge, revoke, first,
                       due=trio.current_time() + self.min_interval, extra=dict(extra))
        self._watched.add(item)
        self._wake()
        return item

    def unwatch(self, item: Watched) -> None:
        """The stream ended: forget the pair."""
        self._watched.discard(item)

    def reload(self) -> None:
        """Configuration reloaded: every pair is due now (DESIGN §3.4)."""
        now = trio.current_time()
        for item in self._watched:
            item.due = min(item.due, now)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()

    # -- the task ----------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Judge due pairs again until cancelled."""
        task_status.started()
        while True:
            now = trio.current_time()
            due = [w for w in self._watched if w.due <= now]
            if not due:
                self._changed = trio.Event()
                wake_at = min((w.due for w in self._watched), default=math.inf)
                with trio.move_on_at(wake_at):
                    await self._changed.wait()
                continue
            groups: dict[tuple[str, str], list[Watched]] = defaultdict(list)
            for item in due:
                item.due = math.inf    # in progress; the judgement sets the next time
                groups[(item.direction, item.domain)].append(item)
            async with trio.open_nursery() as nursery:
                for index, members in enumerate(groups.values()):
                    if index:
                        await trio.sleep(1 / self.max_per_second)
                    nursery.start_soon(self._judge_group, members)

    async def _judge_group(self, members: Sequence[Watched]) -> None:
        async with self._limiter:
            async with trio.open_nursery() as nursery:
                for item in members:
                    nursery.start_soon(self._judge_one, item)

    async def _judge_one(self, item: Watched) -> None:
        if item not in self._watched:
            return
        try:
            verdict, lifetime = await item.judge()
        except Exception as exc:   # fail closed, like the first decision
            log.exception("re-verification of %s failed", item.domain)
            verdict, lifetime = reject(f"internal error while deciding: {type(exc).__name__}: {exc}"), None
        if item not in self._watched:
            return                 # the stream ended meanwhile
        now = trio.current_time()
        item.rounds += 1
        if verdict.accepted:
            item.outage_since = None
            item.due = now + max(self.min_interval, lifetime) if lifetime is not None else math.inf
            self._count(item.direction, "kept")
            log_event(log, logging.DEBUG, "reverified", direction=item.direction, domain=item.domain,
                      peer=item.peer, prooftype=verdict.prooftype or "-",
                      next_in=("-" if lifetime is None else f"{max(self.min_interval, lifetime):g}s"))
            return
        from proxy.metrics import reason_category

        if reason_category(verdict) in _OUTAGE_CATEGORIES:
            if item.outage_since is None:
                item.outage_since = now
            waited = now - item.outage_since
            if waited < self.grace:
                retry = min(self.outage_retry, self.grace - waited)
                item.due = now + retry
                self._count(item.direction, "deferred")
                log_event(log, logging.WARNING, "reverify-deferred", direction=item.direction,
                          domain=item.domain, peer=item.peer,
                          reason=f"{verdict.reason}; stream kept for up to {self.grace - waited:.0f}s more "
                                 f"(dns.reverify_grace = {self.grace:g}s), next try in {retry:g}s")
                return
        self._watched.discard(item)
        text = "re-verification: " + verdict.reason + _before(item.first)
        final = replace(verdict, reason=text)
        log_decision(item.direction, item.peer, item.domain, final.log_fields(), **item.extra)
        if self.metrics is not None:
            self.metrics.verdict(item.direction, verdict)
        self._count(item.direction, "revoked")
        try:
            await item.revoke(revocation_condition(verdict), text)
        except Exception:
            log.exception("closing the stream of %s after re-verification failed", item.domain)

    def _count(self, direction: str, result: str) -> None:
        if self.metrics is not None and hasattr(self.metrics, "reverification"):
            self.metrics.reverification(direction, result)


def _before(first: Verdict) -> str:
    """What the pair was accepted on before, so the text says what changed."""
    how = first.prooftype or "-"
    record = f" record {first.matched}" if first.matched else ""
    return f" (accepted before by {how}{record})"


# ---------------------------------------------------------------------------------------------
# Judging again: the same decision as the first time, with the current settings


def _tls_too_old(version: str, policy) -> Verdict | None:
    def parts(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(p) for p in text.split("."))
        except ValueError:
            return (0,)

    if version and parts(version) < parts(policy.tls_min_version):
        return reject(f"TLS {version} negotiated but policy requires TLS >= {policy.tls_min_version}",
                      policy_source=policy.source)
    return None


def _lifetime(evidence, posh) -> float | None:
    candidates = [t for t in (getattr(evidence, "ttl", None),) if t is not None]
    if posh is not None:
        candidates.append(posh.cache_seconds)
    return float(min(candidates)) if candidates else None


async def judge_inbound(settings, domain: str, chain: Sequence[x509.Certificate],
                        tls_version: str) -> tuple[Verdict, float | None]:
    """The inbound decision for `domain` (as `proxy.inbound.InboundConnection._evaluate`
    makes it) with `settings`, and the lifetime of the evidence it rested on."""
    from proxy.posh_fetch import decide_with_posh

    policy = settings.policies.for_domain(domain)
    too_old = _tls_too_old(tls_version, policy)
    if too_old is not None:
        return too_old, None
    evidence = await settings.evidence_for(domain, policy)
    verdict, posh = await decide_with_posh(list(chain), evidence, policy, trust=settings.trust,
                                           fetcher=settings.posh)
    return verdict, _lifetime(evidence, posh)


def watch_inbound(conn, domain: str, verdict: Verdict) -> Watched:
    """Register `domain`, accepted on the inbound connection `conn` (a
    `proxy.inbound.InboundConnection`), with its settings' reverifier."""
    reverify: Reverifier = conn.settings.reverify
    tls = conn.session.tls
    version = tls.version if tls is not None else ""

    async def judge() -> tuple[Verdict, float | None]:
        settings = reverify.inbound_settings() if reverify.inbound_settings else conn.settings
        # Parsed per round, not held: the watched stream is mostly idle (TlsInfo).
        chain = tls.chain if tls is not None else ()
        return await judge_inbound(settings, domain, chain, version)

    async def revoke(condition: str, text: str) -> None:
        await conn._perform(conn.session.revoked(condition, text))

    return reverify.watch("inbound", domain, conn.peer, verdict, judge, revoke)


def watch_outbound(run, nursery: trio.Nursery) -> Watched | None:
    """Register the peer accepted for the outbound stream `run` (a `proxy.outbound._Run` in
    its relay phase); revoking sends the session's goodbye and cancels the relay `nursery`."""
    reverify: Reverifier = run.ctx.reverify
    connection, opening = run.connection, run.session.opening
    if connection is None or opening is None or connection.attempt.verdict is None:
        return None
    attempt = connection.attempt
    version = attempt.tls.version if attempt.tls is not None else ""
    websocket = attempt.mode == "websocket"

    async def judge() -> tuple[Verdict, float | None]:
        ctx = reverify.outbound_context() if reverify.outbound_context else run.ctx
        return await judge_outbound(ctx, opening.peer_domain, attempt.target, attempt.chain, version,
                                    websocket=websocket)

    async def revoke(condition: str, text: str) -> None:
        await run._send_quietly(run.session.revoked(condition, text))
        nursery.cancel_scope.cancel()

    return reverify.watch("outbound", opening.peer_domain, run.peer_addr, attempt.verdict, judge, revoke,
                          local=opening.local_domain)


async def judge_outbound(ctx, domain: str, target, chain: Sequence[x509.Certificate],
                         tls_version: str, *, websocket: bool = False) -> tuple[Verdict, float | None]:
    """The outbound decision for the peer at `target` (a `policy.peer_evidence.SrvTarget`)
    with the context `ctx` (a `proxy.outbound.OutboundContext`): fresh SRV/TLSA evidence, the
    target looked up again by host, port and mode.  A WebSocket peer (XEP-0468) is judged on
    the domain's evidence, as `proxy.websocket_outbound.attempt_websocket` judged it."""
    from policy.evidence import Evidence
    from policy.peer_evidence import gather
    from proxy.posh_fetch import decide_with_posh, shared_fetcher

    policy = ctx.policies.for_domain(domain)
    too_old = _tls_too_old(tls_version, policy)
    if too_old is not None:
        return too_old, None
    peer = await gather(domain, ctx.resolver, static_srv=policy.srv, static_tlsa=policy.tlsa)
    if peer.failed:
        evidence = Evidence(domain=peer.domain, statuses=dict(peer.statuses), notes=peer.notes)
    elif websocket:
        evidence = peer.for_inbound()
    else:
        same = [t for t in peer.targets
                if (t.host, t.port, t.direct_tls) == (target.host, target.port, target.direct_tls)]
        if not same:
            return reject(f"{target.host}:{target.port} is no longer a published target of {domain}",
                          policy_source=policy.source), None
        evidence = peer.for_target(same[0])
    verdict, posh = await decide_with_posh(list(chain), evidence, policy, trust=ctx.trust,
                                           fetcher=shared_fetcher(ctx.resolver))
    return verdict, _lifetime(evidence, posh)
