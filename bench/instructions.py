"""Instructions per stream set-up, proxy and stunnel, counted by valgrind (callgrind).

    python3 bench/instructions.py              # 100 set-ups each, about a minute
    python3 bench/instructions.py --setups 300 --evidence static

`run.py`'s handshake figure is server CPU time, and on a shared machine it moves by ±10 %
from one run to the next, for stunnel as much as for the proxy (bench/README.md): a change
that saves 2 % of a set-up cannot be seen in it.  This counts what the CPU is asked to do
instead, which does not depend on the neighbours: both servers run under callgrind, the same
client (`loadclient.dance`) sets up one stream at a time after a warm-up (so the DNS cache is
warm, as in `run.py`), and the counters cover exactly the measured set-ups (`callgrind_control
-z` before, `-d` after).  Runs with the same `--setups` agree to about 0.2 % (8.246, 8.260
and 8.262 M for the proxy at 100); fewer set-ups read higher, the process's periodic work
spread over fewer of them (8.76 M at 20).

It is an A/B instrument for code changes, not the headline: an instruction is not a unit of
time (OpenSSL's arithmetic runs several per cycle, the interpreter's dispatch fewer), kernel
work (the system calls, loopback TCP) is not counted, and callgrind runs everything some 50
times slower.  The report splits the count by library (OpenSSL inside `cryptography`, the
interpreter, libc, libexpat), which says whether a change touched TLS or the Python around it.

Needs `valgrind` besides what `run.py` needs (stunnel4, nsd, unbound).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from loadclient import Endpoint, client_context, dance  # noqa: E402
from procs import Proc, free_port, wait_listening  # noqa: E402
from run import LOAD_CORE, SERVER_CORE, start_world, write_proxy_config, write_stunnel_config  # noqa: E402

WARM_UP = 10     # set-ups before counting: the DNS cache, the interpreter's caches, OpenSSL's tables
# callgrind's own start-up (it translates every instruction it meets) makes the first
# set-ups slow: a generous timeout for each.
DANCE_TIMEOUT = 120.0


def callgrind(argv: list[str], out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", *argv]


def count(proc: Proc, endpoint: Endpoint, ctx, setups: int, out: Path) -> Path:
    """Zero the counters, make `setups` set-ups one at a time, dump; the dump file."""
    for _ in range(WARM_UP):
        dance(endpoint, ctx, timeout=DANCE_TIMEOUT)
    subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
    for _ in range(setups):
        dance(endpoint, ctx, timeout=DANCE_TIMEOUT)
    subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
    dumps = sorted(out.parent.glob(f"{out.name}.{proc.pid}.*"), key=lambda p: p.stat().st_mtime)
    if not dumps:
        raise RuntimeError(f"callgrind wrote no dump for {proc.name} (pid {proc.pid})")
    return dumps[-1]


def by_library(dump: Path) -> collections.Counter:
    """Instructions by shared object, from a callgrind dump: each function's own cost (the
    cost lines right after `fn=`; a line after `calls=` is a callee's inclusive cost)."""
    names: dict[str, str] = {}
    costs: collections.Counter = collections.Counter()
    library = "?"
    after_call = False
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("ob=", "cob=")):
            m = re.match(r"c?ob=\((\d+)\)(?: (.*))?", line)
            if m:
                if m.group(2) is not None:
                    names[m.group(1)] = m.group(2)
                if line.startswith("ob="):
                    library = names.get(m.group(1), "?")
            continue
        if line.startswith("calls="):
            after_call = True
            continue
        if line[:1].isdigit() or line[:1] in "+-*":
            parts = line.split()
            if len(parts) >= 2:
                if not after_call:
                    costs[library] += int(parts[1])
                after_call = False
    return costs


def short(library: str) -> str:
    name = Path(library).name
    if name.startswith("_rust.abi3"):
        return "OpenSSL (in cryptography)"
    return name.split(".cpython")[0].split(".so")[0] or "?"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", type=int, default=100, help="set-ups counted per server (default 100)")
    parser.add_argument("--evidence", choices=("dns", "static"), default="dns",
                        help="the peer's TLSA/SRV from DNS (then the proxy's cache) or from its policy file")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (dumps, logs)")
    args = parser.parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "stunnel4", "nsd", "unbound"):
        if not (shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/local/sbin")):
            print(f"{tool} not found (apt-get install valgrind stunnel4 nsd unbound)", file=sys.stderr)
            return 2
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {LOAD_CORE})
    workdir = Path(tempfile.mkdtemp(prefix="xdp-instructions-"))
    results = {}
    with ExitStack() as stack:
        if not args.keep:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        world, env, _sink, sink_port = start_world(stack, workdir, LOAD_CORE)
        ctx = client_context(str(world.peer_cert), str(world.peer_key))

        config = write_proxy_config(world, sink_port, env.resolver_address, args.evidence)
        out = workdir / "callgrind.proxy"
        proxy = Proc("proxy", callgrind([sys.executable, str(HERE / "proxy_process.py"), str(config)], out),
                     core=SERVER_CORE, log=workdir / "proxy.log")
        stack.callback(proxy.stop)
        _, host, port = proxy.read_line("LISTENING", timeout=300).split()
        results["proxy"] = by_library(count(proxy, Endpoint("proxy", host, int(port), True), ctx, args.setups, out))
        proxy.stop()

        stunnel_port = free_port()
        out = workdir / "callgrind.stunnel"
        stunnel = Proc("stunnel", callgrind(["stunnel4", str(write_stunnel_config(world, stunnel_port, sink_port))], out),
                       core=SERVER_CORE, log=workdir / "stunnel.stderr", stops_at_eof=False)
        stack.callback(stunnel.stop)
        wait_listening("127.0.0.1", stunnel_port, stunnel, timeout=300)
        results["stunnel"] = by_library(count(stunnel, Endpoint("stunnel", "127.0.0.1", stunnel_port, False), ctx,
                                              args.setups, out))
        stunnel.stop()
        if args.keep:
            print(f"working directory kept: {workdir}", file=sys.stderr)

    per = {name: sum(c.values()) / args.setups for name, c in results.items()}
    print(f"instructions per stream set-up + verdict ({args.setups} set-ups each, one at a time, "
          f"evidence {args.evidence}; callgrind, user space only)")
    print(f"  proxy    {per['proxy'] / 1e6:8.3f} M")
    print(f"  stunnel  {per['stunnel'] / 1e6:8.3f} M")
    print(f"  stunnel/proxy {per['stunnel'] / per['proxy']:.3f}")
    for name, costs in results.items():
        print(f"{name}, by library:")
        total = sum(costs.values())
        for library, n in costs.most_common(6):
            print(f"  {100 * n / total:5.1f} %  {n / args.setups / 1e6:7.3f} M  {short(library)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
