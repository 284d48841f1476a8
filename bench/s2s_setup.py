"""Per-message S2S set-up cost through the proxy today: connections, round trips, wall time.

The "before" figures of issue 12 (SASL EXTERNAL at the proxy, local dialback answers).  A user
of a peer server sends the first message to a user of a backend behind the proxy; nothing is
established between the two servers yet, so the message waits for the whole S2S set-up:

    peer (Prosody 0.12 / ejabberd 23.01, STARTTLS required, DANE-EE TLSA in a signed zone)
      -> [front relay] -> proxy inbound (verdict by DANE) -> [backend relay] -> backend
    backend (Prosody 0.12 / ejabberd 23.01, outgoing S2S through contrib/'s module)
      -> [outbound relay] -> proxy outbound (`outbound.listen`, verdict by DANE) -> [peer relay] -> peer
         (the backend's dialback key check, XEP-0220 <db:verify>, goes this way)

Every relay is a plain TCP relay that timestamps each chunk it passes, so the figures are
what crossed the wire: connections per hop, and round trips per hop counted as direction
changes (a burst one way followed by a burst back = one round trip; TLS handshakes included).
Wall time runs from the sender's `<message/>` leaving its c2s connection to the recipient's
c2s connection receiving it.  Everything is on loopback, so wall time is mostly CPU (both
servers, the proxy, nsd/unbound) rather than latency: multiply the round trips on the critical
path by your RTT for a real network.

    python3 bench/s2s_setup.py                 # 3 runs per peer/backend pair (median), ~2 min
    python3 bench/s2s_setup.py --runs 1 --peer ejabberd --backend prosody
    python3 bench/s2s_setup.py --direction out # the backend's user writes first (outbound set-up)

Needs what the tests need (nsd, unbound, prosody with lua-unbound, ejabberd, erlc).  Not part of
the test run (pytest collects only tests/).
"""
from __future__ import annotations

import argparse
import json
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
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]

import trio  # noqa: E402

from dnsenv import dns_environment  # noqa: E402
from ejabberdenv import EjabberdHost, EjabberdServer, ejabberd_libs  # noqa: E402
from pki import TestCA  # noqa: E402
from prosodyenv import ProsodyDns, ProsodyServer, VirtualHost, free_port  # noqa: E402
from proxyenv import RunningProxy, TrioThread, write_config, write_policies  # noqa: E402
from xmppclient import Account  # noqa: E402

REPO = HERE.parent
PROXY_IP, PEER_IP, BACKEND_IP, RELAY_IP = "127.0.6.10", "127.0.6.11", "127.0.6.12", "127.0.6.13"
USER, PASSWORD = "u", "pw"
TIMEOUT = 30.0


# ------------------------------------------------------------------------------ timed relay

@dataclass
class Conn:
    opened: float
    chunks: list[tuple[float, str, int]] = field(default_factory=list)   # (time, ">" or "<", bytes)
    head: bytes = b""   # the first bytes the client sent (its plaintext stream header)

    def round_trips(self) -> int:
        """Every burst from the connecting side followed by a burst back is one round trip
        (the TCP handshake is not included: add one per connection)."""
        trips, last = 0, None
        for _, direction, _ in self.chunks:
            if direction != last:
                if direction == "<" and last == ">":
                    trips += 1
                last = direction
        return trips

    def bytes(self) -> tuple[int, int]:
        return (sum(n for _, d, n in self.chunks if d == ">"), sum(n for _, d, n in self.chunks if d == "<"))


class TimedRelay:
    """A loopback TCP relay to `target` that timestamps every chunk, per connection."""

    def __init__(self, target: tuple[str, int], host: str = RELAY_IP) -> None:
        self.target, self.host = target, host
        self.conns: list[Conn] = []
        self._lock = threading.Lock()
        self._loop = TrioThread("timed-relay")
        self.address: tuple[str, int] | None = None

    def __enter__(self) -> "TimedRelay":
        self._loop.__enter__()
        self.address = self._loop.start(self._serve)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.close()

    def reset(self) -> None:
        with self._lock:
            self.conns = []

    async def _serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        task_status.started(tuple(listeners[0].socket.getsockname()[:2]))
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        conn = Conn(time.monotonic())
        with self._lock:
            self.conns.append(conn)
        try:
            upstream = await trio.open_tcp_stream(*self.target)
        except OSError:
            await client.aclose()
            return
        async with client, upstream:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, upstream, conn, ">", nursery)
                nursery.start_soon(self._pump, upstream, client, conn, "<", nursery)

    async def _pump(self, src, dst, conn: Conn, direction: str, nursery) -> None:
        try:
            while data := await src.receive_some(65536):
                with self._lock:
                    conn.chunks.append((time.monotonic(), direction, len(data)))
                    if direction == ">" and len(conn.head) < 400:
                        conn.head += data[:400 - len(conn.head)]
                await dst.send_all(data)
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            nursery.cancel_scope.cancel()

    def snapshot(self) -> list[Conn]:
        with self._lock:
            return [Conn(c.opened, list(c.chunks), c.head) for c in self.conns]


