#!/usr/bin/env python3
"""The first-run demo: DANE deciding, in a self-contained world on loopback.

`bash scripts/start` runs this when there is no /etc/xmpp-dane-proxy/config.toml.  It starts,
all on 127.0.0.1 with free ports (port 5269 need not be free; nothing leaves the machine):

    nsd        serving the zone test. with its children, DNSSEC-signed at start
    unbound    validating it (trust anchor: the fresh key of test.)
    backend    Prosody for home.secure.test, plaintext S2S, behind the proxy
    proxy      xmpp-dane-proxy (the real `run` command) in front of the backend
    peer 1     Prosody for dane-ok.secure.test: its TLSA (3 1 1) matches its key
    peer 2     Prosody for dane-mismatch.secure.test: a certificate the proxy's CA store
               accepts, but its TLSA names another key

A user on each peer sends a message to a user on the backend.  The demo prints the proxy's
decision line for each and what the backend received, then "try this next" commands, and
keeps the world (and the proxy's log) running until Ctrl-C; then everything is stopped and
the temporary directory removed.  `--once` stops after the banner (tests/test_demo.py).
Exit status: 0 when the matching peer was delivered and the mismatching one was not.

The world is built from the test harnesses (tests/dnsenv.py, tests/prosodyenv.py,
tests/pki.py, tests/proxyenv.py), imported from the source tree: the demo is what the tests
do, shown to a person.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from dnsenv import DnsEnv, tlsa_text  # noqa: E402
from pki import TestCA, self_signed  # noqa: E402
from prosodyenv import ProsodyDns, ProsodyServer, VirtualHost, free_port  # noqa: E402
from proxyenv import ProxyProcess, RecordingRelay, write_config, write_policies  # noqa: E402
from xmppclient import XmppError, deliver_message  # noqa: E402

IP = "127.0.0.1"
HOME = "home.secure.test"
GOOD = "dane-ok.secure.test"
BAD = "dane-mismatch.secure.test"
USER, PASSWORD = "alice", "demo"
# A message over S2S through the proxy takes well under a second on loopback; the bounce for
# the rejected peer comes as soon as the proxy refuses its dialback.  15 s leaves room for a
# busy machine and is still short enough for a first run.
SEND_TIMEOUT = 15.0
LOG_POLL_SECONDS = 0.2   # how often the running demo shows new lines of the proxy's log
BANNER = "Try this next"


@dataclass
class Peer:
    domain: str
    server: ProsodyServer
    tlsa: str          # the record published at _PORT._tcp.xmpp.DOMAIN
    about: str


@dataclass
class World:
    dir: Path
    dns: DnsEnv
    ca_file: Path
    backend: ProsodyServer
    relay: RecordingRelay
    proxy: ProxyProcess
    config: Path
    metrics: str
    peers: list[Peer]


def say(text: str = "") -> None:
    print(text, flush=True)


def build_world(stack: ExitStack, workdir: Path) -> World:
    """Start every part; each is stopped by `stack` (also if a later part fails to start)."""
    (workdir / "dns").mkdir()
    dns = stack.enter_context(DnsEnv(workdir / "dns"))
    validating = ProsodyDns.validating(dns.resolver_address, dns.trust_anchor_text)

    ca = TestCA("xmpp-dane-proxy demo CA")
    ca_file = ca.write_root(workdir / "demo-ca.pem")

    # The backend: a legacy server that cannot do DANE, plaintext S2S on loopback.  Its
    # certificate lets it make the dialback verification connection to the (STARTTLS-requiring)
    # peers, as a real backend would.
    home_cert = ca.issue([HOME], xmpp=[HOME])
    backend = stack.enter_context(ProsodyServer(
        [VirtualHost(HOME, cert=home_cert, users={USER: PASSWORD})], mode="backend", address=IP,
        dns=validating, workdir=workdir / "backend"))
    # Records what the proxy sends the backend, so the demo can say what it (did not) receive.
    relay = stack.enter_context(RecordingRelay(backend.s2s_addr, listen_host=IP))

    cert_path, key_path = home_cert.write(workdir / "proxy", HOME)
    metrics = f"{IP}:{free_port(IP)}"
    config = write_config(
        workdir / "proxy" / "config.toml", listen=[f"{IP}:0"], backend=relay.hostport,
        domains=[(HOME, cert_path, key_path)], nameservers=[dns.resolver_address],
        policy_dir=write_policies(workdir / "proxy" / "policy.d", {}), ca_file=ca_file,
        metrics_listen=metrics, handshake_timeout=30.0)
    proxy = stack.enter_context(ProxyProcess(config, log_path=workdir / "proxy" / "proxy.log"))
    proxy_host, proxy_port = proxy.inbound
    # Peers find home.secure.test through DNS, as on the Internet: SRV -> the proxy.
    dns.publish_xmpp(HOME, f"xmpp.{HOME}", proxy_port, proxy_host, None)

    # dane-ok: a self-signed certificate (no CA would vouch for it); only DANE-EE can accept it.
    good_cert = self_signed([GOOD])
    # dane-mismatch: a certificate from the CA the proxy trusts, naming the domain (PKIX would
    # accept it) — but the domain's signed TLSA names another key.  DANE decides alone: reject.
    bad_cert = ca.issue([BAD])
    other_key = self_signed([BAD]).cert
    peers = []
    for domain, cert, tlsa_cert, about in (
        (GOOD, good_cert, good_cert.cert, "TLSA matches its (self-signed) certificate"),
        (BAD, bad_cert, other_key, "TLSA names another key; its certificate is CA-valid"),
    ):
        port = free_port(IP)
        record = tlsa_text(tlsa_cert)
        target = f"xmpp.{domain}"
        with dns.batch():
            dns.publish_xmpp(domain, target, port, IP, None)
            dns.publish(None, f"_{port}._tcp.{target}", "TLSA", record)
        server = stack.enter_context(ProsodyServer(
            [VirtualHost(domain, cert=cert, users={USER: PASSWORD})], mode="peer", address=IP,
            s2s_port=port, ca_file=ca_file, dns=validating, workdir=workdir / domain))
        peers.append(Peer(domain, server, f"_{port}._tcp.{target}. TLSA {record}", about))
    return World(workdir, dns, ca_file, backend, relay, proxy, config, metrics, peers)


def decision_line(world: World, domain: str) -> str:
    """The proxy's own decision line for `domain`, as it logged it."""
    world.proxy.wait_for_decision(domain, timeout=SEND_TIMEOUT)
    for line in world.proxy.log.lines():
        if "event=decision" in line and f"domain={domain} " in line:
            return line
    raise RuntimeError(f"no decision line for {domain}")


