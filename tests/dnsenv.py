"""A real DNSSEC test hierarchy: zones signed here with dnspython, served by nsd, validated by
unbound, all on loopback (DESIGN §7).

Layout (keys generated fresh for every environment):

    .                signed; its DS is unbound's trust anchor (so `dns.probe = "."` validates,
                     as with a real resolver); it delegates test. with a DS
    test.            signed; its DS is also `trust_anchor_text` (libunbound in Prosody tests)
    secure.test.     signed, DS in test.            -> answers come back with AD (secure)
    insecure.test.   unsigned, delegated without DS -> answers without AD (insecure)
    bogus.test.      signed, DS in test. matches a key the zone does not have -> SERVFAIL (bogus)

Any name can be published into any zone after start (`publish`, `publish_xmpp`); the zone is
re-signed, nsd reloads it, and unbound's cache for that zone is flushed, so the next query sees
the new data.  `publish(..., broken_signature=True)` corrupts the RRSIGs of one RRset in a
signed zone, for a bogus RRset inside an otherwise secure zone.  `blackhole` is the address of a
"resolver" that never answers (a UDP socket nobody reads and a TCP listener nobody accepts), for
the `timeout` status.  `nonvalidating_address` starts (on first use) a second unbound over the
same zones with validation off — a resolver that never sets AD, for `dns.probe` tests — and
`stop_validating_resolver()`/`start_validating_resolver()` take the validating one away and back
(a resolver outage).

A TLSA record that dnspython would refuse (a digest of the wrong length) is published with
`malformed_tlsa(usage, selector, mtype, data)`: it writes RFC 3597 generic rdata, which nsd
serves and unbound validates like any other record.

Use the session fixture `dns_env` in pytest, or `with dns_environment() as env:` anywhere else
(e.g. a benchmark).  Both stop nsd and unbound (whole process groups) on the way out, also when
the test fails.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import dns.dnssec
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.RRSIG
import dns.rrset
import dns.zone
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

try:  # pytest is only needed for the fixture; the demo (scripts/demo.py) runs without it.
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

from policy.tlsa import record_for

DNS_ROOT = "."
ROOT_ZONE = "test"
REFUSED_ZONE = "refused.test"
SECURE_ZONE = "secure.test"
INSECURE_ZONE = "insecure.test"
BOGUS_ZONE = "bogus.test"

NS_HOST = "ns.test."
DEFAULT_TTL = 300
# Negative answers are cached for the SOA minimum (RFC 2308 §5); short, though every publish
# flushes unbound's cache of the zone anyway.
SOA_MINIMUM = 60
READY_TIMEOUT = 15.0   # seconds for nsd/unbound to answer after start (normally < 1 s)
RELOAD_TIMEOUT = 10.0  # seconds for a re-signed zone to be served after a publish
PROBE_TIMEOUT = 0.05   # one readiness query; retried until the deadline
REFLUSH_INTERVAL = 0.5  # flush a zone again when unbound still serves its old serial after this
POLL_INTERVAL = 0.01   # between readiness probes (polling a real query, not a sleep in lieu)

_ALGORITHM = dns.dnssec.Algorithm.ECDSAP256SHA256  # fast to generate and sign; unbound supports it


class DnsEnvError(RuntimeError):
    """The test DNS environment could not start or apply a change; the message says why."""


# ---------------------------------------------------------------------------------------------
# Small helpers


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (nsd and unbound listen on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise DnsEnvError("no free UDP+TCP port on 127.0.0.1")


def tlsa_text(cert: x509.Certificate, usage: int = 3, selector: int = 1, mtype: int = 1) -> str:
    """TLSA rdata text ("U S M HEX") for a certificate (RFC 6698 §2.1)."""
    return str(record_for(cert, usage, selector, mtype))


def _abs(name: str) -> dns.name.Name:
    return dns.name.from_text(name.rstrip(".") + ".").canonicalize()


def _new_key(flags: int = 257) -> tuple[ec.EllipticCurvePrivateKey, dns.rdata.Rdata]:
    private = ec.generate_private_key(ec.SECP256R1())
    return private, dns.dnssec.make_dnskey(private.public_key(), _ALGORITHM, flags=flags)


@dataclass
class _Zone:
    """The unsigned content of one zone, signed and written anew on every change."""

    origin: dns.name.Name
    signed: bool
    key: tuple | None = None
    rrsets: dict[tuple[dns.name.Name, int], tuple[int, list[str]]] = field(default_factory=dict)
    broken: set[tuple[dns.name.Name, int]] = field(default_factory=set)
    serial: int = 1

    @property
    def text(self) -> str:
        return self.origin.to_text(omit_final_dot=True)

    @property
    def file_name(self) -> str:
        return "root.zone" if self.origin == dns.name.root else f"{self.text}.zone"

    def render(self) -> dns.zone.Zone:
        zone = dns.zone.Zone(self.origin, relativize=False)
        with zone.writer() as txn:
            soa = dns.rdata.from_text(
                dns.rdataclass.IN, dns.rdatatype.SOA,
                f"{NS_HOST} hostmaster.test. {self.serial} 3600 600 86400 {SOA_MINIMUM}",
            )
            txn.add(self.origin, SOA_MINIMUM, soa)
            for (name, rdtype), (ttl, texts) in self.rrsets.items():
                rdatas = [_rdata(rdtype, t, self.origin) for t in texts]
                txn.add(dns.rrset.from_rdata_list(name, ttl, rdatas))
        if self.signed:
            now = _dt.datetime.now(_dt.timezone.utc)
            dns.dnssec.sign_zone(
                zone, keys=[self.key],
                inception=now - _dt.timedelta(days=1), expiration=now + _dt.timedelta(days=30),
            )
            for name, rdtype in self.broken:
                _corrupt_signatures(zone, name, rdtype)
        return zone


def _rdata(rdtype: int, text: str, origin: dns.name.Name) -> dns.rdata.Rdata:
    # RFC 3597 generic form ("\\# LEN HEX") is kept as raw bytes, so a record dnspython's
    # type-specific parser would refuse (a malformed TLSA) can still be signed and served.
    if text.startswith("\\#"):
        _, _length, *hexdata = text.split()
        return dns.rdata.GenericRdata(dns.rdataclass.IN, rdtype, bytes.fromhex("".join(hexdata)))
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, text, origin=origin)


def malformed_tlsa(usage: int, selector: int, mtype: int, data: bytes) -> str:
    """TLSA rdata in RFC 3597 generic form, for records whose data does not fit the matching
    type (e.g. 20 bytes for SHA2-256): publishable with `DnsEnv.publish`."""
    raw = bytes((usage, selector, mtype)) + data
    return f"\\# {len(raw)} {raw.hex()}"


def _corrupt_signatures(zone: dns.zone.Zone, name: dns.name.Name, rdtype: int) -> None:
    """Flip bits in the RRSIGs covering name/rdtype: the data stays, the proof breaks."""
    node = zone.get_node(name)
    if node is None:
        return
    rrsigs = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.RRSIG, covers=rdtype)
    if rrsigs is None:
        return
    broken = [r.replace(signature=bytes(b ^ 0x5A for b in r.signature)) for r in rrsigs]
    node.replace_rdataset(dns.rrset.from_rdata_list(name, rrsigs.ttl, broken).to_rdataset())


def _tool(name: str) -> str:
    """Full path of an nsd/unbound program (Debian puts them in /usr/sbin, which a non-root
    PATH may lack)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise DnsEnvError(f"{name} not found: apt-get install nsd unbound")
    return found