# ------------------------------------------------------------------------------ one run

async def _first_message(sender: Account, recipient: Account, body: str) -> tuple[float, float]:
    """(when the sender's <message/> left, seconds until it arrived at the recipient); both
    are logged in and available before the clock starts."""
    alice = await sender.login(resource="sender", timeout=TIMEOUT)
    bob = await recipient.login(resource="recipient", timeout=TIMEOUT)
    try:
        await alice.send_presence()
        await bob.send_presence()
        # The presence round trip to the own server is done before the clock starts.
        await bob.xs.wait_for(lambda s: s.name == "presence", timeout=TIMEOUT)
        began = time.monotonic()
        await alice.send_message(recipient.jid, body)
        await bob.wait_for_message(body, timeout=TIMEOUT)
        return began, time.monotonic() - began
    finally:
        await alice.aclose()
        await bob.aclose()


def _stream_of(head: bytes) -> str:
    """"from->to" of the stream header at the start of a connection ("?" if none is readable)."""
    import re
    attrs = dict(re.findall(rb"\s(from|to)=['\"]([^'\"]*)['\"]", head.split(b">", 2)[-2] if head.count(b">") >= 2
                            else head))
    return f"{attrs.get(b'from', b'?').decode()}->{attrs.get(b'to', b'?').decode()}"


def build_module(out: Path) -> Path:
    subprocess.run(["erlc", "-pa", str(next(ejabberd_libs().glob("ejabberd-*/ebin"))), "-o", str(out),
                    str(REPO / "contrib" / "ejabberd" / "mod_s2s_dane_proxy.erl")], check=True)
    return out


