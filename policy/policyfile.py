"""Per-peer-domain policy files (DESIGN §2.4).

`policy.d/<domain>.toml` applies to one peer domain, `policy.d/*.<parent>.toml` to every
subdomain of parent, `policy.d/default.toml` to everyone else; the most specific file wins.
Loading is all-or-nothing: every file is parsed and checked first, and a single problem anywhere
raises `PolicyError` listing each problem as `file:line: message`, so a reload never swaps in a
half-read policy.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from policy import tlsa
from policy.pkix_names import normalise_domain
from policy.tlsa import TlsaRecord, TlsaSyntaxError, parse_tlsa
from policy.tomlfile import TomlDocument, TomlFileError

REQUIRE_MODES = ("dane", "dane-or-pkix", "pkix", "posh", "tls", "block")
TRANSPORTS = ("tcp", "websocket")
DANE_USE_NAMES = {"PKIX-TA": tlsa.PKIX_TA, "PKIX-EE": tlsa.PKIX_EE,
                  "DANE-TA": tlsa.DANE_TA, "DANE-EE": tlsa.DANE_EE}
TLS_VERSIONS = ("1.2", "1.3")
# DESIGN §2.4's built-in default.  PKIX-TA/PKIX-EE are off: RFC 7672 §3.1 notes that they add
# CA dependence for no gain in S2S, and most DANE S2S deployments (and Prosody) ignore them.
DEFAULT_REQUIRE = "dane-or-pkix"
DEFAULT_DANE_USES = frozenset({tlsa.DANE_TA, tlsa.DANE_EE})
# TLS 1.2 is the floor RFC 7590 §3.1 / RFC 9325 §3.1.1 set for XMPP.
DEFAULT_TLS_MIN = "1.2"
_KNOWN_KEYS = ("require", "dane_uses", "tls_min_version", "tlsa", "srv", "posh", "transports")


class PolicyError(TomlFileError):
    """A policy file (or the policy directory) is wrong; `.messages` has `file:line: message`."""


@dataclass(frozen=True)
class SrvRecord:
    """A static SRV record from a policy file: `priority weight port target`."""

    priority: int
    weight: int
    port: int
    target: str

    def __str__(self) -> str:
        return f"{self.priority} {self.weight} {self.port} {self.target}."


@dataclass(frozen=True)
class Policy:
    """What a peer domain must prove; `source` names the file it came from."""

    require: str = DEFAULT_REQUIRE
    dane_uses: frozenset[int] = DEFAULT_DANE_USES
    tls_min_version: str = DEFAULT_TLS_MIN
    tlsa: tuple[TlsaRecord, ...] = ()
    srv: tuple[SrvRecord, ...] = ()
    # RFC 7711 POSH: a match counts wherever PKIX would (`require = "posh"` demands one).
    # Off by default: it trusts the peer's HTTPS host, which PKIX already has to trust.
    posh: bool = False
    # How outbound streams may reach the peer; XEP-0468 WebSocket only when listed.
    transports: tuple[str, ...] = ("tcp",)
    source: str = "built-in default"


BUILTIN_DEFAULT = Policy()


def parse_dane_uses(values: Iterable[str]) -> frozenset[int]:
    """Names as in DESIGN §2.4 (`DANE-EE`…), case-insensitive; ValueError names a bad one."""
    out = set()
    for v in values:
        if not isinstance(v, str) or v.upper() not in DANE_USE_NAMES:
            raise ValueError(f"unknown TLSA usage {v!r} (expected {', '.join(DANE_USE_NAMES)})")
        out.add(DANE_USE_NAMES[v.upper()])
    return frozenset(out)


def _parse_srv(text: str) -> SrvRecord:
    parts = text.split()
    if len(parts) != 4 or not all(p.isdigit() for p in parts[:3]):
        raise ValueError(f"SRV {text!r} must be 'priority weight port target'")
    prio, weight, port = (int(p) for p in parts[:3])
    if prio > 65535 or weight > 65535 or not 0 < port <= 65535:
        raise ValueError(f"SRV {text!r}: priority/weight 0-65535, port 1-65535")
    return SrvRecord(prio, weight, port, normalise_domain(parts[3]))


def parse_policy_document(doc: TomlDocument) -> Policy:
    """Check and convert one parsed policy file; raises PolicyError with every problem."""
    errors: list[str] = []
    data = doc.data
    for key in data:
        if key not in _KNOWN_KEYS:
            errors.append(f"{doc.where(key)}: unknown key {key!r} (known: {', '.join(_KNOWN_KEYS)})")
    kwargs: dict = {"source": doc.path}

    def bad(key: str, message: str) -> None:
        errors.append(f"{doc.where(key)}: {key}: {message}")

    if "require" in data:
        if _is_number(data["require"]):
            bad("require", _number_for_string(data["require"], REQUIRE_MODES))
        elif data["require"] not in REQUIRE_MODES:
            bad("require", f"{data['require']!r} is not one of {', '.join(REQUIRE_MODES)}")
        else:
            kwargs["require"] = data["require"]
    if "dane_uses" in data:
        value = data["dane_uses"]
        if not isinstance(value, list):
            bad("dane_uses", "must be a list such as [\"DANE-EE\", \"DANE-TA\"]")
        else:
            try:
                kwargs["dane_uses"] = parse_dane_uses(value)
            except ValueError as exc:
                bad("dane_uses", str(exc))
    if "tls_min_version" in data:
        if _is_number(data["tls_min_version"]):
            bad("tls_min_version", _number_for_string(data["tls_min_version"], TLS_VERSIONS))
        elif data["tls_min_version"] not in TLS_VERSIONS:
            bad("tls_min_version", f"{data['tls_min_version']!r} is not one of {', '.join(TLS_VERSIONS)}")
        else:
            kwargs["tls_min_version"] = data["tls_min_version"]
    if "posh" in data:
        if not isinstance(data["posh"], bool):
            bad("posh", "must be true or false")
        else:
            kwargs["posh"] = data["posh"]
    if "transports" in data:
        value = data["transports"]
        if not isinstance(value, list) or not value or any(v not in TRANSPORTS for v in value):
            bad("transports", f"must be a non-empty list of {', '.join(map(repr, TRANSPORTS))}")
        else:
            kwargs["transports"] = tuple(dict.fromkeys(value))
    for key, parse in (("tlsa", _parse_static_tlsa), ("srv", _parse_srv)):
        if key not in data:
            continue
        if not isinstance(data[key], list) or not all(isinstance(v, str) for v in data[key]):
            bad(key, "must be a list of strings")
            continue
        try:
            kwargs[key] = tuple(parse(v) for v in data[key])
        except ValueError as exc:
            bad(key, str(exc))
    if "tlsa" in kwargs:
        # A static record of a usage this file's dane_uses disables is never used: with
        # require = "dane" the peer could never be accepted.  Almost surely a mistake.
        uses = kwargs.get("dane_uses", DEFAULT_DANE_USES)
        names = {v: k for k, v in DANE_USE_NAMES.items()}
        for rec in kwargs["tlsa"]:
            if rec.usage not in uses:
                bad("tlsa", f"record '{rec}' has usage {names[rec.usage]} ({rec.usage}), which dane_uses "
                            f"disables ({', '.join(names[u] for u in sorted(uses)) or 'none'}): it would never "
                            f"be used; add {names[rec.usage]!r} to dane_uses or change the record")
    if errors:
        raise PolicyError(errors)
    return Policy(**kwargs)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number_for_string(value: object, choices: Iterable[str]) -> str:
    # TOML reads `tls_min_version = 1.2` as a float: name the type, not just the value,
    # or the message reads "1.2 is not one of 1.2, 1.3".
    return (f"{value!r} is a number, but a string is expected: write it in quotes (\"{value!r}\"); "
            f"one of {', '.join(choices)}")


def _parse_static_tlsa(text: str) -> TlsaRecord:
    # A static record is the operator's own statement: unlike a record found in DNS, a
    # malformed one is a configuration error, not a record to skip.
    try:
        rec = parse_tlsa(text)
    except TlsaSyntaxError as exc:
        raise ValueError(str(exc)) from None
    why = tlsa.unusable_reason(rec, DANE_USE_NAMES.values())
    if why:
        raise ValueError(f"TLSA {text!r}: {why}")
    return rec


def _policy_files(root: Path) -> tuple[list[Path], list[str]]:
    """The `*.toml` files of the policy directory, and the problems met listing them.

    Fail closed: a directory or file that exists but cannot be read is an error, never an
    absent file (`Path.glob` silently skips a directory it may not read, and a `block` file
    there would stop applying).  A `*.toml` entry that is not a regular file (a FIFO would
    hang the read; a dangling symlink is a file that went missing) is an error too.
    """
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return [], [f"{root}:0: policy directory does not exist"]
    except NotADirectoryError:
        return [], [f"{root}:0: policy directory is not a directory"]
    except OSError as exc:
        return [], [f"{root}:0: policy directory cannot be read: {exc.strerror or exc}"]
    paths: list[Path] = []
    errors: list[str] = []
    for name in names:
        if not name.endswith(".toml"):
            continue
        path = root / name
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            errors.append(f"{path}:0: policy file cannot be read: {exc.strerror or exc}")
            continue
        if not stat.S_ISREG(mode):
            errors.append(f"{path}:0: policy file is not a regular file")
            continue
        paths.append(path)
    return paths, errors


@dataclass(frozen=True)
class PolicySet:
    """All loaded policy files; `for_domain` picks the most specific one."""

    exact: dict[str, Policy] = field(default_factory=dict)
    wildcard: dict[str, Policy] = field(default_factory=dict)   # parent domain -> policy
    default: Policy = BUILTIN_DEFAULT
    directory: str | None = None

    @classmethod
    def load(cls, directory: str | Path | None) -> "PolicySet":
        """Load every `*.toml` in `directory`; None means the built-in default only."""
        if directory is None or str(directory) == "":
            return cls()
        root = Path(directory)
        paths, errors = _policy_files(root)
        exact: dict[str, Policy] = {}
        wildcard: dict[str, Policy] = {}
        default = BUILTIN_DEFAULT
        for path in paths:
            stem = path.name[: -len(".toml")]
            try:
                pol = parse_policy_document(TomlDocument.read(path))
            except TomlFileError as exc:
                errors.extend(exc.messages)
                continue
            if stem == "default":
                default = pol
            elif stem.startswith("*."):
                wildcard[normalise_domain(stem[2:])] = pol
            elif "*" in stem or not stem:
                errors.append(f"{path}:0: file name must be <domain>.toml, *.<parent>.toml or default.toml")
            else:
                exact[normalise_domain(stem)] = pol
        if errors:
            raise PolicyError(errors)
        return cls(exact, wildcard, default, str(root))

    def for_domain(self, domain: str) -> Policy:
        """The most specific policy for peer `domain`: exact, then nearest `*.parent`, then default."""
        d = normalise_domain(domain)
        if d in self.exact:
            return self.exact[d]
        labels = d.split(".")
        for i in range(1, len(labels)):
            parent = ".".join(labels[i:])
            if parent in self.wildcard:
                return self.wildcard[parent]
        return self.default

    @property
    def files(self) -> int:
        return len(self.exact) + len(self.wildcard) + (self.default is not BUILTIN_DEFAULT)