def _die_with_parent() -> None:
    """Runs in the child before exec: Linux PR_SET_PDEATHSIG, so that a test run killed
    outright (SIGKILL, CI timeout) still takes nsd and unbound down with it.  Tied to the
    thread that starts the environment: start it from a thread that outlives it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _spawn(argv: list[str], stderr_path: Path) -> subprocess.Popen:
    with open(stderr_path, "wb") as stderr:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True,  # own process group: stopped as a whole, see _kill_group
            preexec_fn=_die_with_parent,
        )


def _kill_group(proc: subprocess.Popen | None) -> None:
    """Stop a process started with start_new_session=True and everything it forked."""
    if proc is None:
        return
    pgid = proc.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        proc.wait(timeout=5)
    # nsd forks helpers (xfrd, server); make sure none outlives its parent.  Orphans that
    # already exited stay zombies until PID 1 reaps them: those are dead and do not count.
    deadline = time.monotonic() + 5
    while _live_members(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise DnsEnvError(f"processes of group {pgid} survive SIGKILL: {_live_members(pgid)}")
        time.sleep(POLL_INTERVAL)  # polling for the kernel to finish them, bounded by the deadline


def _live_members(pgid: int) -> list[int]:
    """PIDs in process group `pgid` that are not zombies (Linux /proc)."""
    live = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..." — comm may contain spaces, so split after ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(entry.name))
    return live


# ---------------------------------------------------------------------------------------------
# The environment


class DnsEnv:
    """nsd + unbound + signed zones in a temporary directory.  See the module docstring."""

    root = ROOT_ZONE
    secure = SECURE_ZONE
    insecure = INSECURE_ZONE
    bogus = BOGUS_ZONE

    def __init__(self, directory: Path | None = None) -> None:
        self._own_dir = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix="dnsenv-"))
        self.nsd_port = 0
        self.unbound_port = 0
        self.startup_seconds = 0.0
        self._nsd: subprocess.Popen | None = None
        self._unbound: subprocess.Popen | None = None
        self._plain: subprocess.Popen | None = None
        self._plain_port = 0
        self._blackhole_socks: list[socket.socket] = []
        self._counter = itertools.count(1)
        self._zones: dict[dns.name.Name, _Zone] = {}
        self._dirty: set[dns.name.Name] = set()
        self._batch_depth = 0
        self._mtime_ns = 0
        self.blackhole = ""

    # -- addresses ---------------------------------------------------------------------------

    @property
    def resolver_address(self) -> str:
        """The validating resolver as "127.0.0.1:PORT" (a `dns.nameservers` entry)."""
        return f"127.0.0.1:{self.unbound_port}"

    @property
    def nsd_address(self) -> str:
        """The authoritative server (no validation, never sets AD)."""
        return f"127.0.0.1:{self.nsd_port}"

    def resolver(self, **kwargs):
        """A `policy.dns.Resolver` pointed at this environment's unbound."""
        from policy.dns import Resolver

        kwargs.setdefault("timeout", 3.0)
        return Resolver([self.resolver_address], **kwargs)

    def fresh(self, zone: str, prefix: str = "d") -> str:
        """A name in `zone` that no test has used yet (so no cache anywhere knows it)."""
        return f"{prefix}{next(self._counter)}.{zone.rstrip('.')}"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "DnsEnv":
        started = time.monotonic()
        for tool in ("nsd", "unbound", "nsd-control", "unbound-control", "unbound-checkconf"):
            _tool(tool)  # fail early, with the install command, if one is missing
        try:
            self._build_zones()
            self._write_all_zones()
            self._with_port_retry("nsd", self._start_nsd)
            self._with_port_retry("unbound", self._start_unbound)
            self._start_blackhole()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        """Stop both daemons (whole process groups) and remove the directory (kept, with the
        logs, when DNSENV_KEEP is set in the environment)."""
        for sock in self._blackhole_socks:
            sock.close()
        self._blackhole_socks.clear()
        try:
            _kill_group(self._plain)
            _kill_group(self._unbound)
        finally:
            self._plain = None
            self._unbound = None
            try:
                _kill_group(self._nsd)
            finally:
                self._nsd = None
        if self._own_dir and not os.environ.get("DNSENV_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "DnsEnv":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- zones -------------------------------------------------------------------------------

    def _build_zones(self) -> None:
        top = _Zone(dns.name.root, signed=True, key=_new_key())
        root = _Zone(_abs(ROOT_ZONE), signed=True, key=_new_key())
        secure = _Zone(_abs(SECURE_ZONE), signed=True, key=_new_key())
        insecure = _Zone(_abs(INSECURE_ZONE), signed=False)
        bogus = _Zone(_abs(BOGUS_ZONE), signed=True, key=_new_key())
        stray_private, stray_dnskey = _new_key()  # its DS goes into test., the key nowhere
        for zone in (top, root, secure, insecure, bogus):
            zone.rrsets[(zone.origin, dns.rdatatype.NS)] = (DEFAULT_TTL, [NS_HOST])
            self._zones[zone.origin] = zone
        top.rrsets[(root.origin, dns.rdatatype.NS)] = (DEFAULT_TTL, [NS_HOST])
        top.rrsets[(root.origin, dns.rdatatype.DS)] = (
            DEFAULT_TTL, [dns.dnssec.make_ds(root.origin, root.key[1], "SHA256").to_text()]
        )
        root.rrsets[(_abs(NS_HOST), dns.rdatatype.A)] = (DEFAULT_TTL, ["127.0.0.1"])
        for child in (secure, insecure, bogus):
            root.rrsets[(child.origin, dns.rdatatype.NS)] = (DEFAULT_TTL, [NS_HOST])
        root.rrsets[(secure.origin, dns.rdatatype.DS)] = (
            DEFAULT_TTL, [dns.dnssec.make_ds(secure.origin, secure.key[1], "SHA256").to_text()]
        )
        # bogus.test: a DS that matches no DNSKEY of the zone breaks the chain of trust.
        root.rrsets[(bogus.origin, dns.rdatatype.DS)] = (
            DEFAULT_TTL, [dns.dnssec.make_ds(bogus.origin, stray_dnskey, "SHA256").to_text()]
        )
        self.trust_anchor = dns.dnssec.make_ds(root.origin, root.key[1], "SHA256")
        self.root_trust_anchor = dns.dnssec.make_ds(top.origin, top.key[1], "SHA256")

    def _zone_for(self, name: dns.name.Name) -> _Zone:
        best = None
        for origin, zone in self._zones.items():
            if name.is_subdomain(origin) and (best is None or len(origin) > len(best.origin)):
                best = zone
        if best is None:
            raise DnsEnvError(f"{name} is in none of the test zones {sorted(map(str, self._zones))}")
        return best

    def _resolve_name(self, zone: str | None, name: str) -> tuple[_Zone, dns.name.Name]:
        if zone is None:
            absolute = _abs(name)
            return self._zone_for(absolute), absolute
        origin = _abs(zone)
        if origin not in self._zones:
            raise DnsEnvError(f"unknown test zone {zone!r}")
        if name in ("@", ""):
            absolute = origin
        else:
            candidate = _abs(name)
            absolute = candidate if candidate.is_subdomain(origin) else (
                dns.name.from_text(name.rstrip("."), origin=origin).canonicalize()
            )
        zone_obj = self._zone_for(absolute)
        if zone_obj.origin != origin:
            raise DnsEnvError(f"{absolute} belongs to zone {zone_obj.origin}, not {origin}")
        return zone_obj, absolute

    def _write_zone(self, zone: _Zone) -> None:
        path = self.dir / zone.file_name
        tmp = path.with_suffix(".tmp")
        zone.render().to_file(str(tmp), relativize=False)
        # nsd decides by mtime whether a zone file changed; make every write strictly newer,
        # by at least a second, so even second-granular comparisons see it.
        self._mtime_ns = max(time.time_ns(), self._mtime_ns + 1_000_000_000)
        os.utime(tmp, ns=(self._mtime_ns, self._mtime_ns))
        os.replace(tmp, path)

    def _write_all_zones(self) -> None:
        for zone in self._zones.values():
            self._write_zone(zone)

    # -- publishing --------------------------------------------------------------------------

    def publish(
        self,
        zone: str | None,
        name: str,
        rdtype: str,
        *rdata: str,
        ttl: int = DEFAULT_TTL,
        broken_signature: bool = False,
        append: bool = False,
    ) -> str:
        """Set the RRset name/rdtype in `zone` (None: the zone the name falls in) to `rdata`.

        `name` is absolute ("x.secure.test") or relative to `zone` ("x", "@").  With no rdata
        the RRset is removed; `append=True` adds to an existing RRset instead of replacing it.
        Returns the absolute name (no trailing dot).  Visible through unbound when this
        returns (outside a `batch()`).
        """
        zone_obj, absolute = self._resolve_name(zone, name)
        key = (absolute, dns.rdatatype.from_text(rdtype))
        if rdata and append and key in zone_obj.rrsets:
            old = zone_obj.rrsets[key][1]
            zone_obj.rrsets[key] = (ttl, old + [r for r in rdata if r not in old])
        elif rdata:
            zone_obj.rrsets[key] = (ttl, list(rdata))
        else:
            zone_obj.rrsets.pop(key, None)
        if broken_signature:
            if not zone_obj.signed:
                raise DnsEnvError(f"{zone_obj.text} is unsigned: no signature to break")
            zone_obj.broken.add(key)
        else:
            zone_obj.broken.discard(key)
        self._dirty.add(zone_obj.origin)
        if self._batch_depth == 0:
            self.commit()
        return absolute.to_text(omit_final_dot=True)

    def remove(self, zone: str | None, name: str, rdtype: str) -> None:
        """Delete one RRset."""
        self.publish(zone, name, rdtype)

    @contextlib.contextmanager
    def batch(self) -> Iterator["DnsEnv"]:
        """Group several publishes into one re-sign/reload (faster)."""
        self._batch_depth += 1
        try:
            yield self
        finally:
            self._batch_depth -= 1
        if self._batch_depth == 0:
            self.commit()

    def publish_xmpp(
        self,
        domain: str,
        target_host: str | None,
        port: int,
        ip: str,
        cert: x509.Certificate | None,
        *usages: str | tuple[int, int, int],
        direct_tls: bool = False,
        priority: int = 0,
        weight: int = 0,
        ttl: int = DEFAULT_TTL,
    ) -> None:
        """Publish an XMPP server for `domain`: SRV -> target (added to the domain's SRV RRset,
        so several calls give several targets), A for the target, TLSA at `_PORT._tcp.TARGET`
        for `cert` (default usage "3 1 1").

        `target_host=None` publishes no SRV: A at the domain itself and TLSA at
        `_PORT._tcp.DOMAIN` (the no-SRV fallback).  `cert=None` publishes no TLSA.
        """
        host = (target_host or domain).rstrip(".")
        service = "_xmpps-server._tcp" if direct_tls else "_xmpp-server._tcp"
        with self.batch():
            if target_host is not None:
                self.publish(None, f"{service}.{domain}", "SRV",
                             f"{priority} {weight} {port} {host}.", ttl=ttl, append=True)
            self.publish(None, host, "A", ip, ttl=ttl)
            if cert is not None:
                records = [
                    tlsa_text(cert, *((int(x) for x in u.split()) if isinstance(u, str) else u))
                    for u in (usages or ("3 1 1",))
                ]
                self.publish(None, f"_{port}._tcp.{host}", "TLSA", *records, ttl=ttl)

    def commit(self) -> None:
        """Re-sign and reload every changed zone, then make unbound forget what it had."""
        dirty = [self._zones[o] for o in sorted(self._dirty)]
        self._dirty.clear()
        if not dirty or self._nsd is None:
            return
        for zone in dirty:
            zone.serial += 1
            self._write_zone(zone)
            self._control("nsd-control", self.dir / "nsd.conf", "reload", zone.origin.to_text())
        deadline = time.monotonic() + RELOAD_TIMEOUT
        for zone in dirty:
            while self._serial_at(self.nsd_port, zone.origin) != zone.serial:
                self._check_alive()
                if time.monotonic() > deadline:
                    raise DnsEnvError(f"nsd did not load serial {zone.serial} of {zone.text}; "
                                      f"see {self.dir / 'nsd.log'}")
                time.sleep(POLL_INTERVAL)
        if self._unbound is None:
            return  # the validating resolver is stopped; it starts with an empty cache
        for zone in dirty:
            self._control("unbound-control", self.dir / "unbound.conf", "flush_zone", zone.origin.to_text())
        self._control("unbound-control", self.dir / "unbound.conf", "flush_bogus")
        self._control("unbound-control", self.dir / "unbound.conf", "flush_negative")
        for zone in dirty:
            if zone.origin == _abs(BOGUS_ZONE):
                continue  # unbound answers SERVFAIL there by design
            reflush = time.monotonic() + REFLUSH_INTERVAL
            while self._serial_at(self.unbound_port, zone.origin) != zone.serial:
                self._check_alive()
                now = time.monotonic()
                if now > deadline:
                    raise DnsEnvError(f"unbound does not see serial {zone.serial} of {zone.text}; "
                                      f"see {self.dir / 'unbound.log'}")
                if now > reflush:
                    # A lookup by a server under test that was already on its way to nsd when we
                    # flushed can bring the old zone back into unbound's cache for its TTL: flush
                    # again (seen once under load as a publish that never became visible).
                    self._control("unbound-control", self.dir / "unbound.conf", "flush_zone",
                                  zone.origin.to_text())
                    reflush = now + REFLUSH_INTERVAL
                time.sleep(POLL_INTERVAL)

    def _control(self, tool: str, conf: Path, *args: str) -> None:
        result = subprocess.run(
            [_tool(tool), "-c", str(conf), *args], capture_output=True, text=True, timeout=10
        )
        if result.returncode != 0 or "error" in result.stdout.lower():
            raise DnsEnvError(f"{tool} {' '.join(args)} failed: {result.stdout}{result.stderr}")

    # -- queries (synchronous, for readiness checks and debugging) ---------------------------

    def query(
        self, name: str, rdtype: str, *, via: str = "unbound", timeout: float = 1.0, port: int = 0,
    ) -> dns.message.Message:
        """Ask unbound (default), nsd, or any `port` on 127.0.0.1 directly; DO bit set."""
        port = port or (self.unbound_port if via == "unbound" else self.nsd_port)
        q = dns.message.make_query(name, rdtype, want_dnssec=True, flags=dns.flags.RD | dns.flags.AD)
        return dns.query.udp(q, "127.0.0.1", port=port, timeout=timeout)

    def _serial_at(self, port: int, origin: dns.name.Name) -> int | None:
        q = dns.message.make_query(origin, dns.rdatatype.SOA, want_dnssec=True,
                                   flags=dns.flags.RD | dns.flags.AD)
        try:
            # Short: on loopback an answer takes well under a millisecond, and a probe sent
            # before the server has bound its socket is simply lost.
            r = dns.query.udp(q, "127.0.0.1", port=port, timeout=PROBE_TIMEOUT)
        except (dns.exception.Timeout, OSError):
            return None
        for rrset in r.answer:
            if rrset.rdtype == dns.rdatatype.SOA:
                return rrset[0].serial
        return None

    # -- processes ---------------------------------------------------------------------------

    def _check_alive(self) -> None:
        for name, proc in (("nsd", self._nsd), ("unbound", self._unbound), ("unbound-plain", self._plain)):
            if proc is not None and proc.poll() is not None:
                text = "".join(
                    path.read_text(errors="replace")[-2000:]
                    for path in (self.dir / f"{name}.log", self.dir / f"{name}.stderr")
                    if path.exists()
                )
                raise DnsEnvError(f"{name} exited with {proc.returncode}:\n{text}")

    def _wait_ready(self, what: str, probe) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not probe():
            self._check_alive()
            if time.monotonic() > deadline:
                raise DnsEnvError(f"{what} did not answer within {READY_TIMEOUT}s; see {self.dir}")
            time.sleep(POLL_INTERVAL)

    def _with_port_retry(self, name: str, start) -> None:
        """free_port() can race with another process taking the port before the daemon binds
        it; then the daemon exits at once and a fresh port is tried (at most 3 times)."""
        for attempt in range(3):
            try:
                start()
                return
            except DnsEnvError:
                proc = self._nsd if name == "nsd" else self._unbound
                if attempt == 2 or proc is None or proc.poll() is None:
                    raise
                _kill_group(proc)

    def _start_nsd(self) -> None:
        self.nsd_port = free_port()
        (self.dir / "xfr").mkdir(exist_ok=True)
        zones = "".join(
            f'zone:\n    name: "{z.origin}"\n    zonefile: "{z.file_name}"\n'
            for z in self._zones.values()
        )
        conf = self.dir / "nsd.conf"
        conf.write_text(f"""\
server:
    ip-address: 127.0.0.1@{self.nsd_port}
    port: {self.nsd_port}
    do-ip6: no
    server-count: 1
    reuseport: no
    username: ""
    chroot: ""
    zonesdir: "{self.dir}"
    database: ""
    zonelistfile: "{self.dir}/zone.list"
    xfrdfile: "{self.dir}/xfrd.state"
    xfrdir: "{self.dir}/xfr"
    pidfile: "{self.dir}/nsd.pid"
    logfile: "{self.dir}/nsd.log"
    verbosity: 1
    hide-version: yes
remote-control:
    control-enable: yes
    control-interface: "{self.dir}/nsd.ctl"
{zones}""")
        self._nsd = _spawn([_tool("nsd"), "-d", "-c", str(conf)], self.dir / "nsd.stderr")
        root = self._zones[_abs(ROOT_ZONE)]
        self._wait_ready("nsd", lambda: self._serial_at(self.nsd_port, root.origin) == root.serial)

    def _unbound_conf(self, name: str, port: int, *, validating: bool) -> Path:
        """Write unbound's config: stubs for every test zone at nsd; validation from the
        root trust anchor, or (validating=False) an iterator alone that never sets AD."""
        stubs = "".join(
            f'stub-zone:\n    name: "{z.origin}"\n    stub-addr: 127.0.0.1@{self.nsd_port}\n'
            for z in self._zones.values()
        )
        if validating:
            validation = f"""\
    val-log-level: 2
    module-config: "validator iterator"
    trust-anchor: "{DNS_ROOT} DS {self.root_trust_anchor.to_text()}"
"""
        else:
            # A plain forwarder/recursor without DNSSEC (what dnsmasq or a resolver without a
            # trust anchor is): answers everything, never AD.  No cache, so every publish is
            # seen at once without a flush.
            validation = """\
    module-config: "iterator"
    cache-max-ttl: 0
    cache-max-negative-ttl: 0
"""
        conf = self.dir / f"{name}.conf"
        conf.write_text(f"""\
server:
    interface: 127.0.0.1@{port}
    port: {port}
    do-ip4: yes
    do-ip6: no
    do-udp: yes
    do-tcp: yes
    access-control: 127.0.0.0/8 allow
    num-threads: 1
    so-reuseport: no
    username: ""
    chroot: ""
    directory: "{self.dir}"
    pidfile: "{self.dir}/{name}.pid"
    use-syslog: no
    logfile: "{self.dir}/{name}.log"
    verbosity: 1
    log-servfail: yes
    ede: yes
{validation}\
    # nsd runs on loopback; unbound refuses to query 127.0.0.0/8 unless told otherwise.
    do-not-query-localhost: no
    # unbound ships "test." as a blocked special-use name (RFC 6761); serve it normally.
    local-zone: "test." transparent
    # One name the resolver refuses (REFUSED, for the "bogus" of a non-NOERROR answer).
    local-zone: "{REFUSED_ZONE}." refuse
    # The root is a stub at nsd too, so nothing is ever resolved outside loopback.
    outgoing-interface: 127.0.0.1
    # New names are published while unbound runs; never synthesise NXDOMAIN from old NSECs.
    aggressive-nsec: no
    qname-minimisation: no
    prefetch: no
remote-control:
    control-enable: yes
    control-interface: "{self.dir}/{name}.ctl"
    control-use-cert: no
{stubs}""")
        check = subprocess.run([_tool("unbound-checkconf"), str(conf)], capture_output=True, text=True)
        if check.returncode != 0:
            raise DnsEnvError(f"unbound-checkconf: {check.stdout}{check.stderr}")
        return conf

    def _start_unbound(self, port: int = 0) -> None:
        self.unbound_port = port or free_port()
        conf = self._unbound_conf("unbound", self.unbound_port, validating=True)
        self._unbound = _spawn([_tool("unbound"), "-d", "-c", str(conf)], self.dir / "unbound.stderr")

        def validated() -> bool:
            try:
                r = self.query(DNS_ROOT, "SOA", timeout=PROBE_TIMEOUT)
            except (dns.exception.Timeout, OSError):
                return False
            return r.rcode() == dns.rcode.NOERROR and bool(r.flags & dns.flags.AD)

        self._wait_ready("unbound", validated)

    def stop_validating_resolver(self) -> None:
        """Take the validating unbound away (a resolver outage): its port stops answering
        (ICMP unreachable) until `start_validating_resolver()`."""
        _kill_group(self._unbound)
        self._unbound = None

    def start_validating_resolver(self) -> None:
        """Bring the validating unbound back on the same port (with an empty cache)."""
        if self._unbound is None:
            self._start_unbound(self.unbound_port)

    @property
    def nonvalidating_address(self) -> str:
        """A resolver over the same zones that never validates (never sets AD), as
        "127.0.0.1:PORT"; started on first use, stopped with the environment."""
        if self._plain is None:
            port = free_port()
            conf = self._unbound_conf("unbound-plain", port, validating=False)
            self._plain = _spawn([_tool("unbound"), "-d", "-c", str(conf)], self.dir / "unbound-plain.stderr")
            self._plain_port = port

            def answers() -> bool:
                try:
                    r = self.query(ROOT_ZONE + ".", "SOA", port=port, timeout=PROBE_TIMEOUT)
                except (dns.exception.Timeout, OSError):
                    return False
                return r.rcode() == dns.rcode.NOERROR

            self._wait_ready("unbound (non-validating)", answers)
        return f"127.0.0.1:{self._plain_port}"

    @property
    def trust_anchor_text(self) -> str:
        """The DS of `test.` as unbound's trust-anchor line."""
        return f"{ROOT_ZONE}. DS {self.trust_anchor.to_text()}"

    def _start_blackhole(self) -> None:
        """A resolver address that never answers: UDP is bound but unread, TCP listens but
        never accepts (connections sit in the backlog)."""
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            self._blackhole_socks += [udp, tcp]
            self.blackhole = f"127.0.0.1:{port}"
            return
        raise DnsEnvError("no free port for the blackhole resolver")


@contextlib.contextmanager
def dns_environment(directory: Path | None = None) -> Iterator[DnsEnv]:
    """Start nsd + unbound with freshly signed zones; stop them on exit (also on error)."""
    env = DnsEnv(directory)
    env.start()
    try:
        yield env
    finally:
        env.stop()


if pytest is not None:

    @pytest.fixture(scope="session")
    def dns_env() -> Iterator[DnsEnv]:
        """Session-wide test DNS (nsd + validating unbound).  Tests publish under fresh names
        (`dns_env.fresh(zone)`) so they never see each other's data."""
        with dns_environment() as env:
            yield env
