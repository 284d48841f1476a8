"""The TOML configuration file (DESIGN §4), loaded strictly.

Every section and key is checked; unknown ones are errors (a typo such as `max_stanza_byte`
must not silently fall back to a default).  Problems are collected and raised together as
`ConfigError` with `file:line: message` per problem.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from policy.pkix_names import normalise_domain
from policy.tomlfile import TomlDocument, TomlFileError

DEFAULT_CONFIG_PATH = "/etc/xmpp-dane-proxy/config.toml"
MAX_WORKERS = 1024


class ConfigError(TomlFileError):
    """The configuration file is wrong; `.messages` has one `file:line: message` per problem."""


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or (with a default port) a bare host; ValueError if malformed."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{text!r}: missing ']'")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise ValueError(f"{text!r} needs a port (host:port)")
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be 0-65535")
    if not host:
        raise ValueError(f"{text!r}: empty host")
    return host, int(port_text)


@dataclass(frozen=True)
class ServerConfig:
    # 0 = one worker process per CPU this process may run on (DESIGN §8, proxy/workers.py):
    # TLS handshakes and XML framing are CPU-bound, and one Python process uses one core.
    workers: int = 0


@dataclass(frozen=True)
class InboundConfig:
    listen: list[str] = field(default_factory=lambda: ["[::]:5269"])
    backend: str = "127.0.0.1:5270"
    proxy_protocol: bool = False
    # XEP-0468 WebSocket S2S (wss only); empty = off, as most deployments need no HTTP path in.
    websocket_listen: list[str] = field(default_factory=list)
    # DESIGN §3.3: offer SASL EXTERNAL to peers that present a certificate, and authenticate
    # them to the backend by dialback with a key only the proxy knows.  The backend checks that
    # key through its outbound S2S, so this only works when that goes through
    # `outbound.listen`: unset (None) = on exactly when `outbound.listen` is non-empty
    # (`InboundConfig.offers_external`).
    sasl_external: bool | None = None

    def offers_external(self, outbound: "OutboundConfig") -> bool:
        """`sasl_external` as set, else whether the backend's outbound can come through us."""
        return self.sasl_external if self.sasl_external is not None else bool(outbound.listen)


@dataclass(frozen=True)
class OutboundConfig:
    listen: list[str] = field(default_factory=lambda: ["127.0.0.1:15269"])


@dataclass(frozen=True)
class DomainConfig:
    name: str
    cert: str
    key: str
    # Staged next identity for a TLSA rollover (RFC 7671 §8.1; proxy/own_tlsa.py): checked
    # against DNS, never served.  Empty = none staged.
    next_cert: str = ""
    next_key: str = ""
    # Which [[domain]] table of the file this is (0-based), so messages can point at its lines.
    index: int = field(default=-1, compare=False)


@dataclass(frozen=True)
class DnsConfig:
    nameservers: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    trust_ad_from: list[str] = field(default_factory=list)
    # Unbound's own upstream timeouts are around 3-5 s before it answers SERVFAIL; 5 s lets
    # it finish and still bounds the handshake.
    timeout: float = 5.0
    # DESIGN §2.1 item 5: a name that must come back with AD.  The root is signed and every
    # validating resolver has its trust anchor, so "." proves validation anywhere.
    probe: str = "."
    # DESIGN §3.4: how long a resolver outage may last before open streams whose evidence
    # expired are re-judged closed.  5 minutes rides out a resolver restart or a brief
    # upstream blip without tearing every stream down, and is still short against the hours
    # a withdrawn TLSA record would otherwise keep a stream alive.
    reverify_grace: float = 300.0


@dataclass(frozen=True)
class PolicyConfig:
    dir: str = "/etc/xmpp-dane-proxy/policy.d"
    ca_file: str = ""


