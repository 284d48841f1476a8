#!/usr/bin/env python3
"""Worker scaling: stream set-ups + verdicts per second with N workers against one worker.

    python3 bench/scaling.py            # N = the CPUs this process may use; about 1 minute
    python3 bench/scaling.py --quick    # fewer set-ups, one repeat
    python3 bench/scaling.py --workers 4 --handshakes 4000

The real `xmpp-dane-proxy run` (`python -m proxy run -c FILE`) with `[server] workers = 1`,
then with `workers = N`, each serving the same load: complete short S2S streams (TCP,
STARTTLS, TLS with a client certificate, stream restart, `<db:result>` judged with DNS
evidence from the warm cache, `valid` from the sink, close), `--concurrency` at a time, from
the load client of bench/run.py (bench/loadclient.py) to the sink (bench/sink.py), with the
peer's DNS in the signed test zone (nsd + unbound, tests/dnsenv.py).

Two figures per run, because on a small machine the load client needs cores too:

- **measured**: set-ups per second of wall-clock time.  The one-worker run has core 0 to
  itself and the load on the other cores; the N-worker run spreads over all N cores and shares
  them with the load client, so on a machine with N cores in all this undersells the workers
  (the load client takes ~45 % of what the proxy takes per set-up);
- **projected** (the goal's figure, "N workers on N cores"): set-ups / the CPU time of the
  busiest worker, i.e. the rate if each worker had a core to itself and the load side kept
  up.  It counts every cost of running N workers — per-set-up overhead, an uneven spread over
  the workers — and nothing of the load client.  Scaling = projected(N) / (N × projected(1));
  the goal is ≥ 0.9.

The supervisor's CPU time during the measurement is reported too (it should be ~0: it only
collects heartbeats).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(HERE)]

from loadclient import BenchError, Endpoint, client_context, dance  # noqa: E402
from procs import Proc, ProcError, background_busy, core_busy, cpu_seconds, free_port  # noqa: E402
from run import log, start_world, write_proxy_config  # noqa: E402

_READY = re.compile(r"logger=xmpp_dane_proxy\.(?:run|workers) event=ready\b")
_STARTED = re.compile(r"event=worker-started worker=(\d+) pid=(\d+)")


class ProxyRun:
    """`python -m proxy run` with `workers = N`, pinned to `cores`; its workers' pids."""

    def __init__(self, world, sink_port: int, resolver: str, workers: int, cores: frozenset[int], workdir: Path):
        self.workers = workers
        self.port = free_port()
        config = write_proxy_config(world, sink_port, resolver)
        text = config.read_text().replace('listen = ["127.0.0.1:0"]', f'listen = ["127.0.0.1:{self.port}"]', 1)
        config = workdir / f"proxy-{workers}.toml"
        config.write_text(f"[server]\nworkers = {workers}\n\n" + text)
        self.log_path = workdir / f"proxy-{workers}.log"
        self.proc = Proc(f"proxy-{workers}w", [sys.executable, "-m", "proxy", "run", "-c", str(config)],
                         core=cores, log=self.log_path, cwd=ROOT, stops_at_eof=False)
        self._wait_ready()
        if workers == 1:
            self.pids = {1: self.proc.pid}
            self.supervisor = None
        else:
            self.pids = {int(w): int(p) for w, p in _STARTED.findall(self.log_path.read_text())}
            self.supervisor = self.proc.pid
        self.endpoint = Endpoint(f"proxy-{workers}w", "127.0.0.1", self.port, starttls=True)

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not _READY.search(self.log_path.read_text(errors="replace")):
            if not self.proc.alive() or time.monotonic() > deadline:
                raise ProcError(f"{self.proc.name} not ready; log:\n{self.proc.tail()}")
            time.sleep(0.05)     # polling the log for the ready line, bounded by the deadline

    def decisions(self) -> dict[int, int]:
        """Decision lines per worker so far (a single process logs no `worker=`: all are 1)."""
        counts = {w: 0 for w in self.pids}
        for line in self.log_path.read_text(errors="replace").splitlines():
            if "event=decision" in line:
                m = re.search(r" worker=(\d+) ", line)
                counts[int(m.group(1)) if m else 1] = counts.get(int(m.group(1)) if m else 1, 0) + 1
        return counts

    def stop(self) -> None:
        self.proc.stop(grace=20.0)


