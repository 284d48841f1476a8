"""`[server] workers = N`: one supervising process and N worker processes (DESIGN §8).

One Python process runs on one core; TLS handshakes and XML framing are CPU work, so a busy
server runs one worker per core.  With N > 1 the process started by `xmpp-dane-proxy run`
becomes the **supervisor**:

- it loads and checks every file (as one process would), binds the listening sockets, and
  starts N workers (proxy/worker_main.py), each running the ordinary `run_proxy` on its own
  trio loop, with its own TLS contexts and DNS cache (shared through the local resolver);
- sockets: for every listen address the supervisor binds one SO_REUSEPORT socket per worker,
  so the kernel spreads new connections over the workers by a hash of the peer's address and
  port, with no thundering herd on one accept queue.  A dead worker's sockets are closed at
  once (new connections then go to the others) and bound again for its restart.
  Socket-activated descriptors (one per address, from systemd) are handed to every worker as
  they are; the workers then share their accept queue;
- it alone speaks to systemd (NotifyAccess=main): READY=1 once every worker serves,
  RELOADING=1 … READY=1 around a reload, STOPPING=1 and the watchdog keep-alive;
- SIGHUP: it loads and checks the files first; a broken file is refused once, here, and no
  worker is disturbed (each keeps what it runs).  Good files: SIGHUP to every worker, each
  reloads exactly as a single process does (streams stay), READY=1 when all have answered;
- SIGTERM/SIGINT: SIGTERM to every worker, each drains as a single process does; exit 0;
- a worker that dies (or whose event loop stops answering for HANG_SECONDS) is restarted and
  logged; one that keeps dying soon after its start is restarted after a growing delay;
- `/metrics`: proxy/service_metrics.py.

`workers = 1` runs no supervisor at all: the one process is the proxy, exactly as before, so
the simple case keeps one process, one log and nothing new that could fail.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

import proxy
from proxy.config import parse_hostport
from proxy.dialback_keys import new_secret
from proxy.listen import ListenError
from proxy.logsetup import log_event
from policy.dns import Resolver
from proxy.metrics import Metrics, open_metrics_listeners, serve_metrics
from proxy.own_tlsa import OwnTlsaGuard
from proxy.reload import StateHolder
from proxy.sdnotify import Notifier
from proxy.service_metrics import ServiceMetrics, WorkerView
from proxy.worker_process import ENV_SETUP, HEARTBEAT_SECONDS, MAX_CONTROL_LINE, WorkerSetup

log = logging.getLogger("xmpp_dane_proxy.workers")

# A worker that dies after running RESTART_WINDOW is restarted at once.  One that dies sooner
# is crashing in a loop (a bug it hits at start, files on disk that do not load): each further
# restart waits twice as long, 1 s, 2 s, 4 s … up to RESTART_BACKOFF_MAX, so a crash loop costs
# a start (and its log lines) every 30 s instead of a busy core, and a fixed cause is picked up
# within 30 s.
RESTART_WINDOW = 60.0
RESTART_BACKOFF_MAX = 30.0
# Loading every file and building TLS contexts takes well under a second; a minute is room
# for a slow disk or a loaded machine before start-up (or a reload) is declared failed.
START_TIMEOUT = 60.0
RELOAD_TIMEOUT = 60.0
# A worker pings every HEARTBEAT_SECONDS; silence this long means its event loop is stuck
# (it relays nothing), and it is killed and restarted — the unit's WatchdogSec= for workers.
HANG_SECONDS = 30.0
# After SIGTERM a worker drains for up to proxy.runner.DRAIN_SECONDS; then this much more
# before it is killed.
STOP_GRACE = 5.0
# listen(2) backlog, as trio.open_tcp_listeners uses (the kernel caps it at somaxconn).
BACKLOG = 0xFFFF
ROLES = ("inbound", "outbound", "websocket")


class WorkerStartError(Exception):
    """A worker did not come up at start; the proxy does not start with fewer than N."""


def worker_count(configured: int) -> int:
    """`[server] workers`, with 0 meaning the number of CPUs this process may run on."""
    # sched_getaffinity, not os.cpu_count: under `taskset`, a cgroup cpuset or systemd's
    # CPUAffinity= the process may use fewer CPUs than the machine has.
    return configured or len(os.sched_getaffinity(0))


# ----------------------------------------------------------------------------- listening sockets

def bind_reuseport(addresses: Sequence[str], copies: int) -> list[list[socket.socket]]:
    """`copies` listening sockets per address (SO_REUSEPORT), as one list per worker.

    `[::]:P` and `*:P` mean every IPv4 and IPv6 address, as in proxy.server.open_listeners.
    An address that cannot be bound is a proxy.listen.ListenError naming it, as with one process.
    """
    per_worker: list[list[socket.socket]] = [[] for _ in range(copies)]
    try:
        for entry in addresses:
            host, port = parse_hostport(entry)
            wildcard = host in ("::", "*", "")
            try:
                infos = socket.getaddrinfo(None if wildcard else host, port, type=socket.SOCK_STREAM,
                                           flags=socket.AI_PASSIVE)
            except socket.gaierror as exc:
                raise ListenError(entry, OSError(errno.EADDRNOTAVAIL, exc.strerror)) from None
            seen = set()
            for family, _, _, _, sockaddr in infos:
                if sockaddr in seen:
                    continue
                seen.add(sockaddr)
                if port != 0:
                    _refuse_if_in_use(family, sockaddr, entry)
                address = sockaddr
                for sockets in per_worker:
                    sock = _reuseport_listener(family, address, entry)
                    sockets.append(sock)
                    address = sock.getsockname()   # port 0: every copy takes the port the first got
    except BaseException:
        for sockets in per_worker:
            for sock in sockets:
                sock.close()
        raise
    return per_worker


def _refuse_if_in_use(family: int, address, entry: str) -> None:
    # SO_REUSEPORT would let us join another process's group on the same port (same user)
    # and silently share its connections — e.g. a second proxy started by mistake.  A plain
    # bind first fails with EADDRINUSE if anything listens there, as a single process would.
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # TIME_WAIT is no conflict
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind(address)
    except OSError as exc:
        raise ListenError(entry, exc) from None
    finally:
        probe.close()


def _reuseport_listener(family: int, address, entry: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # Like trio: "[::]" binds IPv6 only, and 0.0.0.0 gets a socket of its own.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(entry, exc) from None
    return sock


def _describe(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ----------------------------------------------------------------------------- the workers

@dataclass
class _Slot:
    """Worker number `index` and whatever process currently fills it.

    `own` are the SO_REUSEPORT sockets bound for this worker alone, `shared` the descriptors
    every worker gets (socket activation).  When the worker dies its own sockets are closed at
    once — else the kernel would keep queueing new connections on them, where nobody accepts
    until the restart (for ever, if the restart keeps failing) — and bound afresh before the
    next start.  The connections already queued there are reset; peers retry."""

    index: int
    own: dict[str, list[socket.socket]]
    shared: dict[str, list[int]]
    addresses: dict[str, list[tuple[int, object, str]]] = field(default_factory=dict)  # role -> (family, sockaddr, entry)
    process: trio.Process | None = None
    ready: bool = False            # answered READY=1 since it was started
    draining: bool = False         # said STOPPING=1
    generation: int = 0            # configuration generation it was told to run
    status: str = ""               # STATUS= of its last READY=1
    last_heard: float = 0.0
    restarts: int = 0
    backoff: float = 0.0           # seconds to wait before the next restart
    answered: trio.Event = field(default_factory=trio.Event)   # READY=1 after a reload, or exit

    def __post_init__(self) -> None:
        self.addresses = {role: [(s.family, s.getsockname(), _describe(s)) for s in socks]
                          for role, socks in self.own.items()}

    @property
    def fds(self) -> dict[str, list[int]]:
        return {**self.shared, **{role: [s.fileno() for s in socks] for role, socks in self.own.items()}}

    def close_own(self) -> None:
        for socks in self.own.values():
            for sock in socks:
                sock.close()
        self.own = {}

    def rebind_own(self) -> None:
        """Bind this worker's SO_REUSEPORT sockets again (after `close_own`); ListenError if not."""
        if self.own or not self.addresses:
            return
        own: dict[str, list[socket.socket]] = {}
        try:
            for role, addresses in self.addresses.items():
                own[role] = [_reuseport_listener(family, sockaddr, entry) for family, sockaddr, entry in addresses]
        except BaseException:
            for socks in own.values():
                for sock in socks:
                    sock.close()
            raise
        self.own = own