def one_run(dns_env, work: Path, ca: TestCA, ca_file: Path, ebin: Path, peer_kind: str, backend_kind: str,
            direction: str = "in") -> dict:
    peer_domain = dns_env.fresh(dns_env.secure, "p")
    local = dns_env.fresh(dns_env.secure, "b")
    peer_cert, local_cert = ca.issue([peer_domain]), ca.issue([local])
    with ExitStack() as stack:
        peer_port, backend_port = free_port(PEER_IP), free_port(BACKEND_IP)
        peer_relay = stack.enter_context(TimedRelay((PEER_IP, peer_port)))
        backend_relay = stack.enter_context(TimedRelay((BACKEND_IP, backend_port)))
        cert_path, key_path = local_cert.write(work / "proxy", local)
        config = write_config(
            work / "proxy" / "config.toml", listen=[f"{PROXY_IP}:0"], backend=f"{backend_relay.address[0]}:"
            f"{backend_relay.address[1]}", domains=[(local, cert_path, key_path)],
            nameservers=[dns_env.resolver_address], policy_dir=write_policies(work / "policy.d", {}),
            ca_file=ca_file, outbound_listen=["127.0.0.1:0"], handshake_timeout=20.0)
        proxy = stack.enter_context(RunningProxy(config))
        front_relay = stack.enter_context(TimedRelay(proxy.inbound))
        # The backend's module points at a relay in front of outbound.listen (loopback hop).
        outbound_relay = stack.enter_context(TimedRelay(proxy.outbound, host="127.0.0.1"))
        out_ip, out_port = outbound_relay.address
        with dns_env.batch():
            # The peer's SRV target is its relay; the TLSA (DANE-EE) is at the relay's port.
            dns_env.publish_xmpp(peer_domain, f"xmpp.{peer_domain}", peer_relay.address[1], peer_relay.address[0],
                                 peer_cert.cert, "3 1 1")
            dns_env.publish_xmpp(local, f"xmpp.{local}", front_relay.address[1], front_relay.address[0], None)

        if backend_kind == "prosody":
            backend = ProsodyServer(
                [VirtualHost(local, users={USER: PASSWORD})], mode="backend", address=BACKEND_IP,
                s2s_port=backend_port, modules=["s2s_dane_proxy"], plugin_paths=[REPO / "contrib" / "prosody"],
                extra_config=f's2s_dane_proxy = "{out_ip}:{out_port}"', workdir=work / "backend")
        else:
            backend = EjabberdServer(
                [EjabberdHost(local, users={USER: PASSWORD})], mode="backend", address=BACKEND_IP,
                s2s_port=backend_port, modules={"mod_s2s_dane_proxy": {"ip": out_ip, "port": out_port}},
                code_paths=[ebin], workdir=work / "backend")
        stack.enter_context(backend)
        if peer_kind == "prosody":
            peer = ProsodyServer(
                [VirtualHost(peer_domain, cert=peer_cert, users={USER: PASSWORD})], mode="peer", address=PEER_IP,
                s2s_port=peer_port, ca_file=ca_file,
                dns=ProsodyDns.validating(dns_env.resolver_address, dns_env.trust_anchor_text), workdir=work / "peer")
        else:
            peer = EjabberdServer(
                [EjabberdHost(peer_domain, cert=peer_cert, users={USER: PASSWORD})], mode="peer", address=PEER_IP,
                s2s_port=peer_port, ca_file=ca_file, nameserver=dns_env.resolver_address,
                etc_hosts={f"xmpp.{local}": front_relay.address[0]}, workdir=work / "peer")
        stack.enter_context(peer)
        for relay in (peer_relay, backend_relay, front_relay, outbound_relay):
            relay.reset()   # readiness probes of the servers' ports are not part of the cost

        peer_user, backend_user = peer.account(f"{USER}@{peer_domain}", PASSWORD), backend.account(f"{USER}@{local}", PASSWORD)
        sender, recipient = (peer_user, backend_user) if direction == "in" else (backend_user, peer_user)
        began, seconds = trio.run(_first_message, sender, recipient, "first message")
        decisions = proxy.decisions()
        hops = {"peer->proxy inbound": front_relay.snapshot(), "proxy->backend": backend_relay.snapshot(),
                "backend->proxy outbound": outbound_relay.snapshot(), "proxy outbound->peer": peer_relay.snapshot()}
        return {
            "peer": peer_kind, "backend": backend_kind, "direction": direction, "seconds": seconds,
            "connections": {k: len(v) for k, v in hops.items()},
            "round_trips": {k: [c.round_trips() for c in v] for k, v in hops.items()},
            "bytes": {k: [c.bytes() for c in v] for k, v in hops.items()},
            "streams": {k: [_stream_of(c.head) for c in v] for k, v in hops.items()},
            "first_stanza_to_connection_ms": {k: [round((c.opened - began) * 1000, 1) for c in v]
                                               for k, v in hops.items()},
            "decisions": [(d.get("direction"), d.get("domain"), d.get("verdict"), d.get("prooftype"))
                          for d in decisions],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--peer", choices=["prosody", "ejabberd"], action="append")
    parser.add_argument("--backend", choices=["prosody", "ejabberd"], action="append")
    parser.add_argument("--direction", choices=["in", "out"], default="in",
                        help="in: the peer's user writes first (default); out: the backend's user does")
    parser.add_argument("--json", action="store_true", help="every run as JSON on stdout")
    args = parser.parse_args()
    pairs = [(p, b) for p in (args.peer or ["prosody", "ejabberd"]) for b in (args.backend or ["prosody", "ejabberd"])]
    results = []
    with tempfile.TemporaryDirectory(prefix="s2s-setup-") as tmp, dns_environment() as dns_env:
        ca = TestCA("s2s setup bench CA")
        ca_file = ca.write_root(Path(tmp) / "ca.pem")
        ebin = build_module(Path(tmp))
        for peer_kind, backend_kind in pairs:
            for i in range(args.runs):
                work = Path(tmp) / f"{peer_kind}-{backend_kind}-{i}"
                result = one_run(dns_env, work, ca, ca_file, ebin, peer_kind, backend_kind, args.direction)
                print(json.dumps(result), file=sys.stderr)
                results.append(result)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"{'peer -> backend':24} {'wall s (median)':>15}  connections / round trips per hop")
    for peer_kind, backend_kind in pairs:
        mine = [r for r in results if (r["peer"], r["backend"]) == (peer_kind, backend_kind)]
        wall = statistics.median(r["seconds"] for r in mine)
        last = mine[-1]
        hops = "; ".join(f"{hop}: {n} conn, RT {last['round_trips'][hop]}" for hop, n in last["connections"].items())
        print(f"{peer_kind + ' -> ' + backend_kind:24} {wall:15.3f}  {hops}")


if __name__ == "__main__":
    main()
