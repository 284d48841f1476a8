"""`xmpp-dane-proxy run`: the long-running process (DESIGN §5, §6).

Order of start-up: read every file (config, policies, trust store, certificates) — any
problem is fatal and reported as `file:line: message`; configure logging; take the listening
sockets from systemd (LISTEN_FDS) or bind them; serve inbound, outbound and metrics; tell
systemd READY=1.  SIGHUP reloads everything atomically (a broken file keeps the old state and
logs where the problem is); SIGTERM/SIGINT stop accepting, end every stream with
`system-shutdown` after relaying what was already received, and return.
"""
from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from policy.dns import Resolver
from proxy.fdlimit import raise_soft_limit
from proxy.logsetup import configure_logging, log_event
from proxy.metrics import Metrics, open_metrics_listeners, serve_metrics
from proxy.own_tlsa import OwnTlsaGuard
from proxy.outbound import OutboundContext, OutboundProxy, open_outbound_listeners
from proxy.resolver import make_resolver, probe_periodically
from proxy.reverify import Reverifier
from proxy.reload import RuntimeState, StateHolder, reload_on_sighup
from proxy.sdnotify import Notifier
from proxy.dialback_keys import DialbackKeys
from proxy.inbound import InboundSettings
from proxy.server import ProxyServer, inbound_settings, open_listeners
from proxy.socket_activation import listen_fds
from proxy.worker_process import WorkerSetup

log = logging.getLogger("xmpp_dane_proxy.run")

# How long SIGTERM waits for streams to say system-shutdown and flush before giving up: well
# inside systemd's default TimeoutStopSec of 90 s, and longer than one slow peer's TCP flush.
DRAIN_SECONDS = 10.0


@dataclass(frozen=True)
class Handlers:
    """What one configuration load gives the two directions; swapped as a whole on reload."""

    inbound: InboundSettings
    outbound: OutboundContext


def build_handlers(state: RuntimeState, *, resolver: Resolver, metrics: Metrics) -> Handlers:
    """Inbound settings and the outbound context from one consistent `RuntimeState`.

    Raises on any bad file; the StateHolder then keeps the previous state.
    """
    return Handlers(
        inbound=inbound_settings(state.config, resolver=resolver, policies=state.policies,
                                 trust=state.trust, metrics=metrics),
        outbound=OutboundContext.from_config(state.config, resolver=resolver, metrics=metrics,
                                             policies=state.policies, trust=state.trust),
    )