class Supervisor:
    """Starts, watches, reloads and stops the N workers."""

    def __init__(self, config_path: str, slots: list[_Slot], metrics: Metrics, metrics_dir: str,
                 generation: int) -> None:
        self.config_path = config_path
        self.slots = slots
        self.metrics = ServiceMetrics(metrics, metrics_dir, self.views)
        self.generation = generation
        self.stopping = False
        self._stop = trio.Event()      # set with `stopping`; wakes a delayed restart
        self.started = False
        self.running_slots = 0         # keep_running tasks not yet returned
        self.start_failure: str | None = None
        self._changed = trio.Event()
        # DESIGN §3.3: one dialback secret for the whole service, so a key minted by one
        # worker is answered by whichever worker the backend's verification reaches.
        self.dialback_secret = new_secret()

    def views(self) -> list[WorkerView]:
        return [WorkerView(s.index, s.process.pid if s.process and s.process.returncode is None else None,
                           s.restarts) for s in self.slots]

    def _notify_change(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_all_ready(self) -> None:
        """Until every worker answered READY=1; WorkerStartError if one exited first."""
        while True:
            if self.start_failure is not None:
                raise WorkerStartError(self.start_failure)
            if all(s.ready for s in self.slots):
                self.started = True
                return
            await self._changed.wait()

    # --- one slot -------------------------------------------------------------------------

    async def keep_running(self, slot: _Slot) -> None:
        """Run a worker in `slot`, restarting it whenever it dies, until the supervisor stops."""
        self.running_slots += 1
        try:
            await self._keep_running(slot)
        finally:
            self.running_slots -= 1
            self._notify_change()

    async def _keep_running(self, slot: _Slot) -> None:
        while not self.stopping:
            if slot.backoff:
                with trio.move_on_after(slot.backoff):
                    await self._stop.wait()
                if self.stopping:
                    return
            try:
                slot.rebind_own()
            except ListenError as exc:
                slot.backoff = min(max(1.0, 2 * slot.backoff), RESTART_BACKOFF_MAX)
                log_event(log, logging.ERROR, "worker-bind-failed", worker=slot.index, reason=str(exc),
                          delay=f"{slot.backoff:.0f}s")
                continue
            process, control = await self._spawn(slot)
            started = trio.current_time()
            log_event(log, logging.INFO, "worker-started", worker=slot.index, pid=process.pid)
            if self.stopping:
                process.kill()      # spawned while stop() was signalling the others
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_control, slot, control)
                nursery.start_soon(self._watch_hang, slot, process)
                code = await process.wait()
                nursery.cancel_scope.cancel()
            await control.aclose()
            if process.stdin is not None:
                await process.stdin.aclose()
            self.metrics.process_dead(process.pid)
            was_ready, slot.ready, slot.draining = slot.ready, False, False
            slot.answered.set()
            self._notify_change()
            if self.stopping:
                log_event(log, logging.INFO if code == 0 else logging.WARNING, "worker-stopped",
                          worker=slot.index, pid=process.pid, status=_exit_status(code))
                return
            if not self.started and not was_ready:
                self.start_failure = (f"worker {slot.index} (pid {process.pid}) {_exit_status(code)} "
                                      f"before it was ready; see its lines above")
                self._notify_change()
                return
            slot.close_own()
            slot.restarts += 1
            lived = trio.current_time() - started
            slot.backoff = (0.0 if lived >= RESTART_WINDOW
                            else min(max(1.0, 2 * slot.backoff), RESTART_BACKOFF_MAX))
            log_event(log, logging.ERROR, "worker-exited", worker=slot.index, pid=process.pid,
                      status=_exit_status(code), action="restart", delay=f"{slot.backoff:.0f}s")

    async def _spawn(self, slot: _Slot) -> tuple[trio.Process, trio.lowlevel.FdStream]:
        read_fd, write_fd = os.pipe()
        setup = WorkerSetup(self.config_path, slot.index, write_fd, slot.fds)
        passed = [write_fd, *(fd for fds in slot.fds.values() for fd in fds)]
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "proxy.worker_main"], stdin=subprocess.PIPE,
                pass_fds=passed, env=_worker_env(setup, self.metrics.directory))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        # The secret's one line, first thing on stdin (proxy/worker_main.py reads it before
        # anything else); the pipe then stays open: its end of file tells the worker we are gone.
        try:
            await process.stdin.send_all(self.dialback_secret.hex().encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass     # the worker died at once; keep_running reports how it ended
        slot.process, slot.ready, slot.draining = process, False, False
        slot.generation = self.generation
        slot.last_heard = trio.current_time()
        slot.answered = trio.Event()
        self._notify_change()
        return process, trio.lowlevel.FdStream(read_fd)

    async def _read_control(self, slot: _Slot, control: trio.lowlevel.FdStream) -> None:
        buf = b""
        while data := await control.receive_some(4096):
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                self._on_message(slot, line.decode("utf-8", "replace"))
            if len(buf) > MAX_CONTROL_LINE:
                buf = b""      # not a line a worker writes; drop it rather than grow

    def _on_message(self, slot: _Slot, line: str) -> None:
        assignments = dict(a.partition("=")[::2] for a in line.split("\t"))
        slot.last_heard = trio.current_time()
        if "STOPPING" in assignments:
            slot.draining = True
        if "READY" not in assignments:
            return
        slot.status = assignments.get("STATUS", "")
        if slot.ready:
            slot.answered.set()           # the end of a reload
            return
        slot.ready = True
        log_event(log, logging.INFO, "worker-ready", worker=slot.index, pid=slot.process.pid if slot.process else "-")
        if slot.generation < self.generation and slot.process is not None:
            # Started before the last reload finished: it may have read the older files.
            slot.generation = self.generation
            slot.process.send_signal(signal.SIGHUP)
        self._notify_change()

    async def _watch_hang(self, slot: _Slot, process: trio.Process) -> None:
        while True:
            await trio.sleep(HEARTBEAT_SECONDS)
            silent = trio.current_time() - slot.last_heard
            if slot.ready and not slot.draining and silent > HANG_SECONDS:
                log_event(log, logging.ERROR, "worker-hung", worker=slot.index, pid=process.pid,
                          reason=f"no heartbeat for {silent:.0f}s; killing it")
                process.kill()
                return

    # --- all of them ----------------------------------------------------------------------

    async def reload(self, generation: int) -> list[str]:
        """SIGHUP every running worker and wait for each to answer; returns the problems."""
        self.generation = generation
        targets = [s for s in self.slots if s.ready and s.process is not None and s.process.returncode is None]
        for slot in targets:
            slot.answered = trio.Event()
            slot.generation = generation
            slot.process.send_signal(signal.SIGHUP)
        with trio.move_on_after(RELOAD_TIMEOUT):
            for slot in targets:
                await slot.answered.wait()
        problems = []
        for slot in targets:
            if not slot.answered.is_set():
                problems.append(f"worker {slot.index} did not finish reloading within {RELOAD_TIMEOUT:.0f}s")
            elif slot.status.startswith("reload failed"):
                problems.append(f"worker {slot.index}: {slot.status}")
        return problems

    async def stop(self, drain_seconds: float) -> None:
        """SIGTERM every worker (each drains); SIGKILL what is left after the drain's bound."""
        self.stopping = True
        self._stop.set()
        self._notify_change()
        running = [s for s in self.slots if s.process is not None and s.process.returncode is None]
        for slot in running:
            # One that is still starting has no streams to drain, and may not listen to
            # SIGTERM yet (proxy/worker_main.py ignores it until run_proxy is ready).
            slot.process.send_signal(signal.SIGTERM if slot.ready else signal.SIGKILL)
        running = [s.process for s in running]
        with trio.move_on_after(drain_seconds + STOP_GRACE):
            for process in running:
                await process.wait()
        for process in running:
            if process.returncode is None:
                log_event(log, logging.WARNING, "worker-killed", pid=process.pid,
                          reason=f"still draining after {drain_seconds + STOP_GRACE:.0f}s")
                process.kill()
        for process in running:
            await process.wait()
        while self.running_slots:     # each slot logs how its worker ended
            await self._changed.wait()


def _worker_env(setup: WorkerSetup, metrics_dir: str) -> dict[str, str]:
    # The worker must not believe systemd's notify socket, watchdog or listen fds are its own
    # (NotifyAccess=main would drop its messages anyway): the supervisor speaks for it.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_"))
           and k.lower() != "prometheus_multiproc_dir"}
    env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    env[ENV_SETUP] = setup.to_environ()
    # `python -m proxy.worker_main` must import this very proxy package, wherever it is.
    root = str(Path(proxy.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def _exit_status(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with {code}"


# ----------------------------------------------------------------------------- the supervisor's main

async def supervise(holder: StateHolder, metrics: Metrics, activated: Mapping[str, list], *,
                    resolver: Resolver, drain_seconds: float, notifier: Notifier | None = None,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Be the supervisor of `worker_count(server.workers)` workers until SIGTERM/SIGINT.

    `holder` has loaded and checked the files; `metrics` records its loads; `activated` are
    the socket-activated sockets by role (proxy.socket_activation.listen_fds); `resolver` is
    for the own-TLSA guard (proxy/own_tlsa.py), which runs here, once for all workers;
    `drain_seconds` is how long a worker drains after SIGTERM (proxy.runner.DRAIN_SECONDS)."""
    own_tlsa = OwnTlsaGuard(resolver, metrics=metrics)
    holder.vet = own_tlsa.vet_reload
    holder.announce_reloads = False     # _reload_on_sighup says it once the workers have reloaded

    notifier = notifier or Notifier()
    cfg = holder.state.config
    count = worker_count(cfg.server.workers)
    addresses = {"inbound": cfg.inbound.listen, "outbound": cfg.outbound.listen,
                 "websocket": cfg.inbound.websocket_listen}
    slots: list[_Slot] = []
    own: list[dict[str, list[socket.socket]]] = [{} for _ in range(count)]
    shared: dict[str, list[int]] = {}
    shown: dict[str, list[str]] = {}
    metrics_dir = tempfile.mkdtemp(prefix="xmpp-dane-proxy-metrics.", dir=os.environ.get("RUNTIME_DIRECTORY"))
    try:
        for role in ROLES:
            if activated.get(role):
                # One descriptor per address from systemd: every worker accepts on it.
                shared[role] = [s.fileno() for s in activated[role]]
                shown[role] = [_describe(s) for s in activated[role]]
                continue
            copies = bind_reuseport(addresses[role], count)
            for mine, sockets in zip(own, copies):
                mine[role] = sockets
            shown[role] = [_describe(s) for s in copies[0]]
        metrics_listeners = ([trio.SocketListener(s) for s in activated.get("metrics", [])]
                             or await open_metrics_listeners(cfg.metrics.listen))
        slots += [_Slot(i + 1, mine, shared) for i, mine in enumerate(own)]
        supervisor = Supervisor(holder.path, slots, metrics, metrics_dir, holder.state.generation)

        async with trio.open_nursery() as nursery:
            # Signals are taken from the start: a SIGHUP or SIGTERM while the workers come up
            # must not hit Python's default action (which would end the supervisor and orphan
            # its workers); they are acted on once every worker is ready.
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as stop_signals:
                await nursery.start(_reload_on_sighup, holder, supervisor, notifier, count)
                nursery.start_soon(notifier.watchdog_task)
                await nursery.start(own_tlsa.run, holder)
                for slot in slots:
                    nursery.start_soon(supervisor.keep_running, slot)
                try:
                    with trio.fail_after(START_TIMEOUT):
                        await supervisor.wait_all_ready()
                except trio.TooSlowError:
                    raise WorkerStartError(f"not every worker was ready within {START_TIMEOUT:.0f}s") from None
                if metrics_listeners:
                    await nursery.start(serve_metrics, supervisor.metrics, metrics_listeners)
                notifier.ready(f"serving {len(cfg.domains)} domains with {count} workers")
                log_event(log, logging.INFO, "ready", workers=count,
                          **{role: ",".join(shown.get(role, [])) or "-" for role in ROLES})
                task_status.started(supervisor)
                async for signum in stop_signals:
                    log_event(log, logging.INFO, "stopping", signal=signal.Signals(signum).name, workers=count)
                    break
                notifier.stopping()
                # Still inside the receiver: a second SIGTERM (or Ctrl-C) during the drain is
                # absorbed; the drain has its own bound.
                await supervisor.stop(drain_seconds)
            nursery.cancel_scope.cancel()
    except WorkerStartError as exc:
        log_event(log, logging.ERROR, "start-failed", reason=str(exc))
        raise
    finally:
        with trio.CancelScope(shield=True):
            # Only after a failure or cancellation: a clean stop has waited for every worker.
            for slot in slots:
                if slot.process is not None and slot.process.returncode is None:
                    slot.process.kill()
                    await slot.process.wait()
        for mine in own:            # the ones bound at start (a slot may have rebound since)
            for sockets in mine.values():
                for sock in sockets:
                    sock.close()
        for slot in slots:
            slot.close_own()
        shutil.rmtree(metrics_dir, ignore_errors=True)


async def _reload_on_sighup(holder: StateHolder, supervisor: Supervisor, notifier: Notifier, count: int,
                            task_status=trio.TASK_STATUS_IGNORED) -> None:
    """SIGHUP: load and check the files here; only if they are good, reload every worker.

    SIGUSR2 is the same reload forced past the own-TLSA guard (proxy/own_tlsa.py), as in a
    single process; the workers then get a plain SIGHUP (they do not vet: this process did)."""
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGUSR2) as signals:
        task_status.started()
        async for signum in signals:
            if supervisor.started:     # before READY=1, systemd must not hear of reloads
                notifier.reloading("reloading configuration")
            result = await holder.reload_async(force=signum == signal.SIGUSR2)
            summary = result.summary()
            if result.ok:
                problems = await supervisor.reload(result.state.generation)
                for problem in problems:
                    log_event(log, logging.ERROR, "worker-reload-failed", reason=problem)
                log_event(log, logging.INFO, "reloaded", generation=result.state.generation, workers=count,
                          failed=len(problems))
                # The line a single process logs when a reload is in use, now that it is here too.
                logging.getLogger("xmpp_dane_proxy.reload").info(
                    "configuration reloaded: %s (%d of %d workers)", summary, count - len(problems), count)
                summary += f", {count} workers" + (f"; {len(problems)} did not reload, see the log"
                                                   if problems else "")
            if supervisor.started:
                notifier.ready(summary)
