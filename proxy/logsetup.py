"""Logging set-up from `[log]` (DESIGN §6): logfmt for `format = "text"`, JSON lines for `"json"`.

Both formats carry the same keys, one record per line (a traceback becomes one escaped value,
so `grep`, journald and log shippers never see a record split over lines):

    ts=2025-01-31T12:00:00.123Z level=info logger=xmpp_dane_proxy.decision event=decision ...
    {"ts": "2025-01-31T12:00:00.123Z", "level": "info", "logger": "...", "event": "decision", ...}

Structured fields travel in `extra={"fields": {...}}`; `log_decision` is the one line per
trust decision that DESIGN §6 specifies.  Under systemd the journal timestamps every line
itself, so `ts` is left out there (`$JOURNAL_STREAM` names our stderr).

Private keys must never reach a log.  Nothing logs them on purpose; but an exception raised
while loading a key (ours or a library's) could quote the file, so every formatted record,
traceback included, passes through `redact_secrets` before it is written.
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

DECISION_LOGGER = "xmpp_dane_proxy.decision"
# Keys every line of this process carries, after `logger` (a worker process's `worker=N`,
# proxy/worker_main.py), so the lines of N workers sharing one journal stay apart.
_PROCESS_FIELDS: dict[str, Any] = {}
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# A PEM private key block — PKCS#8, encrypted PKCS#8, PKCS#1 RSA, SEC1 EC, OpenSSH, ... — in
# plain text or inside a bytes repr (where newlines appear as "\n").  A block cut short (no
# END line, e.g. a truncated file quoted in an error) is redacted up to where base64 stops.
_PEM_KEY = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY)-----"
    r"(?:.*?-----END [A-Z0-9 ]*PRIVATE KEY-----|(?:[A-Za-z0-9+/=:,\- \t\r\n]|\\[nrt])*)",
    re.DOTALL,
)
_BARE = re.compile(r"^[^\s\"=\\\x00-\x1f\x7f]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def redact_secrets(text: str) -> str:
    """`text` with every PEM private key block replaced by a marker."""
    if "-----BEGIN " not in text:   # what every block starts with: most lines need no regex
        return text
    return _PEM_KEY.sub(lambda m: f"[{m.group(1).lower()} redacted]", text)


def _logfmt_uncached(text: str) -> str:
    if text and _BARE.match(text):
        return text
    escaped = (text.replace("\\", "\\\\").replace('"', '\\"')
               .replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t"))
    escaped = _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", escaped)
    return f'"{escaped}"'


# Short values (directions, verdicts, domains, outcomes) recur on line after line: rendered
# once (a line's values cost ~4 of its ~11 µs, issue 13).  Long ones (reasons, tracebacks)
# rarely recur and are not kept.  A small cache suffices: the recurring values are used on
# every line and stay; one-off ones (timestamps, peer ports) pass through it.
_CACHED_VALUE_CHARS = 96
_logfmt_text = functools.lru_cache(maxsize=128)(_logfmt_uncached)


def logfmt_value(value: Any) -> str:
    """A logfmt value: bare if it can be, else double-quoted with `\\`, `"` and controls escaped."""
    text = "-" if value is None else str(value)
    if len(text) <= _CACHED_VALUE_CHARS:
        return _logfmt_text(text)
    return _logfmt_uncached(text)


_NOT_KEY = re.compile(r"[^A-Za-z0-9_.-]")


@functools.lru_cache(maxsize=256)   # the same few dozen keys on every line
def _key(name: str) -> str:
    return _NOT_KEY.sub("_", name) or "_"


@functools.lru_cache(maxsize=4)     # lines come in bursts within one second
def _second(seconds: int) -> str:
    return _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.")


class _StructuredFormatter(logging.Formatter):
    """Collects the keys of a record; subclasses render them."""

    def __init__(self, *, timestamps: bool = True) -> None:
        super().__init__()
        self.timestamps = timestamps

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.timestamps:
            seconds = int(record.created)
            out["ts"] = f"{_second(seconds)}{int((record.created - seconds) * 1000):03d}Z"
        out["level"] = record.levelname.lower()
        out["logger"] = record.name
        out.update(_PROCESS_FIELDS)
        extra = getattr(record, "fields", None) or {}
        message = record.getMessage()
        # A structured record's message is usually its event name; do not repeat it.
        if message and message != extra.get("event"):
            out["msg"] = message
        for k, v in extra.items():
            out.setdefault(_key(str(k)), v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return out


class LogfmtFormatter(_StructuredFormatter):
    """`key=value` pairs on one line (the format of Heroku's logfmt, read by Loki, Grafana, …)."""

    def format(self, record: logging.LogRecord) -> str:
        line = " ".join(f"{k}={logfmt_value(v)}" for k, v in self.fields(record).items())
        return redact_secrets(line)


class JsonFormatter(_StructuredFormatter):
    """One JSON object per line, same keys as the logfmt format."""

    def format(self, record: logging.LogRecord) -> str:
        obj = {k: (v if isinstance(v, (int, float, bool)) or v is None else str(v))
               for k, v in self.fields(record).items()}
        # Redact before encoding too: json.dumps escapes newlines, which the pattern handles,
        # but redacting the values keeps the marker readable.
        obj = {k: redact_secrets(v) if isinstance(v, str) else v for k, v in obj.items()}
        return redact_secrets(json.dumps(obj, ensure_ascii=False))


def _journal_is_stderr(stream: TextIO) -> bool:
    # systemd.exec(5): $JOURNAL_STREAM is "DEVICE:INODE" of the journal stream connected to
    # stdout/stderr; if it is our stream, the journal adds timestamps already.
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def configure_logging(level: str = "info", fmt: str = "text", *, stream: TextIO | None = None,
                      timestamps: bool | None = None) -> logging.Handler:
    """Install (or replace, on reload) the proxy's log handler on the root logger.

    `level` and `fmt` are `cfg.log.level` / `cfg.log.format`.  Other libraries' records go
    through the same handler and format.  Returns the handler.
    """
    if level not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    if fmt not in ("text", "json"):
        raise ValueError(f"log format {fmt!r} is not text or json")
    stream = sys.stderr if stream is None else stream
    if timestamps is None:
        timestamps = not _journal_is_stderr(stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(timestamps=timestamps) if fmt == "json"
                         else LogfmtFormatter(timestamps=timestamps))
    handler._xmpp_dane_proxy = True  # type: ignore[attr-defined]  # marks ours for replacement
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_xmpp_dane_proxy", False)]:
        root.removeHandler(old)
        old.close()     # StreamHandler.close() leaves the stream itself open
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    # Neither format shows the caller's file and line, so logging need not look them up for
    # each record (the Logging HOWTO's "Optimization": ~6 µs of ~25 per line, two lines per
    # stream, issue 13).
    logging._srcfile = None  # type: ignore[attr-defined]
    return handler


def set_process_fields(**fields: Any) -> None:
    """Add `fields` to every line this process logs from now on (both formats)."""
    _PROCESS_FIELDS.update(fields)


def format_peer(peer: str | tuple | None) -> str:
    """`IP:PORT` (`[v6]:PORT`) from a socket address tuple; strings pass through."""
    if peer is None:
        return "-"
    if isinstance(peer, str):
        return peer
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def log_decision(direction: str, peer: str | tuple | None, domain: str,
                 verdict_fields: Mapping[str, str], *, logger: logging.Logger | None = None,
                 **extra: Any) -> None:
    """Log one trust decision at info (DESIGN §6): `event=decision direction= peer= domain=
    verdict= prooftype= record= reason=`.  `verdict_fields` is `Verdict.log_fields()`;
    `extra` keys (e.g. `policy=`) follow them."""
    fields: dict[str, Any] = {"event": "decision", "direction": direction,
                              "peer": format_peer(peer), "domain": domain or "-"}
    for k in ("verdict", "prooftype", "record", "reason"):
        fields[k] = verdict_fields.get(k, "-")
    for k, v in verdict_fields.items():
        fields.setdefault(k, v)
    fields.update(extra)
    (logger or logging.getLogger(DECISION_LOGGER)).info("decision", extra={"fields": fields})


def log_event(logger: logging.Logger, level: int, event: str, *, exc_info: bool = False,
              **fields: Any) -> None:
    """One structured line `event=EVENT key=value…` (logfmt or JSON by `log.format`)."""
    logger.log(level, event, exc_info=exc_info, extra={"fields": {"event": event, **fields}})