def backend_received(world: World, domain: str) -> bytes:
    """Everything the proxy sent the backend on streams from `domain`."""
    header = re.compile(rb"<stream:stream\b[^>]*\sfrom=['\"]" + re.escape(domain.encode()) + rb"['\"]")
    return b"".join(bytes(c.upstream) for c in world.relay.snapshot() if header.search(bytes(c.upstream)))


def send(world: World, peer: Peer, index: int) -> bool:
    """Send one message from `peer` to the backend and print what happened; True if delivered."""
    sender = peer.server.account(f"{USER}@{peer.domain}", PASSWORD)
    recipient = world.backend.account(f"{USER}@{HOME}", PASSWORD)
    body = f"hello from {peer.domain}"
    say(f"[{index}] {sender.jid} -> {recipient.jid}: {body!r}")
    try:
        deliver_message(sender, recipient, body, timeout=SEND_TIMEOUT)
        delivered, outcome = True, f"delivered: {recipient.jid} received {body!r}"
    except XmppError as exc:
        got = backend_received(world, peer.domain)
        what = ("nothing" if not got else "the stream header only" if b"<message" not in got
                and b"db:result" not in got else "more than the header (!)")
        delivered = False
        outcome = (f"NOT delivered: the backend was sent {what} (no dialback key, no message); "
                   f"the sender got an error bounce (Prosody's condition: {_condition(str(exc))})")
    say(f"    decision: {decision_line(world, peer.domain)}")
    say(f"    backend:  {outcome}")
    say()
    return delivered


