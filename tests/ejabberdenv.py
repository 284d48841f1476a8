"""Real ejabberd servers (Debian's 23.01 package) on loopback, for end-to-end tests.

`EjabberdServer` writes a self-contained `ejabberd.yml` into a temporary directory (Mnesia
spool, logs, certificates, inetrc, private /etc/hosts and /etc/resolv.conf all live there),
starts `erl -noinput ... -s ejabberd` in its own process group, waits until ejabberd says it
is started, its users are registered and its ports accept connections, and kills the whole
group on exit, also when the test fails.  `ejabberd_factory` is the same as a pytest fixture.
Facts this relies on: ../shared/notes/ejabberd-as-test-peer.md.

Two shapes, as for Prosody (tests/prosodyenv.py), because the proxy needs ejabberd in both
roles (DESIGN §3):

* ``mode="backend"`` — the server behind the proxy: a plaintext `ejabberd_s2s_in` listener on
  loopback, `s2s_use_starttls: optional` (`required` refuses the proxy's plaintext stream;
  `false` would also stop ejabberd's own outgoing STARTTLS), dialback (`mod_s2s_dialback`).
* ``mode="peer"`` — a modern remote server: `s2s_use_starttls: required`, a certificate from
  the test PKI per host, the test CA trusted (`s2s_cafile`), and dialback optional
  (`dialback=False` makes an EXTERNAL-only peer: ejabberd then authenticates its outgoing
  streams with SASL EXTERNAL only).

DNS is confined to the test machine.  ejabberd resolves in two places: SRV records through
Erlang's `inet_res` (configured by the `ERL_INETRC` file written here: `nameserver` = the
test resolver given as `nameserver="IP:PORT"`, or a dead loopback port), and addresses through
the C library (`net:getaddrinfo`: /etc/hosts, /etc/resolv.conf), which the inetrc does not
change.  So ejabberd runs in a private mount namespace (`unshare -m`) where /etc/hosts and
/etc/resolv.conf are bind-mounted from files of its own: hosts = localhost, this machine's
name, and `etc_hosts` (name -> loopback address); resolv.conf names a loopback address with
no server on port 53, so every other C-library lookup fails at once instead of leaving the
machine.  `unshare -m` needs root (CAP_SYS_ADMIN), like the CI machine has.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

try:  # pytest is only needed for the fixture; the harness itself runs without it.
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

from pki import Issued
from prosodyenv import free_port
from serverproc import ServerProcess, server_factory
from xmppclient import Account

ERL = shutil.which("erl") or "/usr/bin/erl"
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"

# ejabberd serves c2s+s2s in 0.7-1.4 s on an idle machine; generous for a loaded CI machine.
STARTUP_TIMEOUT = 30.0
# erl turns SIGTERM into init:stop(); ejabberd stops in ~1.1 s.  SIGKILL the group after this.
STOP_TIMEOUT = 5.0
# What the `-eval` after `-s ejabberd` prints once every user is registered (stdout).
READY_MARKER = "ejabberdenv: ready"
# ejabberd's own readiness line (its log): "ejabberd 23.01-1 is started in the node ...".
STARTED = re.compile(r"ejabberd \S+ is started in the node")
# User names and passwords go into an Erlang `-eval` expression: keep them to plain characters.
_SAFE = re.compile(r"[A-Za-z0-9._+-]+")


class EjabberdError(RuntimeError):
    """ejabberd could not be configured, started or driven; the message says why."""


def ejabberd_libs() -> Path:
    """The folder holding `ejabberd-<version>/` (what ERL_LIBS must name), as ejabberdctl sets it."""
    for pattern in ("/usr/lib/*/ejabberd-*/ebin/ejabberd.app", "/usr/lib/ejabberd-*/ebin/ejabberd.app"):
        for app in sorted(Path("/").glob(pattern.lstrip("/"))):
            return app.parent.parent.parent
    raise EjabberdError("ejabberd not installed (no ejabberd-*/ebin/ejabberd.app under /usr/lib): "
                        "apt-get install ejabberd")


def erlang_string(text: str) -> str:
    """An Erlang string literal (`"..."`), for paths and names in inetrc and `-eval`."""
    if any(ord(c) < 32 for c in text):
        raise EjabberdError(f"control character in Erlang string: {text!r}")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ip_tuple(address: str) -> str:
    try:
        return "{" + ",".join(str(b) for b in socket.inet_aton(address)) + "}"
    except OSError:
        raise EjabberdError(f"IPv4 address expected, not {address!r}") from None


def _split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise EjabberdError(f"IP:PORT expected, not {value!r}")
    return host.strip("[]"), int(port)


@dataclass
class EjabberdHost:
    """One virtual host: `cert` (chain + key from tests/pki.py) is written to
    `certs/<domain>.pem` and listed in `certfiles`; `users` are registered at start."""

    domain: str
    cert: Issued | None = None
    users: Mapping[str, str] = field(default_factory=dict)


class EjabberdServer(ServerProcess):
    """An ejabberd node with its own config, spool and logs in a temporary directory.

    Use as a context manager or call `start()`/`stop()`.  `hosts` items are domain strings or
    `EjabberdHost`s.  After start: `address`, `c2s_port`, `s2s_port`, `log_text()`,
    `wait_for_log()`, `account()`.

    mode: "backend" (plaintext S2S listener, `s2s_use_starttls: optional`) or "peer"
        (`s2s_use_starttls: required`, certificates).
    dialback: load `mod_s2s_dialback` (default on); off = SASL EXTERNAL only.
    s2s_use_starttls: override the mode's value ("false", "optional", "required").
    ca_file: PEM bundle ejabberd trusts for S2S certificates (`s2s_cafile`).
    nameserver: "IP:PORT" of a test resolver for Erlang's SRV lookups (inet_res); default a
        dead loopback port.
    etc_hosts: name -> address for the C library's lookups (the private /etc/hosts).
    modules: extra `modules:` entries ({name: options}).  code_paths: folders added with `-pa`
        (where modules of one's own are loaded from).
    options: extra top-level ejabberd.yml options (override the generated ones).
    loglevel: ejabberd's `loglevel` (info; "debug" logs every stanza).
    """

    NAME = "ejabberd"
    ERROR = EjabberdError
    STOP_TIMEOUT = STOP_TIMEOUT

    def __init__(
        self,
        hosts: Sequence[str | EjabberdHost],
        *,
        mode: str = "backend",
        address: str = "127.0.0.1",
        users: Mapping[str, str] | None = None,
        dialback: bool = True,
        s2s_use_starttls: str | None = None,
        ca_file: str | os.PathLike | None = None,
        nameserver: str | None = None,
        etc_hosts: Mapping[str, str] | None = None,
        modules: Mapping[str, Mapping[str, Any]] | None = None,
        code_paths: Sequence[str | os.PathLike] = (),
        options: Mapping[str, Any] | None = None,
        loglevel: str = "info",
        c2s_port: int | None = None,
        s2s_port: int | None = None,
        workdir: str | os.PathLike | None = None,
        keep_workdir: bool = False,
        startup_timeout: float = STARTUP_TIMEOUT,
    ) -> None:
        if mode not in ("backend", "peer"):
            raise EjabberdError(f"mode must be 'backend' or 'peer', not {mode!r}")
        if not address.startswith("127."):
            raise EjabberdError(f"test servers listen on IPv4 loopback only, not {address!r}")
        self.hosts = [replace(h) if isinstance(h, EjabberdHost) else EjabberdHost(h) for h in hosts]
        if not self.hosts:
            raise EjabberdError("EjabberdServer needs at least one host")
        if users:
            self.hosts[0].users = {**self.hosts[0].users, **users}
        for host in self.hosts:
            for user, password in host.users.items():
                if not _SAFE.fullmatch(user) or not _SAFE.fullmatch(password):
                    raise EjabberdError(f"user/password must match {_SAFE.pattern}: {user!r}")
        self.mode = mode
        self.address = address
        self.dialback = dialback
        default_starttls = "required" if mode == "peer" else "optional"
        self.s2s_use_starttls = s2s_use_starttls or default_starttls
        if self.s2s_use_starttls not in ("false", "optional", "required", "true"):
            raise EjabberdError(f"s2s_use_starttls: false, optional, required or true, not {self.s2s_use_starttls!r}")
        self.ca_file = Path(ca_file) if ca_file else None
        self.nameserver = _split_hostport(nameserver) if nameserver else None
        self.etc_hosts = dict(etc_hosts or {})
        for name, ip in self.etc_hosts.items():
            if not ip.startswith("127.") and ip != "::1":
                raise EjabberdError(f"etc_hosts: loopback addresses only, not {name} -> {ip}")
        self.modules = dict(modules or {})
        self.code_paths = tuple(Path(p) for p in code_paths)
        self.options = dict(options or {})
        self.loglevel = loglevel
        self.c2s_port = c2s_port or free_port(address)
        self.s2s_port = s2s_port or free_port(address)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="ejabberdenv-"))
        self.keep_workdir = keep_workdir or bool(os.environ.get("EJABBERDENV_KEEP"))
        self.startup_timeout = startup_timeout
        self.config_path = self.workdir / "ejabberd.yml"
        self.log_path = self.workdir / "logs" / "ejabberd.log"
        self.stdout_path = self.workdir / "stdout.log"
        self.spool = self.workdir / "spool"
        self.cert_dir = self.workdir / "certs"
        self.inetrc_path = self.workdir / "inetrc"
        self.hosts_path = self.workdir / "etc-hosts"
        self.resolv_path = self.workdir / "resolv.conf"
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    # -- configuration -----------------------------------------------------------------

    @property
    def domains(self) -> list[str]:
        return [h.domain for h in self.hosts]

    @property
    def c2s_addr(self) -> tuple[str, int]:
        return (self.address, self.c2s_port)

    @property
    def s2s_addr(self) -> tuple[str, int]:
        return (self.address, self.s2s_port)

    def config(self) -> dict[str, Any]:
        """The ejabberd.yml content as a dict (written as JSON, which is YAML)."""
        certfiles = [str(self.cert_dir / f"{h.domain}.pem") for h in self.hosts if h.cert is not None]
        modules: dict[str, Any] = {
            "mod_roster": {}, "mod_disco": {}, "mod_ping": {}, "mod_offline": {},
        }
        if self.dialback:
            modules["mod_s2s_dialback"] = {}
        modules.update(self.modules)
        config: dict[str, Any] = {
            "hosts": self.domains,
            "loglevel": self.loglevel,
            "log_rotate_count": 0,
            # Plain stored passwords: SASL PLAIN (tests/xmppclient.py) works against them.
            "auth_method": "internal",
            "auth_password_format": "plain",
            "listen": [
                # c2s in plaintext on loopback: the test client never negotiates TLS.
                {"port": self.c2s_port, "ip": self.address, "module": "ejabberd_c2s",
                 "starttls_required": False},
                {"port": self.s2s_port, "ip": self.address, "module": "ejabberd_s2s_in",
                 "max_stanza_size": 524288},
            ],
            "s2s_use_starttls": self.s2s_use_starttls,
            # Fail fast in tests: DNS (default 10 s x 2 retries), connect (10 s) and, after a
            # failed outgoing connection, bounce for at most 1 s instead of up to 300 s.
            "s2s_dns_timeout": 3,
            "s2s_dns_retries": 1,
            "outgoing_s2s_timeout": 10,
            "s2s_max_retry_delay": 1,
            "acl": {"local": {"user_regexp": ""}, "loopback": {"ip": ["127.0.0.0/8"]}},
            "access_rules": {"local": {"allow": "local"}, "c2s": {"allow": "all"}},
            "modules": modules,
        }
        if certfiles:
            config["certfiles"] = certfiles
        if self.ca_file:
            config["s2s_cafile"] = str(self.ca_file)
        config.update(self.options)
        return config

    def inetrc_text(self) -> str:
        """Erlang's resolver configuration (ERL_INETRC) for this node."""
        ns_ip, ns_port = self.nameserver or ("127.0.0.1", _dead_udp_port())
        lines = [
            "%% Generated by tests/ejabberdenv.py.",
            # Must come before `nameserver`: reading a resolv.conf later would replace the list.
            '{resolv_conf, ""}.',
            '{hosts_file, ""}.',
            # ejabberd looks its own host name up at start; a local answer avoids a stall.
            f"{{host, {{127,0,0,1}}, [{erlang_string('localhost')}, {erlang_string(socket.gethostname())}]}}.",
            f"{{nameserver, {_ip_tuple(ns_ip)}, {ns_port}}}.",
            "{lookup, [file, dns]}.",
            "{timeout, 1000}.",
            "{retry, 2}.",
        ]
        return "\n".join(lines) + "\n"

    def etc_hosts_text(self) -> str:
        lines = ["127.0.0.1 localhost", f"127.0.0.1 {socket.gethostname()}"]
        lines += [f"{ip} {name}" for name, ip in self.etc_hosts.items()]
        return "\n".join(lines) + "\n"

    def write_config(self) -> Path:
        """Write ejabberd.yml, certificates, inetrc, hosts and resolv.conf into the workdir."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for d in (self.spool, self.cert_dir, self.log_path.parent):
            d.mkdir(exist_ok=True)
        for host in self.hosts:
            if host.cert is not None:
                pem = self.cert_dir / f"{host.domain}.pem"
                pem.write_bytes(host.cert.chain_pem() + host.cert.key_pem())
                pem.chmod(0o600)
        self.inetrc_path.write_text(self.inetrc_text())
        self.hosts_path.write_text(self.etc_hosts_text())
        # No server listens on port 53 of this address: C-library DNS is refused at once.
        self.resolv_path.write_text("nameserver 127.0.0.254\noptions timeout:1 attempts:1\n")
        self.config_path.write_text(json.dumps(self.config(), indent=1) + "\n")
        return self.config_path

    def _register_eval(self) -> str:
        """The `-eval` run after `-s ejabberd`: register every user (`try_register` answers
        `ok`; anything else is a badmatch), then print READY_MARKER; on failure halt(3)."""
        calls = [
            f"ok = ejabberd_auth:try_register(list_to_binary({erlang_string(u)}), "
            f"list_to_binary({erlang_string(h.domain)}), list_to_binary({erlang_string(p)}))"
            for h in self.hosts for u, p in h.users.items()
        ]
        body = ", ".join([*calls, f"io:format(\"~s~n\", [{erlang_string(READY_MARKER)}])"])
        return f"try {body} catch C:E -> io:format(\"ejabberdenv: setup failed: ~p:~p~n\", [C, E]), halt(3) end"

    def command(self) -> list[str]:
        """The argv: unshare -m, bind-mount hosts/resolv.conf, exec erl ... -s ejabberd."""
        erl = [ERL, "-noinput", "+K", "true", "-mnesia", "dir", erlang_string(str(self.spool))]
        for path in self.code_paths:
            erl += ["-pa", str(path)]
        erl += ["-s", "ejabberd", "-eval", self._register_eval()]
        script = (
            'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf && shift 2 && exec "$@"'
        )
        return [UNSHARE, "-m", "sh", "-c", script, "ejabberdenv", str(self.hosts_path), str(self.resolv_path), *erl]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ERL_", "EJABBERD_"))}
        env.update(
            EJABBERD_CONFIG_PATH=str(self.config_path),
            EJABBERD_LOG_PATH=str(self.log_path),
            ERL_LIBS=str(ejabberd_libs()),
            ERL_INETRC=str(self.inetrc_path),
            HOME=str(self.workdir),  # address parsing breaks without it (see the notes)
        )
        return env

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> "EjabberdServer":
        """Write the config, start ejabberd, register users, wait for its ports."""
        if self.process is not None:
            raise EjabberdError("ejabberd already started")
        self.write_config()
        began = time.monotonic()
        with open(self.stdout_path, "wb") as out:
            self.process = subprocess.Popen(
                self.command(), cwd=self.workdir, env=self.environment(),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() kills it whole
            )
        try:
            self._wait_ready(began + self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _wait_ready(self, deadline: float) -> None:
        pending = {self.c2s_port, self.s2s_port}
        while True:
            if self.process.poll() is not None:
                hint = ""
                if re.search(r"unshare failed|mount: .*(denied|not permitted)", self.stdout_text()):
                    hint = ("(the private mount namespace for /etc/hosts and /etc/resolv.conf needs root or "
                            "CAP_SYS_ADMIN: `unshare -m` and `mount --bind`)\n")
                raise EjabberdError(
                    f"ejabberd exited with status {self.process.returncode} during startup\n{hint}" + self._diagnostics())
            if READY_MARKER in self.stdout_text() and STARTED.search(self.log_text()):
                for port in list(pending):
                    try:
                        socket.create_connection((self.address, port), timeout=0.5).close()
                        pending.discard(port)
                    except OSError:
                        pass
                if not pending:
                    return
            if time.monotonic() > deadline:
                raise EjabberdError("ejabberd not ready in time\n" + self._diagnostics())
            time.sleep(0.01)  # poll interval; the condition is re-checked

    # -- operations ----------------------------------------------------------------------

    def account(self, jid: str, password: str) -> Account:
        """c2s login data for a user of this server (for xmppclient.deliver_message)."""
        return Account(self.address, self.c2s_port, jid, password)



def _dead_udp_port() -> int:
    # A loopback UDP port nobody answers on (bound and closed): inet_res gives up there.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



if pytest is not None:

    @pytest.fixture
    def ejabberd_factory(tmp_path: Path) -> Iterator[Callable[..., EjabberdServer]]:
        """`ejabberd_factory(hosts, **EjabberdServer kwargs)` → a started server; all are
        stopped at teardown.  Import it into a test module (or conftest) to use it."""
        yield from server_factory(EjabberdServer, tmp_path, "ejabberd")
