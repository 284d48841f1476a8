"""Run the inbound proxy (`proxy.server.serve`) from a config file, as the benchmark's proxy.

    python3 bench/proxy_process.py CONFIG.toml [--profile OUT [--profiler cprofile|pyinstrument]] [--no-metrics]

This is what `xmpp-dane-proxy run -c CONFIG.toml` does for the inbound side (load the config,
set up logging as configured, serve), written out here because the benchmark needs the bound
port (the config listens on port 0) and an optional profiler around the whole process.  Prints
`FRAMER c|python` (which XML framer runs) and `LISTENING <host> <port>` on stdout once the
listener is bound; stops on SIGTERM/SIGINT or when
stdin reaches EOF (so it never outlives the benchmark that started it).  With `--profile`, the
process runs under cProfile (or pyinstrument, if installed) and writes the report to OUT on
the way out.  Prometheus
counters (`proxy.metrics.Metrics`) are kept as in production unless `--no-metrics`.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from proxy.config import load_config  # noqa: E402
from proxy.logsetup import configure_logging  # noqa: E402
from proxy.server import Listening, serve  # noqa: E402


async def run(config_path: str, with_metrics: bool) -> None:
    config = load_config(config_path)
    configure_logging(config.log.level, config.log.format)
    kwargs = {}
    if with_metrics and "metrics" in inspect.signature(serve).parameters:
        # The counters a production proxy keeps (DESIGN §6); nobody scrapes them here, so
        # the endpoint itself is not started.
        from proxy.metrics import Metrics

        kwargs["metrics"] = Metrics()
    async with trio.open_nursery() as nursery:
        listening: Listening = await nursery.start(functools.partial(serve, config, **kwargs))
        from proxy.xmlstream import FRAMER

        print(f"FRAMER {FRAMER}", flush=True)   # c or python (XMPP_DANE_PROXY_FRAMER)
        print(f"METRICS {'on' if kwargs else 'off'}", flush=True)
        host, port = listening.inbound[0]
        print(f"LISTENING {host} {port}", flush=True)

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

        async def stop_on_stdin_eof() -> None:
            stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
            while await stdin.receive_some(1024):
                pass
            nursery.cancel_scope.cancel()

        nursery.start_soon(stop_on_signal)
        nursery.start_soon(stop_on_stdin_eof)
        if os.environ.get(MEMDUMP_ENV):
            nursery.start_soon(dump_memory_on_signal, os.environ[MEMDUMP_ENV])


# `run.py --memdump`: tracemalloc from the start; SIGUSR1 writes where the Python heap is
# (top allocation sites) and the kernel's view (/proc/self/smaps_rollup) to PATH.
MEMDUMP_ENV = "XDP_BENCH_MEMDUMP"


async def dump_memory_on_signal(path: str) -> None:
    import tracemalloc

    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            target = path if Path(path + ".before").exists() else path + ".before"
            lines = []
            for key in ("lineno", "traceback") if tracemalloc.is_tracing() else ():
                if key == "lineno":
                    snapshot = tracemalloc.take_snapshot()
                    snapshot.dump(target + ".snap")   # for Snapshot.compare_to: what each stream holds
                    lines.append(f"traced: {tracemalloc.get_traced_memory()[0]} bytes")
                lines.append(f"--- top by {key}")
                for stat in snapshot.statistics(key)[:40 if key == "lineno" else 12]:
                    lines.append(f"{stat.size} B in {stat.count} blocks: " + (
                        str(stat.traceback[0]) if key == "lineno" else " <- ".join(
                            str(frame) for frame in list(stat.traceback)[:12])))
            try:
                import ctypes

                class _MallInfo2(ctypes.Structure):
                    _fields_ = [(name, ctypes.c_size_t) for name in (
                        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                        "uordblks", "fordblks", "keepcost")]

                libc = ctypes.CDLL(None)
                libc.mallinfo2.restype = _MallInfo2
                info = libc.mallinfo2()
                lines.append(f"--- malloc: in use {info.uordblks} B (+{info.hblkhd} B mmapped), "
                             f"free in arenas {info.fordblks} B")
            except (OSError, AttributeError):
                pass
            lines.append("--- smaps_rollup")
            lines.append(Path("/proc/self/smaps_rollup").read_text())
            Path(target + ".tmp").write_text("\n".join(lines))
            os.replace(target + ".tmp", target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--profile", metavar="OUT", help="run under a profiler, write its report here")
    parser.add_argument("--profiler", choices=("cprofile", "pyinstrument"), default="cprofile",
                        help="cProfile (deterministic; OUT is a pstats file) or pyinstrument "
                             "(sampling, lower overhead; OUT is a text report)")
    parser.add_argument("--no-metrics", action="store_true", help="do not keep Prometheus counters")
    args = parser.parse_args()
    if os.environ.get(MEMDUMP_ENV) and os.environ.get(MEMDUMP_ENV + "_FRAMES", "16") != "0":
        import tracemalloc

        tracemalloc.start(int(os.environ.get(MEMDUMP_ENV + "_FRAMES", "16")))
    if not args.profile:
        trio.run(run, args.config, not args.no_metrics)
    elif args.profiler == "pyinstrument":
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005)
        profiler.start()
        try:
            trio.run(run, args.config, not args.no_metrics)
        finally:
            profiler.stop()
            Path(args.profile).write_text(profiler.output_text(unicode=True, color=False))
    else:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            trio.run(run, args.config, not args.no_metrics)
        finally:
            profiler.disable()
            profiler.dump_stats(args.profile)


if __name__ == "__main__":
    main()
