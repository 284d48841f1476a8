"""The proxy under test, started from a test: in-process (its own trio loop in a thread) or as
a separate process; plus a recording TCP relay to put between the proxy and its backend.

* `write_config(path, ...)` — a `config.toml` (DESIGN §4) from keyword arguments; the proxy is
  always started from such a file through `proxy.config.load_config`, as in production.
* `RunningProxy(config)` — `with RunningProxy(path) as proxy:` runs `proxy.server.serve` in a
  background thread with its own `trio.run`; `proxy.inbound` is the bound (host, port) (listen
  on port 0 and read it here), `proxy.server` the `ProxyServer`, `proxy.log` the captured log
  lines of this proxy only, `proxy.decisions()` its `event=decision` lines as dicts.
* `ProxyProcess(config)` — the same in a child process (`python -m proxy run -c FILE`, the real
  CLI); the bound addresses are read from its `event=listening` log lines on stderr.
* `RecordingRelay(target)` — a loopback TCP relay that records every byte in both directions,
  per connection: the strongest way to assert what a backend did (not) receive.
* `TrioThread` — the background trio loop the in-process helpers run in.

Everything is stopped on exit, also when the test fails.  Waiting is always polling a
condition with a deadline (`wait_until`), never a bare sleep.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import trio

T = TypeVar("T")

# Generous for a loaded CI machine; the proxy itself binds within milliseconds.
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
POLL_INTERVAL = 0.01   # between re-checks of a polled condition (never a synchronisation sleep)

REPO = Path(__file__).resolve().parent.parent


class ProxyEnvError(RuntimeError):
    """The proxy (or relay) could not be started or did not do what a test waited for."""


def wait_until(condition: Callable[[], T], timeout: float, what: str | Callable[[], str] = "condition") -> T:
    """Poll `condition()` until it returns something truthy; return that.  Raise
    ProxyEnvError naming `what` (a string, or a callable giving diagnostics) after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise ProxyEnvError(f"{what() if callable(what) else what} not reached within {timeout:g} s")
        time.sleep(POLL_INTERVAL)


