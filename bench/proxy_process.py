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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--profile", metavar="OUT", help="run under a profiler, write its report here")
    parser.add_argument("--profiler", choices=("cprofile", "pyinstrument"), default="cprofile",
                        help="cProfile (deterministic; OUT is a pstats file) or pyinstrument "
                             "(sampling, lower overhead; OUT is a text report)")
    parser.add_argument("--no-metrics", action="store_true", help="do not keep Prometheus counters")
    args = parser.parse_args()
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
