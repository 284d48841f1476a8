"""Real Prosody servers (Debian's 0.12.x package) on loopback, for end-to-end tests.

`ProsodyServer` writes a self-contained config into a temporary directory (data, pid file,
certificates, debug log all live there), starts `prosody --config FILE -F` in its own
process group, waits until every listening port accepts connections, and kills the whole
group on exit, also when the test fails.  `prosody_factory` is the same as a pytest fixture.

Two shapes are prepared, because the proxy needs Prosody in both roles (DESIGN §3):

* ``mode="backend"`` — the legacy server behind the proxy: plaintext S2S allowed
  (`s2s_require_encryption = false`), peers authenticated by dialback
  (`s2s_secure_auth = false`).
* ``mode="peer"`` — a modern remote server: STARTTLS required, a certificate from the test
  PKI per host, the test CA trusted (`ssl = { cafile = ... }`), certificate-based S2S
  authentication required by default, optionally `use_dane = true`.

Outgoing S2S of Prosody 0.12 resolves peers with its in-process libunbound (net.unbound).
`ProsodyDns` configures it: either forward to a test resolver (`forward = "IP@PORT"`, with a
trust anchor file so that answers can be secure, and `test.` made transparent), or, without
any resolver process, answer from libunbound's own local data (`ProsodyDns.routes`: an SRV
record per peer domain plus a hosts file for the addresses).  Nothing is ever sent to a
resolver off this machine: without `forward`, libunbound forwards to a dead loopback port
instead of recursing from the root servers.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

try:  # pytest is only needed for the fixture; the harness itself runs without it.
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

from pki import Issued
from serverproc import ServerProcess, server_factory
from xmppclient import Account

PROSODY = shutil.which("prosody") or "/usr/bin/prosody"
PROSODYCTL = shutil.which("prosodyctl") or "/usr/bin/prosodyctl"

# Modules for a small but realistic server.  presence/message/iq/offline/c2s/s2s/
# s2s_auth_certs are loaded by Prosody itself (modulemanager's autoload list).
BASE_MODULES = ("roster", "saslauth", "dialback", "disco", "ping")
# mod_tls is added only when some host has a certificate: without one, Prosody 0.12 still
# offers STARTTLS ("SNI will be required") and its outgoing S2S takes up a peer's offer,
# and the handshake then fails — a plaintext backend must not load it.

# Long enough for a loaded CI machine; Prosody itself listens within ~0.05 s.
STARTUP_TIMEOUT = 15.0
# Without mod_posix Prosody installs no SIGTERM handler, so SIGTERM ends it at once; should a
# test enable mod_posix, its graceful shutdown waits up to s2s_close_timeout + 1 s for peers,
# and the group is SIGKILLed after this.
STOP_TIMEOUT = 3.0


class ProsodyError(RuntimeError):
    """Prosody could not be configured, started or driven; the message says why."""


def _require_lua_unbound() -> None:
    # Debian's prosody only *recommends* lua-unbound; without it Prosody silently falls back
    # to its pure-Lua net.dns, which ignores the `unbound` table (and so ProsodyDns).
    if not any(Path(p).glob("*/lua/5.4/lunbound.so") for p in ("/usr/lib", "/usr/local/lib")) and not any(
        Path(p).glob("lua/5.4/lunbound.so") for p in ("/usr/lib", "/usr/local/lib")
    ):
        raise ProsodyError("lua-unbound (lunbound.so for Lua 5.4) not found: apt-get install lua-unbound")


_handed_out: set[int] = set()


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port that was free on `address` a moment ago (bind port 0, read it, close).

    Never the same port twice in one test process, so ports picked in a row for several
    servers cannot collide with each other before any of them binds.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
            s.bind((address, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise ProsodyError(f"no fresh free port on {address}")


def lua_str(value: str | os.PathLike) -> str:
    """A Lua string literal; backslash and double quote escaped, no newlines allowed."""
    text = os.fspath(value)
    if "\n" in text or "\r" in text:
        raise ProsodyError(f"newline in Prosody config string: {text!r}")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def lua_list(values: Iterable[str | os.PathLike]) -> str:
    return "{ " + "; ".join(lua_str(v) for v in values) + " }"


def lua_bool(value: bool) -> str:
    return "true" if value else "false"


@dataclass
class VirtualHost:
    """One `VirtualHost` block.

    `cert` is written to `certs/<domain>.crt` + `.key`, where Prosody's certmanager finds it
    for every service (c2s, s2s in and out); `users` are registered before start.
    """

    domain: str
    cert: Issued | None = None
    users: Mapping[str, str] = field(default_factory=dict)
    extra_config: str = ""


@dataclass
class ProsodyDns:
    """Prosody's `unbound = { ... }` table (libunbound in-process, see net/unbound.lua).

    forward: "IP@PORT" of a test resolver; None forwards to a dead loopback port so that
        libunbound never recurses to the Internet's root servers.
    trust_anchor_file / trust_anchor: a DS/DNSKEY file, or its text (zone-file lines, e.g.
        tests/dnsenv.py's `trust_anchor_text`), written to the work directory.  libunbound
        validates by itself and ignores the forwarder's AD bit: without an anchor nothing
        is ever `secure`, so Prosody's DANE never engages.
    local_zone: e.g. "test. transparent".  libunbound serves `test.` as a static empty zone
        by default (RFC 6761 names), which answers NXDOMAIN before asking a forwarder.
    local_data: at most two RRs in zone-file syntax.  The Lua `options` table maps an option
        name to one string (a list crashes lua-unbound 1.0.0), and libunbound accepts the
        name both with and without the trailing colon: hence two slots, no more.
    hosts: name -> IPv4/IPv6 address, written to a hosts file (`hoststxt`); unlimited.
    """

    forward: str | None = None
    trust_anchor_file: Path | None = None
    trust_anchor: str | None = None
    local_zone: str | None = None
    local_data: tuple[str, ...] = ()
    hosts: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def validating(cls, resolver: str, trust_anchor: str, **kwargs) -> "ProsodyDns":
        """Use a validating test resolver ("IP:PORT", as tests/dnsenv.py's
        `resolver_address`) with the test root's anchor, `test.` made transparent."""
        host, _, port = resolver.rpartition(":")
        if not host or not port.isdigit():
            raise ProsodyError(f"resolver must be IP:PORT, not {resolver!r}")
        kwargs.setdefault("local_zone", "test. transparent")
        return cls(forward=f"{host.strip('[]')}@{port}", trust_anchor=trust_anchor, **kwargs)

    @classmethod
    def routes(cls, routes: Mapping[str, tuple[str, int]], **kwargs) -> "ProsodyDns":
        """Route outgoing S2S for each peer domain to a loopback (address, port).

        Each domain gets `_xmpp-server._tcp.DOMAIN SRV 0 0 PORT DOMAIN.` as local data and
        `ADDRESS DOMAIN` in the hosts file, so Prosody's ordinary SRV → A resolution path
        (net.resolvers.service → basic → net.unbound) is what finds the peer.
        """
        if len(routes) > 2:
            raise ProsodyError("ProsodyDns.routes: libunbound options take at most 2 local-data records")
        local_data = tuple(
            f"_xmpp-server._tcp.{d.rstrip('.')}. 300 IN SRV 0 0 {port} {d.rstrip('.')}."
            for d, (_, port) in routes.items()
        )
        hosts = {d.rstrip("."): addr for d, (addr, _) in routes.items()}
        return cls(local_data=local_data, hosts=hosts, **kwargs)

    def to_lua(self, hosts_file: Path | None, dead_port: int, anchor_file: Path | None = None) -> str:
        if len(self.local_data) > 2:
            raise ProsodyError("ProsodyDns.local_data: at most 2 records (see docstring)")
        lines = ["unbound = {", "\tresolvconf = false;"]
        lines.append(f"\tforward = {lua_str(self.forward or f'127.0.0.1@{dead_port}')};")
        lines.append(f"\thoststxt = {lua_str(hosts_file) if hosts_file else 'false'};")
        trustfile = self.trust_anchor_file or (anchor_file if self.trust_anchor else None)
        if trustfile:
            lines.append(f"\ttrustfile = {lua_str(trustfile)};")
        options = []
        if self.local_zone:
            options.append(f'\t\t["local-zone:"] = {lua_str(self.local_zone)};')
        for key, rr in zip(("local-data:", "local-data"), self.local_data):
            options.append(f'\t\t["{key}"] = {lua_str(rr)};')
        if options:
            lines += ["\toptions = {", *options, "\t};"]
        lines.append("}")
        return "\n".join(lines)


class ProsodyServer(ServerProcess):
    """A Prosody process with its own config, data and log in a temporary directory.

    Use as a context manager (`with ProsodyServer(["b.test"]) as b: ...`) or call
    `start()`/`stop()`.  `hosts` items are domain strings or `VirtualHost`s.  After start:
    `address`, `c2s_port`, `s2s_port`, `log_text()`, `wait_for_log()`, `register()`.

    mode: "backend" (plaintext S2S allowed, dialback) or "peer" (STARTTLS required,
        certificate authentication required unless `s2s_secure_auth=False`).
    ca_file: PEM bundle Prosody trusts for S2S certificates (`ssl = { cafile = ... }`).
    use_dane: Prosody's own DANE for outgoing S2S (needs secure SRV, A/AAAA and TLSA).
    dns: see `ProsodyDns`; default answers everything from local data (nothing external).
    modules / plugin_paths: added to `modules_enabled` / `plugin_paths`.
    extra_config: Lua lines appended to the global section (before the VirtualHosts).
    """

    NAME = "Prosody"
    ERROR = ProsodyError
    STOP_TIMEOUT = STOP_TIMEOUT

    def __init__(
        self,
        hosts: Sequence[str | VirtualHost],
        *,
        mode: str = "backend",
        address: str = "127.0.0.1",
        users: Mapping[str, str] | None = None,
        ca_file: str | os.PathLike | None = None,
        use_dane: bool = False,
        s2s_require_encryption: bool | None = None,
        s2s_secure_auth: bool | None = None,
        dns: ProsodyDns | None = None,
        modules: Sequence[str] = (),
        plugin_paths: Sequence[str | os.PathLike] = (),
        extra_config: str = "",
        c2s_port: int | None = None,
        s2s_port: int | None = None,
        workdir: str | os.PathLike | None = None,
        keep_workdir: bool = False,
        startup_timeout: float = STARTUP_TIMEOUT,
    ) -> None:
        if mode not in ("backend", "peer"):
            raise ProsodyError(f"mode must be 'backend' or 'peer', not {mode!r}")
        if not address.startswith("127.") and address != "::1":
            raise ProsodyError(f"test servers listen on loopback only, not {address!r}")
        self.hosts = [replace(h) if isinstance(h, VirtualHost) else VirtualHost(h) for h in hosts]
        if not self.hosts:
            raise ProsodyError("ProsodyServer needs at least one VirtualHost")
        # `users` is a shortcut for single-host servers: registered on the first host.
        if users:
            self.hosts[0].users = {**self.hosts[0].users, **users}
        self.mode = mode
        self.address = address
        self.ca_file = Path(ca_file) if ca_file else None
        self.use_dane = use_dane
        self.s2s_require_encryption = (mode == "peer") if s2s_require_encryption is None else s2s_require_encryption
        self.s2s_secure_auth = (mode == "peer") if s2s_secure_auth is None else s2s_secure_auth
        self.dns = dns or ProsodyDns()
        self.modules = tuple(modules)
        self.plugin_paths = tuple(Path(p) for p in plugin_paths)
        self.extra_config = extra_config
        self.c2s_port = c2s_port or free_port(address)
        self.s2s_port = s2s_port or free_port(address)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="prosodyenv-"))
        self.keep_workdir = keep_workdir or bool(os.environ.get("PROSODYENV_KEEP"))
        self.startup_timeout = startup_timeout
        self.config_path = self.workdir / "prosody.cfg.lua"
        self.log_path = self.workdir / "prosody.log"
        self.stdout_path = self.workdir / "stdout.log"
        self.data_path = self.workdir / "data"
        self.cert_dir = self.workdir / "certs"
        self.pidfile = self.workdir / "prosody.pid"
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self._dead_port: int | None = None

    # -- configuration -----------------------------------------------------------------

    @property
    def hosts_file(self) -> Path | None:
        return self.workdir / "hosts" if self.dns.hosts else None

    @property
    def domains(self) -> list[str]:
        return [h.domain for h in self.hosts]

    @property
    def c2s_addr(self) -> tuple[str, int]:
        return (self.address, self.c2s_port)

    @property
    def s2s_addr(self) -> tuple[str, int]:
        return (self.address, self.s2s_port)

    def config_text(self) -> str:
        """The complete prosody.cfg.lua this server runs with."""
        tls = ("tls",) if self.mode == "peer" or any(h.cert for h in self.hosts) else ()
        modules = list(dict.fromkeys([*BASE_MODULES, *tls, *self.modules]))
        lines = [
            "-- Generated by tests/prosodyenv.py; throw-away test server.",
            "run_as_root = true",
            "daemonize = false",
            # Written by mod_posix only (disabled below); `pid` comes from the Popen.
            f"pidfile = {lua_str(self.pidfile)}",
            f"data_path = {lua_str(self.data_path)}",
            f"certificates = {lua_str(self.cert_dir)}",
            # Line-buffered file sink (loggingmanager's default), so log_text() sees
            # every line as soon as it is written and nothing is lost on SIGKILL.
            f"log = {{ debug = {lua_str(self.log_path)} }}",
            # mod_posix would daemonise, drop privileges and own the pid file.
            'modules_disabled = { "posix" }',
            f"modules_enabled = {lua_list(modules)}",
        ]
        if self.plugin_paths:
            lines.append(f"plugin_paths = {lua_list(self.plugin_paths)}")
        lines += [
            f"interfaces = {lua_list([self.address])}",
            f"c2s_interfaces = {lua_list([self.address])}",
            f"s2s_interfaces = {lua_list([self.address])}",
            f"c2s_ports = {{ {self.c2s_port} }}",
            f"s2s_ports = {{ {self.s2s_port} }}",
            # No listeners the tests do not ask for (they would need more free ports).
            "c2s_direct_tls_ports = { }",
            "s2s_direct_tls_ports = { }",
            "legacy_ssl_ports = { }",
            "http_ports = { }",
            "https_ports = { }",
            "c2s_require_encryption = false",
            "allow_unencrypted_plain_auth = true",
            'authentication = "internal_plain"',
            'storage = "internal"',
            f"s2s_require_encryption = {lua_bool(self.s2s_require_encryption)}",
            f"s2s_secure_auth = {lua_bool(self.s2s_secure_auth)}",
            f"use_dane = {lua_bool(self.use_dane)}",
            # Fail fast in tests: connect timeout (default 90 s), close wait (default 5 s).
            "s2s_timeout = 20",
            "s2s_close_timeout = 1",
        ]
        if self.ca_file:
            lines.append(f"ssl = {{ cafile = {lua_str(self.ca_file)} }}")
        lines.append(self.dns.to_lua(self.hosts_file, self._dead_dns_port, self.workdir / "trust-anchor.ds"))
        if self.extra_config:
            lines += ["", "-- extra_config", self.extra_config.rstrip()]
        for host in self.hosts:
            lines += ["", f"VirtualHost {lua_str(host.domain)}"]
            if host.extra_config:
                lines.append(host.extra_config.rstrip())
        return "\n".join(lines) + "\n"

    @property
    def _dead_dns_port(self) -> int:
        # A loopback UDP port nobody answers on; libunbound gives up there instead of
        # asking the root servers.  Chosen once per server.
        if self._dead_port is None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.1", 0))
                self._dead_port = s.getsockname()[1]
        return self._dead_port

    def write_config(self) -> Path:
        """Write config, certificates and hosts file into the work directory."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_path.mkdir(exist_ok=True)
        self.cert_dir.mkdir(exist_ok=True)
        for host in self.hosts:
            if host.cert is not None:
                # certmanager looks for <dir>/<host>.crt + <dir>/<host>.key.
                (self.cert_dir / f"{host.domain}.crt").write_bytes(host.cert.chain_pem())
                key = self.cert_dir / f"{host.domain}.key"
                key.write_bytes(host.cert.key_pem())
                key.chmod(0o600)
        if self.dns.trust_anchor and not self.dns.trust_anchor_file:
            (self.workdir / "trust-anchor.ds").write_text(self.dns.trust_anchor.rstrip() + "\n")
        if self.hosts_file:
            self.hosts_file.write_text("".join(f"{ip} {name}\n" for name, ip in self.dns.hosts.items()))
        self.config_path.write_text(self.config_text())
        return self.config_path

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> "ProsodyServer":
        """Write the config, register users, start Prosody and wait for its ports."""
        if self.process is not None:
            raise ProsodyError("Prosody already started")
        _require_lua_unbound()
        self.write_config()
        for host in self.hosts:
            for user, password in host.users.items():
                self.register(user, host.domain, password)
        began = time.monotonic()
        with open(self.stdout_path, "wb") as out:
            self.process = subprocess.Popen(
                [PROSODY, "--config", str(self.config_path), "-F"],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() kills it whole
            )
        try:
            self._wait_listening(began + self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _wait_listening(self, deadline: float) -> None:
        pending = {self.c2s_port, self.s2s_port}
        while pending:
            if self.process.poll() is not None:
                raise ProsodyError(
                    f"prosody exited with status {self.process.returncode} during startup\n"
                    + self._diagnostics()
                )
            for port in list(pending):
                try:
                    socket.create_connection((self.address, port), timeout=0.5).close()
                    pending.discard(port)
                except OSError:
                    pass
            if pending:
                if time.monotonic() > deadline:
                    raise ProsodyError(f"prosody not listening on {sorted(pending)} in time\n" + self._diagnostics())
                # A poll interval, not a synchronisation sleep: the condition is re-checked.
                time.sleep(0.005)

    # -- operations ----------------------------------------------------------------------

    def account(self, jid: str, password: str) -> Account:
        """c2s login data for a user of this server (for xmppclient.deliver_message)."""
        return Account(self.address, self.c2s_port, jid, password)

    def register(self, user: str, domain: str, password: str) -> None:
        """`prosodyctl --config FILE register USER DOMAIN PASSWORD` (works running or not)."""
        if not self.config_path.exists():
            self.write_config()
        result = subprocess.run(
            [PROSODYCTL, "--config", str(self.config_path), "register", user, domain, password],
            cwd=self.workdir, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
        )
        if result.returncode != 0:
            raise ProsodyError(
                f"prosodyctl register {user}@{domain} failed ({result.returncode}): "
                + (result.stdout + result.stderr).decode(errors="replace")
            )



if pytest is not None:

    @pytest.fixture
    def prosody_factory(tmp_path: Path) -> Iterator[Callable[..., ProsodyServer]]:
        """`prosody_factory(hosts, **ProsodyServer kwargs)` → a started server; all are
        stopped at teardown.  Import it into a test module (or conftest) to use it."""
        yield from server_factory(ProsodyServer, tmp_path, "prosody")
