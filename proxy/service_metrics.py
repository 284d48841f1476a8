"""`/metrics` for the whole service when it runs N worker processes (DESIGN §6, §8).

Why prometheus_client's multiprocess mode rather than the supervisor scraping each worker:
the workers' counters then live in memory-mapped files in one per-run directory
(`$PROMETHEUS_MULTIPROC_DIR`), and the supervisor sums them at scrape time without asking any
worker anything — a busy, stuck or restarting worker can neither delay nor break a scrape, a
worker that died keeps its counts in the sums (counters never go backwards when a worker is
restarted), and the summing, label handling and exposition are the library's, not ours.
The price is a few microseconds per counter update (an mmap write), which only the workers pay.

What the scrape shows:

- every worker metric (connections, verdicts, DNS lookups, handshake latency, bytes relayed)
  summed over all workers, under the same names as with one process; `connections_open` is
  the sum over the workers alive now (`multiprocess_mode="livesum"` in proxy/metrics.py);
- what the supervisor alone owns — configuration loads and reloads, certificate expiry,
  build info, and its own `process_*` series — from the supervisor's registry;
- per worker, with a `worker` label: up, restarts, resident memory, CPU seconds, open fds.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from proxy.metrics import PREFIX, Metrics

# Families the supervisor owns: it loads, vets and reloads the configuration (the workers'
# copies of these would count every reload N + 1 times).
SUPERVISOR_FAMILIES = frozenset({
    f"{PREFIX}_config_reloads",
    f"{PREFIX}_config_last_reload_successful",
    f"{PREFIX}_config_last_reload_success_timestamp_seconds",
    f"{PREFIX}_certificate_expiry_timestamp_seconds",
    f"{PREFIX}_build_info",
    f"{PREFIX}_own_tlsa_match",          # the own-TLSA guard runs in the supervisor only
})
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class WorkerView:
    """One worker slot as the supervisor sees it at scrape time."""

    index: int
    pid: int | None          # None while it is being restarted
    restarts: int


class _ServiceCollector:
    def __init__(self, supervisor: Metrics, directory: str, workers: Callable[[], Iterable[WorkerView]]) -> None:
        self.supervisor = supervisor
        self.files = MultiProcessCollector(None, directory)
        self.workers = workers

    def collect(self) -> Iterable[Metric]:
        for family in self.supervisor.registry.collect():
            if family.name in SUPERVISOR_FAMILIES or not family.name.startswith(PREFIX):
                yield family
        for family in self.files.collect():
            if family.name.startswith(PREFIX) and family.name not in SUPERVISOR_FAMILIES:
                yield family
        yield from _worker_families(list(self.workers()))


def _worker_families(workers: list[WorkerView]) -> Iterable[Metric]:
    up = GaugeMetricFamily(f"{PREFIX}_worker_up", "1 if the worker process is running.", labels=["worker"])
    restarts = CounterMetricFamily(f"{PREFIX}_worker_restarts", "Times the worker was restarted "
                                   "after it died.", labels=["worker"])
    rss = GaugeMetricFamily(f"{PREFIX}_worker_resident_memory_bytes", "Resident memory of the worker.",
                            labels=["worker"])
    cpu = CounterMetricFamily(f"{PREFIX}_worker_cpu_seconds", "User and system CPU time of the worker "
                              "process now running.", labels=["worker"])
    fds = GaugeMetricFamily(f"{PREFIX}_worker_open_fds", "Open file descriptors of the worker.",
                            labels=["worker"])
    for w in workers:
        label = [str(w.index)]
        stats = _proc_stats(w.pid) if w.pid is not None else None
        up.add_metric(label, 1 if stats is not None else 0)
        restarts.add_metric(label, w.restarts)
        if stats is not None:
            rss.add_metric(label, stats[0])
            cpu.add_metric(label, stats[1])
            fds.add_metric(label, stats[2])
    return up, restarts, rss, cpu, fds


def _proc_stats(pid: int) -> tuple[float, float, float] | None:
    """(resident bytes, CPU seconds, open fds) of `pid` from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode()
        fields = stat[stat.rfind(")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS       # utime + stime
        rss = int(fields[21]) * _PAGE_SIZE
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError, IndexError):
        return None
    return rss, cpu, fds


class ServiceMetrics:
    """The supervisor's `/metrics`: duck-types `Metrics.exposition` for `serve_metrics`."""

    def __init__(self, supervisor: Metrics, directory: str, workers: Callable[[], Iterable[WorkerView]]) -> None:
        self.directory = directory
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_ServiceCollector(supervisor, directory, workers))

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """(body, content type) for a scrape with this Accept header; 0.0.4 text by default."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def process_dead(self, pid: int) -> None:
        """Drop a dead worker's live gauges (its counters stay in the sums)."""
        mark_process_dead(pid, self.directory)
