"""Stream error conditions (RFC 6120 §4.9.3) and the exception that carries one.

A stream error is fatal for the XML stream: the entity that detects it sends
`<stream:error>` with one defined condition, closes the stream and the TCP connection
(RFC 6120 §4.9.1.1).  DESIGN §3.3 lists which condition the proxy uses for what, and
requires a `<text>` with the reason on every one of them.
"""
from __future__ import annotations

# RFC 6120 §4.9.3: the defined conditions.  A condition outside this set is a programming
# error, not something to send to a peer.
CONDITIONS = frozenset({
    "bad-format", "bad-namespace-prefix", "conflict", "connection-timeout", "host-gone",
    "host-unknown", "improper-addressing", "internal-server-error", "invalid-from",
    "invalid-namespace", "invalid-xml", "not-authorized", "not-well-formed",
    "policy-violation", "remote-connection-failed", "reset", "resource-constraint",
    "restricted-xml", "see-other-host", "system-shutdown", "undefined-condition",
    "unsupported-encoding", "unsupported-feature", "unsupported-stanza-type",
    "unsupported-version",
})


class StreamError(Exception):
    """A stream-level failure: `condition` is an RFC 6120 §4.9.3 condition, `text` the reason."""

    def __init__(self, condition: str, text: str) -> None:
        if condition not in CONDITIONS:
            raise ValueError(f"{condition!r} is not an RFC 6120 §4.9.3 stream error condition")
        super().__init__(f"{condition}: {text}")
        self.condition = condition
        self.text = text
