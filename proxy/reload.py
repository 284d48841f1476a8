"""The proxy's runtime state, loaded as a whole and swapped atomically on reload (SIGHUP).

`RuntimeState` is everything the listeners consult per connection: the configuration, the
policy files, the PKIX trust store and each local domain's certificate chain and key (plus,
once `proxy/tls.py` builds them, the TLS contexts).  It is immutable; a reload builds a new one
beside the old and swaps a single reference, so a connection that picked up a state keeps a
consistent view until it ends, and new connections see the new one.

Loading is all-or-nothing (DESIGN §2.4: "a bad file never loads half-way"): every file is read
and checked, and any problem anywhere raises one `StateLoadError` listing every problem as
`file:line: message`.  `StateHolder.reload()` keeps the running state on any error, logs the
errors, and reports them — a typo in a policy file must not take the proxy down or open it up.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from policy.pkix import TrustStore, TrustStoreError
from policy.policyfile import PolicyError, PolicySet
from proxy.certfiles import CertFileError, load_identity
from proxy.config import Config, ConfigError, DomainConfig, load_config

log = logging.getLogger("xmpp_dane_proxy.reload")

# Let's Encrypt renews 30 days before expiry and warns at 20; 14 days left means renewal has
# failed at least twice, which is worth a warning on every reload.
EXPIRY_WARNING = _dt.timedelta(days=14)
# Listening addresses are bound once at start (or handed over by systemd); changing them in
# the file takes a restart, which the operator should be told about rather than guess.
_RESTART_ONLY = (("inbound", "listen"), ("outbound", "listen"), ("metrics", "listen"))


class StateLoadError(Exception):
    """The configuration could not be loaded; `.messages` has one `file:line: message` each."""

    def __init__(self, messages: list[str]) -> None:
        super().__init__("\n".join(messages))
        self.messages = messages


@dataclass(frozen=True)
class DomainMaterial:
    """A local domain's certificate chain (leaf first, as served) and its private key."""

    name: str
    cert_path: str
    key_path: str
    chain: tuple[x509.Certificate, ...]
    key: PrivateKeyTypes = field(repr=False)    # never in a repr, hence never in a log line

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_after(self) -> _dt.datetime:
        return self.leaf.not_valid_after_utc

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)


@dataclass(frozen=True)
class RuntimeState:
    """One consistent snapshot of everything loaded from files."""

    config: Config
    policies: PolicySet
    trust: TrustStore
    domains: Mapping[str, DomainMaterial]
    tls: Any = None                       # what the `build_tls` hook made (proxy/tls.py)
    warnings: tuple[str, ...] = ()
    generation: int = 0                   # 0 at start, +1 per successful reload
    loaded_at: float = 0.0                # time.time()


BuildTls = Callable[[RuntimeState], Any]


def load_state(path: str | Path, *, build_tls: BuildTls | None = None, generation: int = 0,
               now: _dt.datetime | None = None) -> RuntimeState:
    """Read the config file and everything it names; StateLoadError lists every problem.

    `build_tls(state)` (optional) makes the TLS contexts from the loaded material; an
    exception from it is a load error like any other, so a reload never installs state
    without working TLS.
    """
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        # Nothing else can be checked without a configuration.
        raise StateLoadError(list(exc.messages)) from None
    errors: list[str] = []
    policies = trust = None
    try:
        policies = PolicySet.load(cfg.policy.dir or None)
    except PolicyError as exc:
        errors.extend(exc.messages)
    try:
        trust = TrustStore.load(cfg.policy.ca_file or None)
    except TrustStoreError as exc:
        errors.append(f"{cfg.path}:0: policy.ca_file: {exc}")
    domains: dict[str, DomainMaterial] = {}
    for dom in cfg.domains:
        material, problems = load_domain(cfg.path, dom)
        errors.extend(problems)
        if material is not None:
            domains[dom.name] = material
    if errors:
        raise StateLoadError(errors)
    assert policies is not None and trust is not None
    state = RuntimeState(cfg, policies, trust, MappingProxyType(domains),
                         warnings=tuple(_warnings(cfg, domains, now)), generation=generation,
                         loaded_at=time.time())
    if build_tls is not None:
        try:
            state = dataclasses.replace(state, tls=build_tls(state))
        except Exception as exc:  # noqa: BLE001 — any failure to build TLS is a load error
            raise StateLoadError([f"{cfg.path}:0: TLS set-up failed: {type(exc).__name__}: {exc}"]) from None
    return state


def load_domain(config_path: str, dom: DomainConfig) -> tuple[DomainMaterial | None, list[str]]:
    """A local domain's chain and key, or the `file:line: message` problems with them."""
    try:
        chain, key = load_identity(dom.cert, dom.key)
    except CertFileError as exc:
        return None, [f"{config_path}:0: domain {dom.name}: {exc}"]
    return DomainMaterial(dom.name, dom.cert, dom.key, tuple(chain), key), []


def _warnings(cfg: Config, domains: Mapping[str, DomainMaterial], now: _dt.datetime | None) -> list[str]:
    now = now or _dt.datetime.now(_dt.timezone.utc)
    out = []
    if not cfg.domains:
        out.append(f"{cfg.path}:0: no [[domain]] configured: every inbound stream will get host-unknown")
    for m in domains.values():
        if m.not_after <= now:
            out.append(f"{m.cert_path}: certificate for {m.name} expired on {m.not_after:%Y-%m-%d} "
                       f"(PKIX peers will reject it; DANE-EE peers do not check dates)")
        elif m.not_after - now < EXPIRY_WARNING:
            out.append(f"{m.cert_path}: certificate for {m.name} expires on {m.not_after:%Y-%m-%d}")
    return out


