#!/usr/bin/env python3
"""Benchmark the inbound proxy beside stunnel, in one run, and report proxy/stunnel ratios.

    python3 bench/run.py            # full run (1–2 minutes)
    python3 bench/run.py --quick    # smaller counts, one repeat (about 10 s)
    python3 bench/run.py --help     # every knob

What runs (all on loopback, all stopped at the end, also on errors or Ctrl-C):

- core 0: the proxy (`bench/proxy_process.py` -> `proxy.server.serve`) and stunnel4, each
  pinned there (sched_setaffinity, as `taskset -c 0`); only one of them has work at a time.
- core 1: this script (the load client), the sink (`bench/sink.py`, the plaintext backend
  stand-in both relay to) and nsd + unbound (`tests/dnsenv.py`, the validating resolver the
  proxy asks for the peer's SRV target addresses; after the first stream every answer comes
  from the proxy's own cache).

Measured, each for the proxy and for stunnel with the same certificates, the same client,
the same bytes and the same sink (see bench/README.md for how to read the figures):

1. memory per idle authenticated stream (RSS delta of the server process / K streams);
2. complete short streams per second: TCP, (STARTTLS,) TLS with client certificate, stream
   restart, `<db:result>` judged (proxy) and acknowledged by the sink, close;
3. relay throughput on one authenticated stream with 1 KiB and 64 KiB `<message>` stanzas.

Every figure is printed absolute and as the ratio proxy/stunnel, with the server process's
CPU time per unit of work (which does not depend on whether the load side kept up) and how
busy each core was.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(HERE)]

from loadclient import LOCAL, PEER, BenchError, Endpoint, S2SStream, client_context, dance, stanza  # noqa: E402
from procs import Proc, ProcError, Window, background_busy, free_port, wait_listening  # noqa: E402

SERVER_CORE = 0
LOAD_CORE = 1
SRV_TARGET = "xmpp-peer.secure.test"     # the peer's SRV target, in the signed zone: all answers secure
EVIDENCE_MODES = ("dns", "static")


@dataclass
class Settings:
    """Counts for one run; `--quick` picks the small set."""

    relay_1k_stanzas: int
    relay_64k_stanzas: int
    handshakes: int
    concurrency: int
    idle_streams: int
    repeats: int

    @classmethod
    def for_mode(cls, quick: bool) -> "Settings":
        if quick:
            return cls(relay_1k_stanzas=50_000, relay_64k_stanzas=1_000, handshakes=300,
                       concurrency=8, idle_streams=200, repeats=1)
        # Large enough that the fastest window (stunnel) lasts ~0.5 s or more: CPU time comes
        # from /proc in 10 ms ticks.
        return cls(relay_1k_stanzas=300_000, relay_64k_stanzas=6_000, handshakes=2_000,
                   concurrency=8, idle_streams=1_000, repeats=3)


@dataclass
class Row:
    """One compared figure.  `higher_is_better` says which way the ratio reads."""

    group: str
    metric: str
    unit: str
    proxy: float
    stunnel: float
    higher_is_better: bool
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.proxy / self.stunnel if self.stunnel else float("nan")


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def add(self, *args, **kwargs) -> None:
        self.rows.append(Row(*args, **kwargs))


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ================================================================================ set-up

@dataclass
class World:
    dir: Path
    local_cert: Path
    local_key: Path
    peer_cert: Path
    peer_key: Path
    root: Path
    tlsa: str
    peer_leaf: object        # cryptography x509.Certificate, for the TLSA record in DNS


def make_pki(directory: Path) -> World:
    """The local domain's certificate (presented by proxy and stunnel alike) and the peer's
    client certificate, both EC P-256 from one test CA with an intermediate (tests/pki.py)."""
    from pki import TestCA
    from dnsenv import tlsa_text

    ca = TestCA("Bench Root CA")
    inter = ca.intermediate("Bench Intermediate CA")
    local = inter.issue(dns=[LOCAL], xmpp=[LOCAL])
    peer = inter.issue(dns=[PEER], xmpp=[PEER])
    local_cert, local_key = local.write(directory, "local")
    peer_cert, peer_key = peer.write(directory, "peer")
    root = ca.write_root(directory / "root.pem")
    return World(directory, local_cert, local_key, peer_cert, peer_key, root, tlsa_text(peer.cert, 3, 1, 1),
                 peer.cert)


def publish_peer(env, world: World) -> None:
    """The peer's DNS, DNSSEC-signed: SRV _xmpp-server._tcp.PEER -> SRV_TARGET:5269, its A
    record, and TLSA 3 1 1 at _5269._tcp.SRV_TARGET for the client certificate.  (No
    _xmpps-server SRV and no AAAA: secure denials, also cached.)"""
    env.publish_xmpp(PEER, SRV_TARGET, 5269, "127.0.0.1", world.peer_leaf, "3 1 1")


def start_world(stack: ExitStack, workdir: Path, sink_core: int | frozenset[int]):
    """The PKI, the signed DNS with the peer published, and the sink, all stopped by `stack`:
    (world, dns environment, sink process, sink port)."""
    from dnsenv import dns_environment

    world = make_pki(workdir)
    env = stack.enter_context(dns_environment())
    publish_peer(env, world)
    sink = Proc("sink", [sys.executable, str(HERE / "sink.py")], core=sink_core, log=workdir / "sink.log")
    stack.callback(sink.stop)
    return world, env, sink, int(sink.read_line("LISTENING").split()[1])


def write_proxy_config(world: World, sink_port: int, resolver: str, evidence: str = "dns") -> Path:
    """The proxy's config.toml and the peer's policy file.

    `evidence="dns"`: the policy only says `require = "dane"`; SRV, addresses and TLSA come
    from the validating resolver (after the first stream, from the proxy's DNS cache) — the
    production path.  `evidence="static"`: the policy file also carries the peer's `tlsa` and
    `srv` (DESIGN §2.4), which the proxy treats as secure without asking DNS.
    """
    policy_dir = world.dir / "policy.d"
    policy_dir.mkdir(exist_ok=True)
    text = 'require = "dane"\ndane_uses = ["DANE-EE", "DANE-TA"]\n'
    if evidence == "static":
        text += f'tlsa = ["{world.tlsa}"]\nsrv = ["0 0 5269 {SRV_TARGET}."]\n'
    (policy_dir / f"{PEER}.toml").write_text(text)
    config = world.dir / "proxy.toml"
    config.write_text(f"""\
[inbound]
listen = ["127.0.0.1:0"]
backend = "127.0.0.1:{sink_port}"

[outbound]
listen = []

[[domain]]
name = "{LOCAL}"
cert = "{world.local_cert}"
key = "{world.local_key}"

[dns]
nameservers = ["{resolver}"]
timeout = 5.0

[policy]
dir = "{policy_dir}"
ca_file = "{world.root}"

[limits]
max_connections = 100000

[metrics]
listen = ""

[log]
level = "info"
format = "text"
""")
    return config


def write_stunnel_config(world: World, port: int, sink_port: int) -> Path:
    config = world.dir / "stunnel.conf"
    config.write_text(f"""\
; stunnel as a plain TLS terminator in front of the same sink, matched to the proxy's TLS:
; same certificate chain, client certificate requested but not required (verifyChain with
; requireCert = no; the chain is verified against the test root), NO_TICKET like the proxy
; (the benchmark's clients never resume, so the one-entry session cache is never used),
; TCP_NODELAY both ways (trio sets it), log level notice (a few lines per connection, like
; the proxy's info log).
foreground = yes
pid =
syslog = no
output = {world.dir / "stunnel.log"}
debug = notice

[xmpp-s2s]
accept = 127.0.0.1:{port}
connect = 127.0.0.1:{sink_port}
cert = {world.local_cert}
key = {world.local_key}
CAfile = {world.root}
verifyChain = yes
requireCert = no
sslVersionMin = TLSv1.2
options = NO_TICKET
sessionCacheSize = 1
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
""")
    return config


# ================================================================================ measurements

class Bench:
    def __init__(self, args, settings: Settings, world: World, sink: Proc, servers: dict[str, Proc],
                 endpoints: dict[str, Endpoint], dns_dir: Path) -> None:
        self.args = args
        self.dns_dir = dns_dir
        self.s = settings
        self.world = world
        self.sink = sink
        self.servers = servers
        self.endpoints = endpoints
        self.ctx = client_context(str(world.peer_cert), str(world.peer_key))
        self.report = Report()

    def sink_counts(self) -> tuple[int, int]:
        self.sink.send_line("count")
        line = self.sink.read_line("open=")
        m = re.match(r"open=(\d+) total=(\d+)", line)
        return int(m.group(1)), int(m.group(2))

    def wait_sink_idle(self, timeout: float = 30.0) -> None:
        """Until the sink has no open connection: every stream ended on both sides."""
        deadline = time.monotonic() + timeout
        while (open_now := self.sink_counts()[0]) > 0:
            if time.monotonic() > deadline:
                raise BenchError(f"{open_now} backend connections still open after {timeout} s")
            time.sleep(0.01)   # polling the sink's count, bounded by the deadline

    def resolver_queries(self) -> int:
        """Queries unbound has answered so far (the proxy is its only client during the run)."""
        out = subprocess.run(["unbound-control", "-c", str(self.dns_dir / "unbound.conf"), "stats_noreset"],
                             capture_output=True, text=True, timeout=10)
        m = re.search(r"^total\.num\.queries=(\d+)$", out.stdout, re.M)
        if m is None:
            raise BenchError(f"unbound-control stats failed: {out.stdout}{out.stderr}")
        return int(m.group(1))

    # ------------------------------------------------------------------ calibration

    def calibrate_tls(self) -> None:
        """Server-side handshake CPU of the two TLS libraries alone (bench/tls_calibration.py),
        on the server core."""
        rounds = 100 if self.args.quick else 500
        out = subprocess.run([sys.executable, str(HERE / "tls_calibration.py"), str(self.world.dir), str(rounds)],
                             capture_output=True, text=True, timeout=300,
                             preexec_fn=lambda: os.sched_setaffinity(0, {SERVER_CORE}))
        if out.returncode != 0:
            raise BenchError(f"TLS calibration failed: {out.stderr[-2000:]}")
        cal = json.loads(out.stdout)
        self.report.details["tls_calibration"] = cal
        log(f"TLS library alone, server side per handshake: {cal['proxy_tls_library']} (proxy) "
            f"{cal['proxy_tls_us']:.0f} µs, {cal['system_openssl_library']} (stunnel's) {cal['system_openssl_us']:.0f} µs")
        self.report.add("calibration", "TLS library alone: server CPU per TLS 1.3 handshake", "µs",
                        cal["proxy_tls_us"], cal["system_openssl_us"], higher_is_better=False,
                        note=f"{cal['proxy_tls_library']} (proxy, pyOpenSSL) vs {cal['system_openssl_library']} "
                             "(system, stunnel's); in-process, no sockets")
        self.report.add("calibration", "TLS library alone: C heap per established connection", "KiB",
                        cal["proxy_tls_kib_per_connection"], cal["system_openssl_kib_per_connection"],
                        higher_is_better=False,
                        note="client certificate kept, one record read; part of every idle stream's RSS "
                             "that no code above the library can give back")

    # ------------------------------------------------------------------ warm-up

    def warm_up(self) -> None:
        queries_before = self.resolver_queries()
        for name, ep in self.endpoints.items():
            stream = S2SStream(ep, self.ctx).open()
            log(f"{name}: authenticated stream up ({stream.version}, {stream.cipher[0]})")
            self.report.details.setdefault("tls", {})[name] = {"version": stream.version, "cipher": stream.cipher[0]}
            stream.burst(stanza(1024) * 64, 16)
            stream.close()
            for _ in range(20):
                dance(ep, self.ctx)
        self.wait_sink_idle()
        decision = next((line for line in self.servers["proxy"].log.read_text().splitlines()
                         if "decision" in line), None)
        self.report.details["proxy_decision_log_line"] = decision
        log(f"proxy decision: {decision}")
        self.queries_after_warm_up = self.resolver_queries()
        self.report.details["resolver_queries_warm_up"] = self.queries_after_warm_up - queries_before
        log(f"resolver: {self.queries_after_warm_up - queries_before} queries during warm-up "
            "(the first stream's lookups); the measurements should add none")

    def check_dns_stayed_cached(self) -> None:
        extra = self.resolver_queries() - self.queries_after_warm_up
        self.report.details["resolver_queries_measured"] = extra
        log(f"resolver: {extra} queries during the measurements (warm cache: expected 0, or a few "
            "if a cached answer's TTL ran out)")

    # ------------------------------------------------------------------ 1. memory

    @staticmethod
    def _memdump(server, path: str) -> None:
        """XDP_BENCH_MEMDUMP (analysis only): the proxy writes its heap to `path` (SIGUSR1)."""
        os.kill(server.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 60
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.2)

    def memory(self) -> None:
        k = self.s.idle_streams
        figures = {}
        for name, ep in self.endpoints.items():
            server = self.servers[name]
            dump = os.environ.get("XDP_BENCH_MEMDUMP") if name == "proxy" else None
            if dump:
                self._memdump(server, dump + ".before")
            before = server.rss_kib()
            streams = []
            try:
                for _ in range(k):
                    streams.append(S2SStream(ep, self.ctx).open())
                during = server.rss_kib()
                threads = server.threads()
                if dump:
                    self._memdump(server, dump)
                    log(f"memory: the proxy's heap before and with {k} idle streams: {dump}.before, {dump}")
            finally:
                for stream in streams:
                    stream.close()
            self.wait_sink_idle()
            after = server.rss_kib()
            per = (during - before) / k
            figures[name] = per
            self.report.details.setdefault("memory", {})[name] = {
                "streams": k, "rss_before_kib": before, "rss_with_streams_kib": during,
                "rss_after_close_kib": after, "threads_with_streams": threads}
            log(f"memory {name}: RSS {before} -> {during} KiB with {k} idle streams "
                f"({per:.1f} KiB/stream, {threads} threads); {after} KiB after closing them")
        self.report.add("memory", f"RSS per idle authenticated stream (K={k})", "KiB",
                        figures["proxy"], figures["stunnel"], higher_is_better=False)

    # ------------------------------------------------------------------ 2. handshakes

    def handshakes_once(self, ep: Endpoint) -> dict:
        n, workers = self.s.handshakes, self.s.concurrency
        lock = threading.Lock()
        next_index = [0]
        latencies: list[float] = []
        errors: list[BaseException] = []

        def worker() -> None:
            while True:
                with lock:
                    if next_index[0] >= n or errors:
                        return
                    next_index[0] += 1
                try:
                    latency = dance(ep, self.ctx)
                except BaseException as exc:  # reported below, the run stops
                    with lock:
                        errors.append(exc)
                    return
                with lock:
                    latencies.append(latency)

        threads = [threading.Thread(target=worker, name=f"dance-{i}") for i in range(workers)]
        with Window(self.servers[ep.name].pid, (self.sink.pid,)) as window:
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - started
        if errors:
            raise errors[0]
        self.wait_sink_idle()
        latencies.sort()
        return {"n": n, "seconds": elapsed, "rate": n / elapsed, "cpu_ms_per": 1000 * window.cpu / n,
                "server_cpu_seconds": window.cpu, "load_cpu_ms_per": 1000 * window.load_cpu / n,
                "busy": window.busy, "bound": window.bound(SERVER_CORE, LOAD_CORE),
                "cpu_precise": window.precise,
                "p50_ms": 1000 * latencies[len(latencies) // 2],
                "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]}

    def handshakes(self) -> None:
        runs: dict[str, list[dict]] = {name: [] for name in self.endpoints}
        for rep in range(self.s.repeats):
            for name, ep in self.endpoints.items():
                r = self.handshakes_once(ep)
                runs[name].append(r)
                log(f"handshakes {name} #{rep + 1}: {r['rate']:.0f}/s, {r['cpu_ms_per']:.3f} ms server CPU each "
                    f"({r['load_cpu_ms_per']:.3f} ms load side), p50 {r['p50_ms']:.2f} ms, "
                    f"cores busy {fmt_busy(r['busy'])} ({r['bound']})")
        self.report.details["handshakes"] = runs
        rate = {name: median_run(rs, "rate") for name, rs in runs.items()}
        med = {name: medians(rs) for name, rs in runs.items()}
        c = self.s.concurrency
        self.report.add("handshakes", f"measured: streams set up + judged per second ({c} concurrent)", "1/s",
                        med["proxy"]["rate"], med["stunnel"]["rate"], higher_is_better=True,
                        note=bound_note(rate))
        self.report.add("handshakes", "capacity: set-ups per second of server CPU (1 core)", "1/s",
                        1000 / med["proxy"]["cpu_ms_per"], 1000 / med["stunnel"]["cpu_ms_per"],
                        higher_is_better=True)
        self.report.add("handshakes", "server CPU per stream set-up", "ms",
                        med["proxy"]["cpu_ms_per"], med["stunnel"]["cpu_ms_per"], higher_is_better=False)
        self.report.add("handshakes", "set-up latency p50", "ms",
                        med["proxy"]["p50_ms"], med["stunnel"]["p50_ms"], higher_is_better=False)

    # ------------------------------------------------------------------ 3. relay throughput

    def relay(self, size: int, stanzas: int) -> None:
        per_blob = max(1, 65536 // size)
        blob = b"".join(stanza(size, i) for i in range(per_blob))
        repeats = max(1, stanzas // per_blob)
        count = repeats * per_blob
        streams = {name: S2SStream(ep, self.ctx).open() for name, ep in self.endpoints.items()}
        runs: dict[str, list[dict]] = {name: [] for name in self.endpoints}
        try:
            for stream in streams.values():     # warm: buffers grown, code paths hot
                stream.burst(blob, max(1, repeats // 20))
            for rep in range(self.s.repeats):
                for name, stream in streams.items():
                    with Window(self.servers[name].pid, (self.sink.pid,)) as window:
                        sent, seconds = stream.burst(blob, repeats)
                    r = {"stanzas": count, "bytes": sent, "seconds": seconds, "stanzas_per_s": count / seconds,
                         "mb_per_s": sent / seconds / 1e6, "server_cpu_seconds": window.cpu,
                         "cpu_us_per_stanza": 1e6 * window.cpu / count,
                         "cpu_s_per_gb": window.cpu / (sent / 1e9),
                         "load_cpu_us_per_stanza": 1e6 * window.load_cpu / count,
                         "busy": window.busy, "bound": window.bound(SERVER_CORE, LOAD_CORE),
                         "cpu_precise": window.precise}
                    runs[name].append(r)
                    log(f"relay {size} B {name} #{rep + 1}: {r['stanzas_per_s']:.0f} stanzas/s, "
                        f"{r['mb_per_s']:.1f} MB/s, {r['cpu_us_per_stanza']:.2f} µs server CPU/stanza "
                        f"({r['load_cpu_us_per_stanza']:.2f} µs load side), "
                        f"cores busy {fmt_busy(r['busy'])} ({r['bound']})")
        finally:
            for stream in streams.values():
                stream.close()
        self.wait_sink_idle()
        label = f"{size // 1024} KiB"
        rate = {name: median_run(rs, "stanzas_per_s") for name, rs in runs.items()}
        med = {name: medians(rs) for name, rs in runs.items()}
        self.report.details[f"relay_{size}"] = runs
        group = f"relay {label} stanzas"
        self.report.add(group, f"measured: stanzas/s ({count} x {label} on one stream)", "1/s",
                        med["proxy"]["stanzas_per_s"], med["stunnel"]["stanzas_per_s"], higher_is_better=True,
                        note=bound_note(rate))
        self.report.add(group, "measured: MB/s (10^6 bytes)", "MB/s",
                        med["proxy"]["mb_per_s"], med["stunnel"]["mb_per_s"], higher_is_better=True)
        self.report.add(group, "capacity: MB per second of server CPU (1 core)", "MB/s",
                        1e3 / med["proxy"]["cpu_s_per_gb"], 1e3 / med["stunnel"]["cpu_s_per_gb"],
                        higher_is_better=True)
        self.report.add(group, "server CPU per stanza", "µs",
                        med["proxy"]["cpu_us_per_stanza"], med["stunnel"]["cpu_us_per_stanza"],
                        higher_is_better=False)
        self.framing_floor(group, size, med["stunnel"]["cpu_us_per_stanza"])

    def framing_floor(self, group: str, size: int, stunnel_us: float) -> None:
        """The floor of the proxy's CPU per stanza: stunnel's, plus expat over the stanza,
        which framing in agreement with the backend's parser cannot skip
        (bench/framing_calibration.py), on the server core."""
        out = subprocess.run([sys.executable, str(HERE / "framing_calibration.py"), str(size)],
                             capture_output=True, text=True, timeout=300,
                             preexec_fn=lambda: os.sched_setaffinity(0, {SERVER_CORE}))
        if out.returncode != 0:
            raise BenchError(f"framing calibration failed: {out.stderr[-2000:]}")
        cal = json.loads(out.stdout)[str(size)]
        self.report.details.setdefault("framing_calibration", {})[str(size)] = cal
        framer = cal["framer_us"]
        log(f"framing alone, {size} B stanza: proxy's framer {framer:.2f} µs, bare libexpat "
            f"{cal['bare_expat_us']:.2f} µs (in-process, no sockets)")
        self.report.add(group, "floor: stunnel's CPU + the XML framer alone", "µs",
                        stunnel_us + framer, stunnel_us, higher_is_better=False,
                        note=f"framer alone {framer:.2f} µs/stanza (bare libexpat {cal['bare_expat_us']:.2f}); "
                             f"best capacity ratio an expat-framing proxy can reach here: "
                             f"{stunnel_us / (stunnel_us + framer):.3f}")


def medians(runs: list[dict]) -> dict:
    """Per numeric key, the median over the repeats."""
    return {key: statistics.median(r[key] for r in runs)
            for key, value in runs[0].items() if isinstance(value, (int, float)) and not isinstance(value, bool)}


def median_run(runs: list[dict], key: str) -> dict:
    ordered = sorted(runs, key=lambda r: r[key])
    return ordered[len(ordered) // 2]


def bound_note(med: dict) -> str:
    return "; ".join(f"{name} run: cores busy {fmt_busy(r['busy'])}, {r['bound']}" for name, r in med.items())


def fmt_busy(busy: dict | None) -> str:
    if not busy:
        return "-"
    return " ".join(f"c{core}={100 * frac:.0f}%" for core, frac in sorted(busy.items()))


# ================================================================================ output

def machine_facts() -> dict:
    import ssl

    from OpenSSL import SSL

    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    stunnel_version = subprocess.run(["stunnel4", "-version"], capture_output=True, text=True).stderr
    m = re.search(r"stunnel (\S+).*?Running\s+with (OpenSSL \S+)", stunnel_version, re.S)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "proxy_openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
        "client_openssl": ssl.OPENSSL_VERSION,
        "stunnel": f"stunnel {m.group(1)} with {m.group(2)}" if m else stunnel_version.strip()[:200],
    }


FRAMER_NOTES = {"c": "proxy/_xmlframe.c over the system libexpat",
                "python": "proxy/xmlstream.py over pyexpat; XMPP_DANE_PROXY_FRAMER=python or no C build"}


def render(report: Report, settings: Settings, facts: dict, profiled: bool) -> str:
    lines = []
    lines.append("xmpp-dane-proxy inbound vs stunnel4 — same certificates, client, bytes and sink; "
                 f"server pinned to core {SERVER_CORE}, load on core {LOAD_CORE}")
    lines.append(f"machine: {facts['cpus']} CPUs ({facts['cpu_model']}), Linux {facts['kernel']}, "
                 f"Python {facts['python']}")
    lines.append(f"TLS: proxy {facts['proxy_openssl']} (pyOpenSSL), {facts['stunnel']}, "
                 f"client {facts['client_openssl']}")
    tls = report.details.get("tls", {})
    if tls:
        lines.append("negotiated: " + ", ".join(f"{k} {v['version']} {v['cipher']}" for k, v in tls.items()))
    lines.append(f"settings: {settings}; proxy metrics counters {facts.get('proxy_metrics_counters', '?')}; "
                 f"peer evidence from {facts.get('evidence', '?')}")
    lines.append(f"proxy XML framer: {facts.get('framer', '?')} ({FRAMER_NOTES.get(facts.get('framer'), '?')})")
    noise = [facts.get("background_busy_before"), facts.get("background_busy_after")]
    noise = [n for n in noise if n]
    if noise:
        lines.append("background load (benchmark idle, before/after): "
                     + " / ".join(fmt_busy(n) for n in noise))
        if any(frac > 0.05 for n in noise for frac in n.values()):
            lines.append("!! other processes were busy on this machine: figures are noisier than usual")
    if profiled:
        lines.append("!! the proxy ran under a profiler: its figures are NOT comparable to stunnel's")
    headline = [r for r in report.rows if r.metric.startswith("capacity") or r.group == "memory"]
    if headline:
        lines.append("")
        lines.append("headline (proxy/stunnel; capacity = work per second of server CPU on one core, "
                     "memory = RSS per idle stream):")
        floors = {r.group: r for r in report.rows if r.metric.startswith("floor:")}
        for r in headline:
            what = f"{r.group} capacity" if r.metric.startswith("capacity") else "memory per idle stream"
            ceiling = floors.get(r.group) if r.metric.startswith("capacity") else None
            lines.append(f"  {what:<40} {r.ratio:8.3f}" + (
                f"   (ceiling with expat over every byte: {1 / ceiling.ratio:.3f})" if ceiling else ""))
    lines.append("")
    header = f"{'figure':<70} {'proxy':>10} {'stunnel':>12} {'proxy/stunnel':>14}  reads as"
    lines.append(header)
    lines.append("-" * len(header))
    group = None
    for row in report.rows:
        if row.group != group:
            group = row.group
            lines.append(f"[{group}]")
        if row.higher_is_better:
            reading = f"proxy at {row.ratio:.2f}x stunnel"
        else:
            reading = f"proxy uses {row.ratio:.2f}x stunnel's"
        lines.append(f"  {row.metric + ' (' + row.unit + ')':<68} {fmt_num(row.proxy):>10} "
                     f"{fmt_num(row.stunnel):>12} {row.ratio:>14.3f}  {reading}")
        if row.note:
            lines.append(f"      {row.note}")
    return "\n".join(lines)


def fmt_num(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


# ================================================================================ main

SCENARIOS = ("memory", "handshake", "relay1k", "relay64k")  # calibration comes with "handshake" or "memory"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="proxy vs stunnel: throughput, handshakes, memory (ratios)")
    p.add_argument("--quick", action="store_true", help="small counts, one repeat")
    p.add_argument("--only", default=",".join(SCENARIOS),
                   help=f"comma-separated subset of {', '.join(SCENARIOS)} (default: all)")
    p.add_argument("--repeats", type=int, help="measurements per figure (median reported)")
    p.add_argument("--stanzas-1k", type=int, help="1 KiB stanzas per relay burst")
    p.add_argument("--stanzas-64k", type=int, help="64 KiB stanzas per relay burst")
    p.add_argument("--handshakes", type=int, help="streams set up per handshake measurement")
    p.add_argument("--concurrency", type=int, help="concurrent clients in the handshake measurement")
    p.add_argument("--idle-streams", type=int, help="K, idle streams held open for the memory figure")
    p.add_argument("--profile", nargs="?", const="cprofile", choices=("cprofile", "pyinstrument"),
                   help="run the proxy under a profiler (default cProfile; pyinstrument samples, with less "
                        "overhead, if installed); the report is printed and saved with the results. "
                        "Figures of a profiled run are not comparable")
    p.add_argument("--evidence", choices=EVIDENCE_MODES, default="dns",
                   help="where the proxy gets the peer's SRV/TLSA: 'dns' (default: the signed test zone via "
                        "unbound, then the proxy's DNS cache) or 'static' (the policy file's tlsa/srv)")
    p.add_argument("--no-metrics", action="store_true",
                   help="run the proxy without its Prometheus counters (default: counters on, as in production)")
    p.add_argument("--framer", choices=("c", "python"),
                   help="the proxy's XML framer (sets XMPP_DANE_PROXY_FRAMER for it; default: C when built)")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    p.add_argument("--keep", action="store_true", help="keep the working directory (configs, logs)")
    args = p.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = Settings.for_mode(args.quick)
    for key in ("repeats", "handshakes", "concurrency", "idle_streams"):
        if getattr(args, key):
            setattr(settings, key, getattr(args, key))
    if args.stanzas_1k:
        settings.relay_1k_stanzas = args.stanzas_1k
    if args.stanzas_64k:
        settings.relay_64k_stanzas = args.stanzas_64k
    if (os.cpu_count() or 1) < 2:
        log("only one CPU: server and load share it; ratios still compare, absolute figures do not")
    else:
        # The load side (this process and everything it starts unless pinned elsewhere: the
        # sink, nsd, unbound) lives on the other core.
        os.sched_setaffinity(0, {LOAD_CORE})
    scenarios = args.only.split(",")
    if args.framer:
        os.environ["XMPP_DANE_PROXY_FRAMER"] = args.framer   # inherited by the proxy process
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    results_dir = HERE / "results"
    workdir = Path(tempfile.mkdtemp(prefix="xdp-bench-"))
    facts = machine_facts()
    facts["evidence"] = ("DNS (signed zone via unbound, then the proxy's cache)" if args.evidence == "dns"
                         else "the policy file (static tlsa/srv)")
    log(f"working directory {workdir}")

    for tool, package in (("stunnel4", "stunnel4"), ("nsd", "nsd"), ("unbound", "unbound")):
        if not (shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/local/sbin")):
            log(f"{tool} not found: apt-get install {package}")
            return 2

    with ExitStack() as stack:
        if not args.keep:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        world, env, sink, sink_port = start_world(stack, workdir, LOAD_CORE)
        log(f"DNS: nsd + unbound on {env.resolver_address} (started in {env.startup_seconds:.2f} s)")

        proxy_argv = [sys.executable, str(HERE / "proxy_process.py"),
                      str(write_proxy_config(world, sink_port, env.resolver_address, args.evidence))]
        profile_path = workdir / ("proxy.prof" if args.profile == "cprofile" else "proxy-profile.txt")
        if args.profile:
            proxy_argv += ["--profile", str(profile_path), "--profiler", args.profile]
        if args.no_metrics:
            proxy_argv += ["--no-metrics"]
        proxy = Proc("proxy", proxy_argv, core=SERVER_CORE, log=workdir / "proxy.log")
        stack.callback(proxy.stop)
        facts["framer"] = proxy.read_line("FRAMER").split()[1]
        facts["proxy_metrics_counters"] = proxy.read_line("METRICS").split()[1]
        _, host, port = proxy.read_line("LISTENING").split()

        stunnel_port = free_port()
        stunnel = Proc("stunnel", ["stunnel4", str(write_stunnel_config(world, stunnel_port, sink_port))],
                       core=SERVER_CORE, log=workdir / "stunnel.stderr", stops_at_eof=False)
        stack.callback(stunnel.stop)
        wait_listening("127.0.0.1", stunnel_port, stunnel)

        endpoints = {"proxy": Endpoint("proxy", host, int(port), starttls=True),
                     "stunnel": Endpoint("stunnel", "127.0.0.1", stunnel_port, starttls=False)}
        bench = Bench(args, settings, world, sink, {"proxy": proxy, "stunnel": stunnel}, endpoints, env.dir)
        bench.report.details["configs"] = {
            "proxy.toml": (workdir / "proxy.toml").read_text(),
            f"policy.d/{PEER}.toml": (workdir / "policy.d" / f"{PEER}.toml").read_text(),
            "stunnel.conf": (workdir / "stunnel.conf").read_text()}
        try:
            bench.warm_up()
            facts["background_busy_before"] = background_busy()
            log(f"background load with the benchmark idle: {fmt_busy(facts['background_busy_before'])}")
            if "memory" in scenarios:
                bench.memory()
            if "handshake" in scenarios:
                bench.handshakes()
            if "relay1k" in scenarios:
                bench.relay(1024, settings.relay_1k_stanzas)
            if "relay64k" in scenarios:
                bench.relay(65536, settings.relay_64k_stanzas)
            bench.check_dns_stayed_cached()
            facts["background_busy_after"] = background_busy()
            log(f"background load with the benchmark idle: {fmt_busy(facts['background_busy_after'])}")
            if "handshake" in scenarios or "memory" in scenarios:
                bench.calibrate_tls()
        except (BenchError, ProcError, OSError) as exc:
            log(f"FAILED: {exc}")
            log(f"proxy log tail:\n{proxy.tail()}")
            return 1
        finally:
            proxy.stop()      # so that a profile is written before the directory goes

        text = render(bench.report, settings, facts, bool(args.profile))
        print(text)
        if not args.no_save:
            results_dir.mkdir(exist_ok=True)
            out = results_dir / (f"{stamp}{'-quick' if args.quick else ''}{'-static' if args.evidence == 'static' else ''}"
                                 f"{'-profile' if args.profile else ''}")
            (out.with_suffix(".txt")).write_text(text + "\n")
            (out.with_suffix(".json")).write_text(json.dumps({
                "facts": facts, "settings": settings.__dict__, "profiled": args.profile,
                "rows": [dict(r.__dict__, ratio=r.ratio) for r in bench.report.rows],
                "details": bench.report.details}, indent=2, default=str))
            log(f"results written to {out}.txt / .json")
            if args.profile and profile_path.exists():
                saved = out.parent / f"{out.name}-{profile_path.name}"
                shutil.copy(profile_path, saved)
                print_profile(saved)
        elif args.profile and profile_path.exists():
            print_profile(profile_path)
    return 0


def print_profile(path: Path, limit: int = 30) -> None:
    if path.suffix == ".txt":      # pyinstrument's text report
        print(f"\n--- proxy profile ({path}) ---")
        print(path.read_text())
        return
    import pstats

    print(f"\n--- proxy profile ({path}), top {limit} by own time ---")
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(limit)
    print(f"--- top {limit} by cumulative time ---")
    stats.sort_stats("cumulative").print_stats(limit)


if __name__ == "__main__":
    sys.exit(main())