def _condition(text: str) -> str:
    m = re.search(r"<([a-z-]+) xmlns=['\"]urn:ietf:params:xml:ns:xmpp-stanzas['\"]", text)
    return m.group(1) if m else "error"


def banner(world: World, *, once: bool) -> None:
    host, port = world.proxy.inbound
    ns = world.dns.resolver_address
    cli = Path(sys.executable).parent / "xmpp-dane-proxy"
    cli = os.path.relpath(cli) if cli.is_relative_to(Path.cwd()) else str(cli)
    say(f"{BANNER}{'' if once else ' (the world keeps running until Ctrl-C)'}:")
    say(f"  {cli} check {GOOD} --nameserver {ns}")
    say(f"  {cli} check {BAD} --nameserver {ns}")
    bad_chain = world.dir / BAD / "certs" / f"{BAD}.crt"    # what that peer presented (Prosody's file)
    say(f"  {cli} check {BAD} --inbound --cert {bad_chain} --nameserver {ns}")
    say(f"  openssl s_client -starttls xmpp-server -connect {host}:{port} -xmpphost {HOME} "
        f"-CAfile {world.ca_file}")
    say(f"  curl -s http://{world.metrics}/metrics | grep verdicts_total")
    say(f"  the proxy's configuration: {world.config}")
    say()


def follow_log(world: World) -> int:
    """Show the proxy's new log lines until Ctrl-C (KeyboardInterrupt); 1 if the proxy died."""
    say("The proxy's log (Ctrl-C stops the demo):")
    offset = world.proxy.log_path.stat().st_size
    while True:
        with open(world.proxy.log_path, "rb") as f:
            f.seek(offset)
            new = f.read()
        offset += len(new)
        if new:
            sys.stdout.write(new.decode(errors="replace"))
            sys.stdout.flush()
        if world.proxy.process is None or world.proxy.process.poll() is not None:
            say("xmpp-dane-proxy demo: the proxy exited; stopping")
            return 1
        time.sleep(LOG_POLL_SECONDS)   # a display refresh interval, not synchronisation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--once", action="store_true", help="stop after the two messages and the banner")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    args = parser.parse_args(argv)
    # Ctrl-C and SIGTERM end the demo through the same clean-up (SIGINT explicitly: a shell
    # that starts us in the background would have it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="xmpp-dane-proxy-demo-"))
    say("xmpp-dane-proxy demo: a signed zone, a validating resolver, a backend, the proxy and two peers,")
    say(f"all on {IP} (nothing leaves this machine; files in {workdir})")
    try:
        with ExitStack() as stack:
            world = build_world(stack, workdir)
            host, port = world.proxy.inbound
            say(f"  DNS      nsd (zone test., signed at start) + unbound validating it at {world.dns.resolver_address}")
            say(f"  backend  Prosody for {HOME} (plaintext S2S {world.backend.s2s_port}, no DANE of its own)")
            say(f"  proxy    xmpp-dane-proxy on {host}:{port}, SRV _xmpp-server._tcp.{HOME} points here")
            for p in world.peers:
                say(f"  peer     Prosody for {p.domain}: {p.about}")
                say(f"           {p.tlsa}")
            say(f"  ready in {time.monotonic() - started:.1f} s")
            say()
            outcomes = [send(world, peer, i) for i, peer in enumerate(world.peers, 1)]
            ok = outcomes == [True, False]
            if not ok:
                say("xmpp-dane-proxy demo: UNEXPECTED outcome (see the decision lines above)")
            banner(world, once=args.once)
            if args.once:
                return 0 if ok else 1
            return follow_log(world) or (0 if ok else 1)
    except KeyboardInterrupt:
        say("\nxmpp-dane-proxy demo: stopped; everything it started is gone")
        return 0
    finally:
        if args.keep:
            say(f"xmpp-dane-proxy demo: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