# ------------------------------------------------------------------------------ configuration

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        return json.dumps(os.fspath(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def config_text(
    *,
    listen: Sequence[str] = ("127.0.0.1:0",),
    backend: str,
    domains: Iterable[tuple[str, str | os.PathLike, str | os.PathLike]] = (),
    nameservers: Sequence[str] = ("127.0.0.1",),
    policy_dir: str | os.PathLike = "",
    ca_file: str | os.PathLike = "",
    outbound_listen: Sequence[str] = (),
    proxy_protocol: bool = False,
    dns_timeout: float = 3.0,
    handshake_timeout: float = 10.0,
    max_stanza_bytes: int = 262144,
    max_connections: int = 1000,
    metrics_listen: str = "",
    log_level: str = "info",
    log_format: str = "text",
    workers: int = 1,
) -> str:
    """The text of a config.toml (DESIGN §4).  `domains` are (name, chain PEM path, key path).

    Test defaults differ from production ones where a test needs it: listen on port 0 (read
    the bound port back), no outbound listener and no metrics listener (nothing bound that a
    test did not ask for), short DNS/handshake timeouts (a failure shows up in seconds),
    one process (`workers = 1`, not one per CPU: a test that wants workers says so)."""
    lines = [
        "[server]",
        f"workers = {workers}",
        "",
        "[inbound]",
        f"listen = {_toml_value(list(listen))}",
        f"backend = {_toml_value(backend)}",
        f"proxy_protocol = {_toml_value(proxy_protocol)}",
        "",
        "[outbound]",
        f"listen = {_toml_value(list(outbound_listen))}",
        "",
        "[dns]",
        f"nameservers = {_toml_value(list(nameservers))}",
        f"timeout = {_toml_value(float(dns_timeout))}",
        "",
        "[policy]",
        f"dir = {_toml_value(policy_dir)}",
        f"ca_file = {_toml_value(ca_file)}",
        "",
        "[limits]",
        f"max_stanza_bytes = {max_stanza_bytes}",
        f"handshake_timeout = {_toml_value(float(handshake_timeout))}",
        f"max_connections = {max_connections}",
        "",
        "[metrics]",
        f"listen = {_toml_value(metrics_listen)}",
        "",
        "[log]",
        f"level = {_toml_value(log_level)}",
        f"format = {_toml_value(log_format)}",
    ]
    for name, cert, key in domains:
        lines += ["", "[[domain]]", f"name = {_toml_value(name)}", f"cert = {_toml_value(cert)}",
                  f"key = {_toml_value(key)}"]
    return "\n".join(lines) + "\n"


def write_config(path: str | os.PathLike, **kwargs) -> Path:
    """Write `config_text(**kwargs)` to `path`; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_text(**kwargs))
    return path


def write_policies(directory: str | os.PathLike, policies: Mapping[str, str | Mapping[str, Any]]) -> Path:
    """Write `policy.d/<name>.toml` files: `{"peer.test": {"require": "dane"}}` or raw TOML text."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, body in policies.items():
        text = body if isinstance(body, str) else "".join(f"{k} = {_toml_value(v)}\n" for k, v in body.items())
        (directory / f"{name}.toml").write_text(text)
    return directory


# ------------------------------------------------------------------------------ log lines

_LOGFMT_PAIR = re.compile(r'([A-Za-z0-9_.\-]+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_logfmt(line: str) -> dict[str, str]:
    """`key=value key="quoted \\"value\\""` -> dict (unknown text between pairs is ignored)."""
    out: dict[str, str] = {}
    for key, value in _LOGFMT_PAIR.findall(line):
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            value = re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m.group(1), m.group(1)),
                           value[1:-1])
        out[key] = value
    return out


def _parse_line(line: str) -> dict[str, str]:
    line = line.strip()
    if line.startswith("{"):
        try:
            return {k: str(v) for k, v in json.loads(line).items()}
        except (ValueError, AttributeError):
            pass
    return parse_logfmt(line)


class LogLines:
    """Log lines of one proxy, as text and as parsed key/value dicts (logfmt or JSON)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lines: list[str] = []

    def add(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def text(self) -> str:
        return "\n".join(self.lines())

    def records(self, **match: str) -> list[dict[str, str]]:
        """Parsed lines whose fields equal every `match` item (e.g. event="decision")."""
        out = []
        for line in self.lines():
            fields = _parse_line(line)
            if all(fields.get(k) == v for k, v in match.items()):
                out.append(fields)
        return out

    def wait_for(self, timeout: float = 10.0, **match: str) -> dict[str, str]:
        """The first record matching `match`, polling until `timeout`."""
        found = wait_until(lambda: self.records(**match), timeout,
                           lambda: f"log record {match} (log so far:\n{self.text()}\n)")
        return found[0]


class _CaptureHandler(logging.Handler):
    """Collects the records logged by one thread (one in-process proxy) as logfmt lines."""

    def __init__(self, thread_id: int, sink: LogLines) -> None:
        super().__init__(logging.DEBUG)
        self.thread_id = thread_id
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread_id:
            return
        try:
            fields = getattr(record, "fields", None) or getattr(record, "decision", None)
            message = record.getMessage()
            if isinstance(fields, Mapping):
                from proxy.logsetup import logfmt_value
                message = " ".join(f"{k}={logfmt_value(v)}" for k, v in fields.items())
            line = f"level={record.levelname.lower()} logger={record.name} {message}"
            if record.exc_info:
                line += " exc=" + json.dumps(self.formatException(record.exc_info))
            self.sink.add(line)
        except Exception:  # a logging problem must never break the proxy under test
            self.handleError(record)


# ------------------------------------------------------------------------------ trio in a thread

class TrioThread:
    """A trio event loop in a daemon thread, for servers a synchronous test talks to.

    `start(async_fn, *args)` runs `nursery.start(async_fn, *args)` in that loop and returns
    what the task reported through `task_status.started()`.  `close()` cancels everything and
    joins the thread (bounded by STOP_TIMEOUT)."""

    def __init__(self, name: str = "trio-thread") -> None:
        self.name = name
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def ident(self) -> int:
        assert self._thread.ident is not None
        return self._thread.ident

    def __enter__(self) -> "TrioThread":
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT) or self._token is None:
            raise ProxyEnvError(f"{self.name}: trio loop did not start: {self._error!r}")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._ready.set()
                await trio.sleep_forever()

        try:
            trio.run(main)
        except BaseException as exc:  # reported by close()/start()
            self._error = exc
        finally:
            self._ready.set()

    def start(self, async_fn: Callable[..., Any], *args: Any) -> Any:
        if self._nursery is None or not self._thread.is_alive():
            raise ProxyEnvError(f"{self.name}: loop not running ({self._error!r})")
        with_deadline = functools.partial(self._start_with_deadline, async_fn, *args)
        return trio.from_thread.run(with_deadline, trio_token=self._token)

    async def _start_with_deadline(self, async_fn, *args):
        with trio.fail_after(START_TIMEOUT):
            return await self._nursery.start(async_fn, *args)

    def run(self, async_fn: Callable[..., Any], *args: Any) -> Any:
        """Run `async_fn(*args)` in the loop and return its result (blocking this thread)."""
        return trio.from_thread.run(async_fn, *args, trio_token=self._token)

    def close(self) -> None:
        if self._thread.is_alive() and self._nursery is not None:
            try:
                trio.from_thread.run_sync(self._nursery.cancel_scope.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(STOP_TIMEOUT)
        if self._thread.is_alive():
            raise ProxyEnvError(f"{self.name}: trio loop did not stop within {STOP_TIMEOUT} s")
        if self._error is not None and not isinstance(self._error, trio.Cancelled):
            raise ProxyEnvError(f"{self.name}: trio loop failed: {self._error!r}") from self._error


# ------------------------------------------------------------------------------ the proxy, in-process

class RunningProxy:
    """`proxy.server.serve(load_config(path))` in a background trio loop.

    config: a config file path or a `proxy.config.Config`.  evidence_for: passed to `serve`
    (default: real DNS through `dns.nameservers`).  Attributes after `__enter__`: `inbound` /
    `outbound` (first bound address, or None), `listening` (`proxy.server.Listening`),
    `server` (`ProxyServer`), `log` (`LogLines` of this proxy's records only)."""

    def __init__(self, config, *, evidence_for=None, name: str = "proxy") -> None:
        from proxy.config import Config, load_config

        self.config = config if isinstance(config, Config) else load_config(config)
        self.evidence_for = evidence_for
        self.log = LogLines()
        self.listening = None
        self._loop = TrioThread(name)
        self._handler: _CaptureHandler | None = None
        self._logger = logging.getLogger("xmpp_dane_proxy")
        self._old_level = logging.NOTSET

    @property
    def inbound(self) -> tuple[str, int] | None:
        return tuple(self.listening.inbound[0]) if self.listening and self.listening.inbound else None

    @property
    def outbound(self) -> tuple[str, int] | None:
        return tuple(self.listening.outbound[0]) if self.listening and self.listening.outbound else None

    @property
    def server(self):
        return self.listening.server if self.listening else None

    def decisions(self, **match: str) -> list[dict[str, str]]:
        return self.log.records(event="decision", **match)

    def wait_for_decision(self, domain: str, timeout: float = 10.0) -> dict[str, str]:
        return self.log.wait_for(timeout, event="decision", domain=domain)

    def __enter__(self) -> "RunningProxy":
        from proxy.server import serve

        self._loop.__enter__()
        self._handler = _CaptureHandler(self._loop.ident, self.log)
        if not any(isinstance(h, _CaptureHandler) for h in self._logger.handlers):
            self._old_level = self._logger.level      # restored when the last capture ends
        self._logger.addHandler(self._handler)
        # Debug too: tests may look at per-stream lines (event=tls, ...), not only decisions.
        self._logger.setLevel(logging.DEBUG)
        # With `outbound.listen` set, the outbound side runs too, as `proxy.runner` runs it.
        outbound_handler = None
        if self.config.outbound.listen:
            from proxy.outbound import OutboundProxy
            outbound_handler = OutboundProxy(self.config)
        try:
            self.listening = self._loop.start(
                functools.partial(serve, self.config, evidence_for=self.evidence_for,
                                  outbound_handler=outbound_handler))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._loop.close()
        finally:
            if self._handler is not None:
                self._logger.removeHandler(self._handler)
                self._handler = None
                if not any(isinstance(h, _CaptureHandler) for h in self._logger.handlers):
                    self._logger.setLevel(self._old_level)


# ------------------------------------------------------------------------------ the proxy, as a process

class ProxyProcess:
    """The proxy as a child process in its own process group, logging to a file.

    command: argv prefix run with the config path appended; default the real CLI,
    `python -m proxy run -c`.
    The bound addresses come from the `event=listening` log lines, so listening on port 0
    works.  Needs `log.level` info or debug."""

    def __init__(self, config_path: str | os.PathLike, *, command: Sequence[str] | None = None,
                 log_path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> None:
        from proxy.config import load_config

        self.config_path = Path(config_path)
        self.config = load_config(self.config_path)
        self.command = list(command) if command else [sys.executable, "-m", "proxy", "run", "-c"]
        self.log_path = Path(log_path) if log_path else self.config_path.with_suffix(".log")
        pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        self.env = {**os.environ, "PYTHONPATH": pythonpath, **(env or {})}
        self.process: subprocess.Popen | None = None
        self.inbound: tuple[str, int] | None = None
        self.inbound_all: list[tuple[str, int]] = []

    @property
    def log(self) -> LogLines:
        """The log so far (re-read from the file on every access)."""
        lines = LogLines()
        try:
            for line in self.log_path.read_text(errors="replace").splitlines():
                lines.add(line)
        except FileNotFoundError:
            pass
        return lines

    def decisions(self, **match: str) -> list[dict[str, str]]:
        return self.log.records(event="decision", **match)

    def wait_for_decision(self, domain: str, timeout: float = 10.0) -> dict[str, str]:
        return self.log.wait_for(timeout, event="decision", domain=domain)

    def __enter__(self) -> "ProxyProcess":
        wanted = len(self.config.inbound.listen)
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(
                [*self.command, str(self.config_path)], cwd=REPO, env=self.env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        import processlog   # here: processlog imports this module

        log = self.log_path
        processlog.register(f"{shlex.join(self.command)} {self.config_path}",
                            lambda: log.read_text(errors="replace").splitlines() if log.exists() else [])
        try:
            def bound():
                if self.process.poll() is not None:
                    raise ProxyEnvError(f"{shlex.join(self.command)} exited with {self.process.returncode}:\n"
                                        + self.log.text())
                found = self.log.records(event="listening", direction="inbound")
                return found if len(found) >= wanted else None

            found = wait_until(bound, START_TIMEOUT, lambda: f"proxy listening (log:\n{self.log.text()})")
            from proxy.config import parse_hostport
            self.inbound_all = [parse_hostport(r["address"]) for r in found]
            self.inbound = self.inbound_all[0]
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> int | None:
        """SIGTERM the group, SIGKILL after STOP_TIMEOUT; return the exit status."""
        proc, self.process = self.process, None
        if proc is None:
            return None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                return proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                continue
        return proc.wait(timeout=STOP_TIMEOUT)

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------------------ the recording relay

@dataclass
class RelayedConnection:
    """One relayed connection: `upstream` = bytes client -> target, `downstream` = back."""

    client: tuple[str, int]
    upstream: bytearray = field(default_factory=bytearray)
    downstream: bytearray = field(default_factory=bytearray)
    closed: bool = False


class RecordingRelay:
    """A loopback TCP relay to `target` ("host:port") that records everything, per connection.

    Put it between the proxy and its backend (`inbound.backend` = the relay's address) to
    assert what the backend did and did not receive.  Runs in its own `TrioThread`."""

    def __init__(self, target: tuple[str, int], *, listen_host: str = "127.0.0.1") -> None:
        self.target = target
        self.listen_host = listen_host
        self.address: tuple[str, int] | None = None
        self.connections: list[RelayedConnection] = []
        self._lock = threading.Lock()
        self._loop = TrioThread("relay")

    def __enter__(self) -> "RecordingRelay":
        self._loop.__enter__()
        try:
            self.address = self._loop.start(self._serve)
        except BaseException:
            self._loop.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._loop.close()

    @property
    def hostport(self) -> str:
        assert self.address is not None
        return f"{self.address[0]}:{self.address[1]}"

    async def _serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.listen_host)
        task_status.started(tuple(listeners[0].socket.getsockname()[:2]))
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        conn = RelayedConnection(tuple(client.socket.getpeername()[:2]))
        with self._lock:
            self.connections.append(conn)
        try:
            try:
                upstream = await trio.open_tcp_stream(*self.target)
            except OSError:
                return
            async with upstream:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, upstream, conn.upstream, nursery)
                    nursery.start_soon(self._pump, upstream, client, conn.downstream, nursery)
        finally:
            conn.closed = True
            await client.aclose()

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, record: bytearray,
                    nursery: trio.Nursery) -> None:
        try:
            while data := await src.receive_some(65536):
                with self._lock:
                    record += data
                await dst.send_all(data)
            await dst.send_eof()   # half-close: let the other direction finish
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            nursery.cancel_scope.cancel()

    def snapshot(self) -> list[RelayedConnection]:
        """A copy of every connection so far (bytes copied under the lock)."""
        with self._lock:
            return [RelayedConnection(c.client, bytearray(c.upstream), bytearray(c.downstream), c.closed)
                    for c in self.connections]

    def upstream_with(self, needle: bytes) -> list[RelayedConnection]:
        """Connections whose client -> target bytes contain `needle`."""
        return [c for c in self.snapshot() if needle in c.upstream]

    def wait_for(self, predicate: Callable[[list[RelayedConnection]], T], timeout: float = 10.0,
                 what: str = "relay condition") -> T:
        return wait_until(lambda: predicate(self.snapshot()), timeout,
                          lambda: f"{what} (relayed so far: {[bytes(c.upstream) for c in self.snapshot()]!r})")


__all__ = [
    "LogLines", "ProxyEnvError", "ProxyProcess", "RecordingRelay", "RelayedConnection", "RunningProxy",
    "TrioThread", "config_text", "parse_logfmt", "wait_until", "write_config", "write_policies",
]