@dataclass(frozen=True)
class LimitsConfig:
    # 256 KiB per stanza: ejabberd's and xmpp-proxy's default max_stanza_size.
    max_stanza_bytes: int = 262144
    # 30 s: Prosody's and ejabberd's default for negotiating a stream before it is dropped.
    # It runs from accept until the backend confirms the first domain pair (DESIGN §3.1).
    handshake_timeout: float = 30.0
    # Seconds without a byte from an authenticated peer; 0 = off (the default), because S2S
    # streams legitimately sit idle for hours and both Prosody and ejabberd already close idle
    # s2s streams themselves (ejabberd's s2s_timeout is 10 min; Prosody pings and closes).
    idle_timeout: float = 0.0
    max_connections: int = 10000
    # Connections not yet authenticated; 0 = max_connections // 4 (proxy/admission.py says why).
    max_unauthenticated: int = 0


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9269"


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True)
class Config:
    """The whole configuration; `path` is where it came from (for messages)."""

    server: ServerConfig = field(default_factory=ServerConfig)
    inbound: InboundConfig = field(default_factory=InboundConfig)
    outbound: OutboundConfig = field(default_factory=OutboundConfig)
    domains: list[DomainConfig] = field(default_factory=list)
    dns: DnsConfig = field(default_factory=DnsConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    path: str = ""

    def domain(self, name: str) -> DomainConfig | None:
        """The local domain entry for `name`, or None if the backend does not serve it."""
        wanted = normalise_domain(name)
        return next((d for d in self.domains if d.name == wanted), None)


# --- value checkers: each returns the converted value or raises ValueError -------------------

def _not_a_string(v: Any) -> str:
    # TOML reads `tls_min_version = 1.2` or `level = 1` as a number; say so, with the fix.
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"must be a string: {v!r} is a number (write it in quotes: \"{v!r}\")"
    return "must be a string"


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(_not_a_string(v))
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


def _positive_number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise ValueError("must be a positive number")
    return float(v)


def _non_negative_number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != v or v == float("inf"):
        raise ValueError("must be a finite number >= 0")
    return float(v)


def _non_negative_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError("must be an integer >= 0")
    return v


def _positive_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError("must be a positive integer")
    return v


def _workers(v: Any) -> int:
    # More worker processes than MAX_WORKERS is a typo, not a machine: each one holds its
    # own TLS contexts, DNS cache and file descriptors.
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_WORKERS:
        raise ValueError(f"must be an integer from 0 (one per CPU) to {MAX_WORKERS}")
    return v


def _list_of(check: Callable[[Any], Any]) -> Callable[[Any], list]:
    def inner(v: Any) -> list:
        if not isinstance(v, list):
            raise ValueError("must be a list")
        return [check(x) for x in v]
    return inner


def _listen(v: Any) -> str:
    parse_hostport(_str(v))
    return v


def _backend(v: Any) -> str:
    v = _str(v)
    if v.startswith("unix:"):
        if len(v) == 5:
            raise ValueError("unix: needs a socket path")
        return v
    parse_hostport(v)
    return v


def _probe_name(v: Any) -> str:
    # No way to switch the probe off: without it a non-validating resolver silently turns
    # DANE off (DESIGN §2.1 item 5).
    from policy.dns import name_text, to_dns_name

    if _str(v).strip() == "":
        raise ValueError('must be a DNSSEC-signed name such as "."')
    return name_text(to_dns_name(v))


def _nameserver(v: Any) -> str:
    parse_hostport(_str(v), default_port=53)
    return v


def _optional_listen(v: Any) -> str:
    return v if _str(v) == "" else _listen(v)


def _one_of(*choices: str) -> Callable[[Any], str]:
    def inner(v: Any) -> str:
        if not isinstance(v, str):
            raise ValueError(f"{_not_a_string(v)}, one of {', '.join(choices)}")
        if v not in choices:
            raise ValueError(f"{v!r} is not one of {', '.join(choices)}")
        return v
    return inner


_SCHEMA: dict[str, tuple[type, dict[str, Callable[[Any], Any]]]] = {
    "server": (ServerConfig, {"workers": _workers}),
    "inbound": (InboundConfig, {"listen": _list_of(_listen), "backend": _backend,
                                "proxy_protocol": _bool, "websocket_listen": _list_of(_listen),
                                "sasl_external": _bool}),
    "outbound": (OutboundConfig, {"listen": _list_of(_listen)}),
    "dns": (DnsConfig, {"nameservers": _list_of(_nameserver), "trust_ad_from": _list_of(_str),
                        "timeout": _positive_number, "probe": _probe_name,
                        "reverify_grace": _non_negative_number}),
    "policy": (PolicyConfig, {"dir": _str, "ca_file": _str}),
    "limits": (LimitsConfig, {"max_stanza_bytes": _positive_int, "handshake_timeout": _positive_number,
                              "idle_timeout": _non_negative_number, "max_connections": _positive_int,
                              "max_unauthenticated": _non_negative_int}),
    "metrics": (MetricsConfig, {"listen": _optional_listen}),
    "log": (LogConfig, {"level": _one_of("debug", "info", "warning", "error"),
                        "format": _one_of("text", "json")}),
}
_DOMAIN_KEYS = {"name": _str, "cert": _str, "key": _str, "next_cert": _str, "next_key": _str}
_DOMAIN_REQUIRED = ("name", "cert", "key")


def load_config(path: str | Path) -> Config:
    """Read and check the configuration file; raises ConfigError listing every problem."""
    try:
        doc = TomlDocument.read(path)
    except TomlFileError as exc:
        raise ConfigError(exc.messages) from None
    return config_from_document(doc)


def config_from_document(doc: TomlDocument) -> Config:
    """The checked configuration of a parsed file; ConfigError listing every problem."""
    cfg, errors = config_and_errors(doc)
    if errors:
        raise ConfigError(errors)
    return cfg


def config_and_errors(doc: TomlDocument) -> tuple[Config, list[str]]:
    """Every problem of a parsed file, and the configuration with each bad value left at its
    default (for `check-config`, which goes on to check policies and certificates)."""
    errors: list[str] = []
    sections: dict[str, Any] = {}
    base = Path(doc.path).parent
    for name, value in doc.data.items():
        if name == "domain":
            continue
        if name not in _SCHEMA:
            errors.append(f"{doc.where(None, name)}: unknown section [{name}] "
                          f"(known: {', '.join([*_SCHEMA, 'domain'])})")
            continue
        if not isinstance(value, dict):
            errors.append(f"{doc.where(name)}: {name} must be a [{name}] table")
            continue
        cls, keys = _SCHEMA[name]
        kwargs = {}
        for key, raw in value.items():
            if key not in keys:
                errors.append(f"{doc.where(key, name)}: unknown key {name}.{key} (known: {', '.join(keys)})")
                continue
            try:
                kwargs[key] = keys[key](raw)
            except ValueError as exc:
                errors.append(f"{doc.where(key, name)}: {name}.{key} {exc}")
        sections[name] = cls(**kwargs)
    domains = _domains(doc, base, errors)
    inbound, outbound = sections.get("inbound", InboundConfig()), sections.get("outbound", OutboundConfig())
    if inbound.sasl_external and not outbound.listen:
        # DESIGN §3.3: the backend checks the proxy's dialback keys through its outbound S2S,
        # which only this proxy's outbound side (same secret) can answer.
        errors.append(f"{doc.where('sasl_external', 'inbound')}: inbound.sasl_external = true needs "
                      f"outbound.listen: the backend checks the keys the proxy gives it through its outbound "
                      f"S2S, which only this proxy's outbound side can answer (peers would be refused); "
                      f"set outbound.listen or remove sasl_external")
    pol = sections.get("policy", PolicyConfig())
    sections["policy"] = PolicyConfig(
        dir=str(base / pol.dir) if pol.dir else "",
        ca_file=str(base / pol.ca_file) if pol.ca_file else "",
    )
    return Config(domains=domains, path=doc.path, **sections), errors


def _domains(doc: TomlDocument, base: Path, errors: list[str]) -> list[DomainConfig]:
    raw = doc.data.get("domain", [])
    if not isinstance(raw, list):
        errors.append(f"{doc.where('domain')}: domain must be a [[domain]] array of tables")
        return []
    out: list[DomainConfig] = []
    for i, entry in enumerate(raw):
        where = doc.where(None, "domain", i)
        unknown = [k for k in entry if k not in _DOMAIN_KEYS]
        for k in unknown:
            errors.append(f"{doc.where(k, 'domain', i)}: unknown key domain.{k} (known: {', '.join(_DOMAIN_KEYS)})")
        missing = [k for k in _DOMAIN_REQUIRED if k not in entry]
        if missing:
            errors.append(f"{where}: [[domain]] needs {', '.join(missing)}")
            continue
        try:
            name, cert, key, next_cert, next_key = (_str(entry.get(k, "")) for k in _DOMAIN_KEYS)
        except ValueError:
            errors.append(f"{where}: [[domain]] {', '.join(_DOMAIN_KEYS)} must be strings")
            continue
        # Relative certificate paths are relative to the config file, as operators expect
        # from nginx/Prosody-style configs kept in one directory.
        out.append(DomainConfig(normalise_domain(name), str(base / cert), str(base / key),
                                str(base / next_cert) if next_cert else "",
                                str(base / next_key) if next_key else "", index=i))
    seen: set[str] = set()
    for d in out:
        if d.name in seen:
            errors.append(f"{doc.where('name', 'domain', d.index)}: domain {d.name!r} is configured twice")
        seen.add(d.name)
    return out
