"""What the inbound session (`proxy.inbound_session.InboundSession`, sans-IO) asks its shell
(`proxy.inbound`) to do: values, performed in the order returned.

`SendToPeer` / `SendToBackend` carry bytes; `StartTls`, `ConnectBackend` and `CheckDialback`
start something whose result the shell feeds back (`tls_established`, `backend_connected`,
`verdict`, ...); `Negotiated`, `Authenticated`, `Note`, `PeerDone` and `PeerGrace` tell the
shell about the stream's progress (deadlines, logs, reading); `Close` ends the connection.
"""
from __future__ import annotations

from dataclasses import dataclass

# How a connection ended, for metrics (proxy/metrics.py CONNECTION_OUTCOMES): "ok" for a
# stream relayed until one side closed it, the stream error condition we sent, or one of
# tls-failed / closed-early / internal-error.  Conditions that have no series of their own
# are counted under the nearest one.
OUTCOMES = frozenset({
    "ok", "host-unknown", "policy-violation", "not-authorized", "invalid-from", "not-well-formed",
    "restricted-xml", "connection-timeout", "remote-connection-failed", "system-shutdown",
    "tls-failed", "closed-early", "over-limit", "resource-constraint", "internal-error",
})


@dataclass(frozen=True)
class SendToPeer:
    data: bytes


@dataclass(frozen=True)
class SendToBackend:
    data: bytes


@dataclass(frozen=True)
class StartTls:
    """Hand the peer connection to TLS (server side).  `prefix`: bytes already read that
    belong to the handshake.  `server_name`: the stream's `to` (None for Direct TLS)."""

    server_name: str | None
    prefix: bytes
    direct: bool


@dataclass(frozen=True)
class ConnectBackend:
    """Open the backend connection; answer with `backend_connected` or `backend_failed`."""


@dataclass(frozen=True)
class Negotiated:
    """The stream is up (TLS, restarted header, backend).  Informational: the handshake
    timeout runs on until `Authenticated` (DESIGN §3.1 Deadlines)."""


@dataclass(frozen=True)
class Authenticated:
    """The backend confirmed the first domain pair (`<db:result type='valid'>`): the handshake
    timeout ends here, `limits.idle_timeout` starts, and the connection no longer counts
    against `limits.max_unauthenticated`."""


@dataclass(frozen=True)
class CheckDialback:
    """Judge `sender`'s policy against the peer's certificate; answer with `verdict()`."""

    sender: str
    target: str


@dataclass(frozen=True)
class Note:
    """A line for the operator's log: `event` names it, `reason` says what happened (at
    warning level when it is something to fix, e.g. a backend that refuses the proxy's
    dialback keys)."""

    event: str
    reason: str
    warning: bool = False


@dataclass(frozen=True)
class PeerDone:
    """The peer ended its stream; stop reading it and wait for the backend to finish."""


@dataclass(frozen=True)
class PeerGrace:
    """The backend's side of the stream is over; the peer may still be sending.  Call
    `grace_over()` once the peer has sent nothing for `quiet` seconds (None: never mind) or
    `limit` seconds have passed, whichever is first (RFC 6120 §4.4 bounds this wait)."""

    quiet: float | None
    limit: float


@dataclass(frozen=True)
class Close:
    """Close both connections (everything to send was sent by the actions before this).
    `condition`: the stream error sent to the peer, if any; `reason`: for the log;
    `outcome`: how the connection ended, as the metrics count it (see `OUTCOMES`)."""

    reason: str
    condition: str | None = None
    outcome: str = "ok"


Action = (SendToPeer | SendToBackend | StartTls | ConnectBackend | Negotiated | Authenticated | CheckDialback
          | Note | PeerDone | PeerGrace | Close)


__all__ = [
    "Action", "Authenticated", "CheckDialback", "Close", "ConnectBackend", "Negotiated", "OUTCOMES", "PeerDone",
    "Note", "PeerGrace", "SendToBackend", "SendToPeer", "StartTls",
]