def measure(run: ProxyRun, ctx, n: int, concurrency: int, sink: Proc) -> dict:
    """`n` set-ups, `concurrency` at a time; CPU of each worker, the supervisor and the load."""
    lock = threading.Lock()
    left = [n]
    errors: list[BaseException] = []

    def client() -> None:
        while True:
            with lock:
                if left[0] <= 0 or errors:
                    return
                left[0] -= 1
            try:
                dance(run.endpoint, ctx)
            except BaseException as exc:  # reported below; the run stops
                with lock:
                    errors.append(exc)
                return

    def load_cpu() -> float:
        own = os.times()
        return own.user + own.system + cpu_seconds(sink.pid)

    cpu0 = {w: cpu_seconds(p) for w, p in run.pids.items()}
    sup0 = cpu_seconds(run.supervisor) if run.supervisor else 0.0
    dec0, load0, cores0 = run.decisions(), load_cpu(), core_busy()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    cores1 = core_busy()
    cpu = {w: cpu_seconds(p) - cpu0[w] for w, p in run.pids.items()}
    dec1 = run.decisions()
    busy = {c: (cores1[c][0] - b) / max(1, cores1[c][1] - t) for c, (b, t) in cores0.items()}
    return {
        "workers": run.workers, "n": n, "seconds": elapsed, "rate": n / elapsed,
        "worker_cpu_seconds": cpu, "busiest_worker_cpu": max(cpu.values()),
        "projected_rate": n / max(cpu.values()),
        "cpu_ms_per_setup": 1000 * sum(cpu.values()) / n,
        "supervisor_cpu_seconds": (cpu_seconds(run.supervisor) - sup0) if run.supervisor else 0.0,
        "load_cpu_ms_per_setup": 1000 * (load_cpu() - load0) / n,
        "setups_per_worker": {w: dec1.get(w, 0) - dec0.get(w, 0) for w in run.pids},
        "busy": busy,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="set-ups/s with N workers against one worker")
    usable = sorted(os.sched_getaffinity(0))
    p.add_argument("--workers", type=int, default=len(usable), help="N (default: the usable CPUs)")
    p.add_argument("--handshakes", type=int, help="set-ups per measurement (default 2000; 400 with --quick)")
    p.add_argument("--concurrency", type=int, default=16, help="clients at a time (default 16)")
    p.add_argument("--repeats", type=int, help="measurements per figure, median reported (default 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    args = p.parse_args(argv)
    n = args.handshakes or (400 if args.quick else 2000)
    repeats = args.repeats or (1 if args.quick else 3)
    if args.workers < 2 or args.workers > len(usable):
        log(f"need 2 <= --workers <= {len(usable)} usable CPUs")
        return 2
    all_cores = frozenset(usable[:args.workers])
    one_core = frozenset(usable[:1])
    # The load side: the cores the one-worker proxy does not use (all of them for N workers,
    # which have every core; see the module docstring).
    load_cores = set(usable[1:]) or set(usable)
    workdir = Path(tempfile.mkdtemp(prefix="xdp-scaling-"))
    results: dict[int, list[dict]] = {1: [], args.workers: []}
    with ExitStack() as stack:
        if not args.keep:
            import shutil
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        world, env, sink, sink_port = start_world(stack, workdir, frozenset(load_cores))
        ctx = client_context(str(world.peer_cert), str(world.peer_key))
        quiet = background_busy()
        log(f"background load with the benchmark idle: {quiet}")
        try:
            for workers, cores in ((1, one_core), (args.workers, all_cores)):
                os.sched_setaffinity(0, load_cores if workers == 1 else all_cores)
                run = ProxyRun(world, sink_port, env.resolver_address, workers, cores, workdir)
                stack.callback(run.stop)
                log(f"{workers} worker(s) on cores {sorted(cores)}: pids {run.pids}, supervisor {run.supervisor}")
                for _ in range(20 * workers):     # every worker's DNS cache warm, code paths hot
                    dance(run.endpoint, ctx)
                for rep in range(repeats):
                    r = measure(run, ctx, n, args.concurrency, sink)
                    results[workers].append(r)
                    log(f"{workers}w #{rep + 1}: measured {r['rate']:.0f}/s, projected {r['projected_rate']:.0f}/s, "
                        f"{r['cpu_ms_per_setup']:.3f} ms worker CPU per set-up, per worker "
                        f"{r['setups_per_worker']}, supervisor {r['supervisor_cpu_seconds']:.3f} s CPU, "
                        f"cores busy {' '.join(f'c{c}={v:.0%}' for c, v in sorted(r['busy'].items()))}")
                run.stop()
        except (BenchError, ProcError, OSError) as exc:
            log(f"FAILED: {exc}")
            return 1
    med = {w: {k: statistics.median(r[k] for r in rs) for k in ("rate", "projected_rate", "cpu_ms_per_setup",
                                                               "supervisor_cpu_seconds", "load_cpu_ms_per_setup")}
           for w, rs in results.items()}
    nw = args.workers
    one, many = med[1], med[nw]
    shares = [r["setups_per_worker"] for r in results[nw]]
    lines = [
        f"worker scaling: {n} stream set-ups + verdicts (warm DNS cache), {args.concurrency} concurrent, "
        f"median of {repeats}; machine {os.cpu_count()} CPUs, background {quiet}",
        f"{'figure':<58} {'1 worker':>10} {f'{nw} workers':>10} {f'/ ({nw} x 1)':>10}",
        f"{'projected set-ups/s (each worker a core of its own)':<58} {one['projected_rate']:>10.0f} "
        f"{many['projected_rate']:>10.0f} {many['projected_rate'] / (nw * one['projected_rate']):>10.3f}",
        f"{'measured set-ups/s (load client on the same cores)':<58} {one['rate']:>10.0f} "
        f"{many['rate']:>10.0f} {many['rate'] / (nw * one['rate']):>10.3f}",
        f"{'worker CPU per set-up (ms)':<58} {one['cpu_ms_per_setup']:>10.3f} {many['cpu_ms_per_setup']:>10.3f}",
        f"{'load side CPU per set-up (ms)':<58} {one['load_cpu_ms_per_setup']:>10.3f} "
        f"{many['load_cpu_ms_per_setup']:>10.3f}",
        f"{'supervisor CPU during a measurement (s)':<58} {'-':>10} {many['supervisor_cpu_seconds']:>10.3f}",
        f"set-ups per worker ({nw} workers, each repeat): {shares}",
        f"goal: projected {nw} workers >= 0.9 x {nw} x one worker: "
        f"{'met' if many['projected_rate'] >= 0.9 * nw * one['projected_rate'] else 'NOT met'}",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_save:
        out = HERE / "results"
        out.mkdir(exist_ok=True)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        (out / f"{stamp}-scaling.txt").write_text(text + "\n")
        (out / f"{stamp}-scaling.json").write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