def restart_needed(old: Config, new: Config) -> list[str]:
    """Changes a reload cannot apply (listening addresses), as warnings."""
    out = []
    for section, key in _RESTART_ONLY:
        before, after = getattr(getattr(old, section), key), getattr(getattr(new, section), key)
        if before != after:
            out.append(f"{new.path}:0: {section}.{key} changed from {before!r} to {after!r}; "
                       f"this takes effect at the next restart")
    return out


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did: `ok` and the new state, or the errors and the state kept."""

    ok: bool
    state: RuntimeState
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line for `systemctl status` (STATUS=)."""
        s = self.state
        if not self.ok:
            return (f"reload failed ({len(self.errors)} errors, still running generation "
                    f"{s.generation}); see the log")
        return f"serving {len(s.domains)} domains, {s.policies.files} policy files (generation {s.generation})"


class StateHolder:
    """Holds the current RuntimeState; `state` is always a complete, valid snapshot."""

    def __init__(self, path: str | Path, *, build_tls: BuildTls | None = None, metrics: Any = None) -> None:
        """Load the initial state; raises StateLoadError (the proxy cannot start without one)."""
        self.path = str(path)
        self.build_tls = build_tls
        self.metrics = metrics
        self._listeners: list[Callable[[RuntimeState, RuntimeState], None]] = []
        self._lock = trio.Lock()      # one reload at a time
        # async (old, new, force) -> problems; set by the runner (own-TLSA guard).
        self.vet: Callable[[RuntimeState, RuntimeState, bool], Any] | None = None
        self._state = load_state(self.path, build_tls=build_tls)
        for w in self._state.warnings:
            log.warning("%s", w)
        self._record(True)

    @property
    def state(self) -> RuntimeState:
        return self._state

    def subscribe(self, callback: Callable[[RuntimeState, RuntimeState], None]) -> None:
        """Call `callback(old, new)` after each successful swap (e.g. to apply `log.level`)."""
        self._listeners.append(callback)

    def reload(self) -> ReloadResult:
        """Load the files again and swap the state in; on any error keep the old one."""
        return self._finish(self._load())

    async def reload_async(self, *, force: bool = False) -> ReloadResult:
        """`reload()` with the file reading and parsing in a worker thread, so the event loop
        keeps relaying meanwhile; the swap itself happens on the trio thread.

        `self.vet(old, new, force)` (optional, async) may refuse a loaded state with a list of
        problems (the own-TLSA guard, proxy/own_tlsa.py); `force` is passed on to it."""
        async with self._lock:
            loaded = await trio.to_thread.run_sync(self._load)
            if self.vet is not None and not isinstance(loaded, StateLoadError):
                problems = await self.vet(self._state, loaded, force)
                if problems:
                    loaded = StateLoadError(list(problems))
            return self._finish(loaded)

    def _load(self) -> RuntimeState | StateLoadError:
        try:
            return load_state(self.path, build_tls=self.build_tls, generation=self._state.generation + 1)
        except StateLoadError as exc:
            return exc

    def _finish(self, loaded: RuntimeState | StateLoadError) -> ReloadResult:
        old = self._state
        if isinstance(loaded, StateLoadError):
            for line in loaded.messages:
                log.error("reload: %s", line)
            log.error("reload failed: %d problems; still running the configuration loaded before",
                      len(loaded.messages))
            self._record(False)
            return ReloadResult(False, old, tuple(loaded.messages))
        warnings = (*loaded.warnings, *restart_needed(old.config, loaded.config))
        for w in warnings:
            log.warning("reload: %s", w)
        self._state = loaded
        for callback in self._listeners:
            try:
                callback(old, loaded)
            except Exception:  # noqa: BLE001 — a subscriber's bug must not undo the reload
                log.exception("reload subscriber %r failed", callback)
        result = ReloadResult(True, loaded, (), warnings)
        log.info("configuration reloaded: %s", result.summary())
        self._record(True)
        return result

    def _record(self, ok: bool) -> None:
        if self.metrics is None:
            return
        self.metrics.reload_result(ok)
        if ok:
            self.metrics.certificates({n: m.not_after.timestamp() for n, m in self._state.domains.items()})


async def reload_on_sighup(holder: StateHolder, *, notifier: Any = None,
                           task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    """Reload on every SIGHUP until cancelled (`systemctl reload` sends one: ExecReload=).

    With a `proxy.sdnotify.Notifier`, systemd sees RELOADING=1 … READY=1 around each reload
    and the result in STATUS=.  Signals that arrive during a reload are coalesced into one
    more reload (trio's signal receiver does that), which is what an operator who saved two
    files in quick succession wants.
    """
    # SIGUSR2: the same reload, forced past the own-TLSA guard (proxy/own_tlsa.py) — a signal
    # rather than a flag file or config key, so the override is one-shot and leaves nothing behind.
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGUSR2) as signals:
        task_status.started()
        async for signum in signals:
            if notifier is not None:
                notifier.reloading("reloading configuration")
            result = await holder.reload_async(force=signum == signal.SIGUSR2)
            if notifier is not None:
                notifier.ready(result.summary())