async def run_proxy(config_path: str | Path, *, notifier: Notifier | None = None,
                    task_status=trio.TASK_STATUS_IGNORED, worker: WorkerSetup | None = None,
                    dialback_secret: bytes | None = None) -> None:
    """Run until SIGTERM/SIGINT (or cancellation).  Raises StateLoadError on bad files at start.

    With `[server] workers` other than 1 this process becomes the supervisor of N workers
    (proxy/workers.py); `worker` is set when this process is one of them (it then serves the
    sockets it was handed and binds nothing)."""
    notifier = notifier or Notifier()
    metrics = Metrics()
    resolvers: list[Resolver] = []
    reverifiers: list[Reverifier] = []
    dialback_keys = DialbackKeys(dialback_secret)

    def build(state: RuntimeState) -> Handlers:
        # One resolver for the process lifetime, so its cache survives reloads; a reload
        # that changes dns.* takes effect at the next restart (reported as a warning).
        if not resolvers:
            dns = state.config.dns
            resolvers.append(make_resolver(dns, metrics=metrics))
            # DESIGN §3.4: one registry of accepted pairs for the process lifetime.
            reverifiers.append(Reverifier(grace=dns.reverify_grace, metrics=metrics))
        handlers = build_handlers(state, resolver=resolvers[0], metrics=metrics)
        handlers.inbound.reverify = handlers.outbound.reverify = reverifiers[0]
        # One secret for the process lifetime (and, with workers, the service's: the
        # supervisor's), so keys minted before a reload are still recognised after it.
        handlers.inbound.dialback_keys = handlers.outbound.dialback_keys = dialback_keys
        return handlers

    # A worker's loads are its supervisor's to count (proxy/service_metrics.py).
    holder = StateHolder(config_path, build_tls=build, metrics=metrics if worker is None else None)
    cfg = holder.state.config
    configure_logging(cfg.log.level, cfg.log.format)
    for warning in holder.state.warnings if worker is None else ():
        log.warning(warning)
    soft, hard, fd_warning = raise_soft_limit(cfg.limits.max_connections)
    log_event(log, logging.WARNING if fd_warning else logging.INFO, "fd-limit", soft=soft, hard=hard,
              **({"warning": fd_warning} if fd_warning else {}))

    sockets = listen_fds() if worker is None else worker.sockets
    if worker is None and cfg.server.workers != 1:
        from proxy.workers import supervise, worker_count

        if worker_count(cfg.server.workers) > 1:
            await supervise(holder, metrics, sockets, resolver=resolvers[0], drain_seconds=DRAIN_SECONDS,
                            notifier=notifier, task_status=task_status)
            return

    def wrap(role: str) -> list[trio.SocketListener]:
        return [trio.SocketListener(s) for s in sockets.get(role, [])]

    async def bind(open_fn, addresses):
        # A worker never binds: its supervisor did, once for all workers.
        return await open_fn(addresses) if worker is None else []

    inbound = wrap("inbound") or await bind(open_listeners, cfg.inbound.listen)
    outbound = wrap("outbound") or await bind(open_outbound_listeners, cfg.outbound.listen)
    websocket = wrap("websocket") or await bind(open_listeners, cfg.inbound.websocket_listen)
    metrics_listeners = wrap("metrics") or await bind(open_metrics_listeners, cfg.metrics.listen)

    handlers: Handlers = holder.state.tls
    outbound_proxy = OutboundProxy(context=handlers.outbound)
    server = ProxyServer(cfg, resolver=resolvers[0], metrics=metrics, settings=handlers.inbound,
                         outbound_handler=outbound_proxy if outbound else None)

    def swap(old: RuntimeState, new: RuntimeState) -> None:
        # Streams already running keep the settings they started with; new ones get these.
        server.settings, server.config = new.tls.inbound, new.config
        outbound_proxy.context = new.tls.outbound
        configure_logging(new.config.log.level, new.config.log.format)
        if nurseries:  # DESIGN §2.1 item 5: the DNSSEC probe is asked again on reload
            nurseries[0].start_soon(resolvers[0].probe)
        reverifiers[0].reload()   # DESIGN §3.4: every open pair is judged against the new policy

    holder.subscribe(swap)
    nurseries: list[trio.Nursery] = []
    # Our own TLSA against the served chain: at start, on reload (with its veto) and daily.
    # A worker leaves that to its supervisor, which vets a reload before any worker sees it.
    own_tlsa = OwnTlsaGuard(resolvers[0], metrics=metrics) if worker is None else None
    if own_tlsa is not None:
        holder.vet = own_tlsa.vet_reload

    async with trio.open_nursery() as nursery:
        nurseries.append(nursery)
        # The DNSSEC probe answers before the first stream is judged (DESIGN §2.1 item 5).
        await nursery.start(probe_periodically, resolvers[0])
        reverifiers[0].inbound_settings = lambda: server.settings
        reverifiers[0].outbound_context = lambda: outbound_proxy.context
        await nursery.start(reverifiers[0].run)
        await nursery.start(partial(server.serve, inbound_listeners=inbound, outbound_listeners=outbound,
                                    websocket_listeners=websocket))
        if metrics_listeners:
            await nursery.start(serve_metrics, metrics, metrics_listeners)
        await nursery.start(partial(reload_on_sighup, holder, notifier=notifier))
        nursery.start_soon(notifier.watchdog_task)
        if own_tlsa is not None:
            await nursery.start(own_tlsa.run, holder)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as stop_signals:
            notifier.ready(f"serving {len(cfg.domains)} domains")
            log_event(log, logging.INFO, "ready", inbound=_addresses(inbound), outbound=_addresses(outbound),
                      websocket=_addresses(websocket))
            task_status.started(server)
            async for signum in stop_signals:
                log_event(log, logging.INFO, "stopping", signal=signal.Signals(signum).name)
                break
        notifier.stopping()
        with trio.move_on_after(DRAIN_SECONDS) as drain:
            outbound_proxy.shutdown()
            await server.shutdown()
        if drain.cancelled_caught:
            log_event(log, logging.WARNING, "drain-timeout",
                      reason=f"streams still open after {DRAIN_SECONDS:.0f}s; closing them")
        nursery.cancel_scope.cancel()
    # One line with every connection's outcome: what happened, for the operator and the tests.
    log_event(log, logging.INFO, "stopped", **{f"outcome_{k.replace('-', '_')}": v
                                              for k, v in sorted(metrics.connection_totals().items()) if v})


def _addresses(listeners) -> str:
    return ",".join(_fmt(listener.socket.getsockname()) for listener in listeners) or "-"


def _fmt(sockname) -> str:
    host, port = sockname[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
