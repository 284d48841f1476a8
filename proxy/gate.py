"""The gate as a table (DESIGN §3.1, deny by default): which first-level elements from a peer
may reach the backend in each stream state, and what anything else gets.

Pure data and one lookup, no I/O: `proxy.inbound_session.InboundSession` (every inbound listener:
STARTTLS, Direct TLS, WebSocket -- the WebSocket framing turns messages into the same byte
stream), `proxy.outbound_session.OutboundSession` (what the backend sends on the outbound
stream the proxy answers itself) and `proxy.outbound_auth.PeerAuthentication` (what a peer
sends back on a stream the proxy opened) ask `admit(stage, ns, name)` for every element and
act on the answer.

Elements are keyed by their expanded name (namespace URI, local name) as a namespace-aware
parser reads them -- which is how the backend reads them too (Prosody and ejabberd parse with
libexpat).  The namespace is the element's own, not the stream's default: a `<message>`
declaring `xmlns='jabber:client'` or `xmlns=''` is not a `jabber:server` stanza, whatever
the header said, and `<db:result xmlns:db='urn:other'>` is no dialback element.  Whatever is
not listed -- other dialback-namespace elements such as `<db:request>`, SASL but the `<auth/>`
the proxy answers itself (DESIGN §3.3), bidi, unknown namespaces -- is refused with a stream
error and never reaches the backend.
"""
from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from proxy.xmlstream import NS_DIALBACK, NS_SERVER, NS_STREAMS

NS_SM = "urn:xmpp:sm:3"           # XEP-0198 Stream Management
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"


class Stage(enum.Enum):
    """Where in its life a stream is, as far as the gate is concerned."""

    INBOUND_UNAUTHENTICATED = "inbound, no domain pair confirmed by the backend yet"
    INBOUND_AUTHENTICATED = "inbound, at least one domain pair confirmed by the backend"
    INBOUND_SASL_PENDING = "inbound, SASL EXTERNAL succeeded, the backend has not confirmed the pair yet"
    OUTBOUND_PEER = "outbound, what the peer sends back on a stream the proxy opened"
    OUTBOUND_BACKEND = "outbound, what the backend sends on the stream the proxy answers itself"


class Passage(enum.Enum):
    """How an admitted element passes.  Every value but RELAY has a check of its own."""

    JUDGE = "the asserted pair is judged by its policy before anything is relayed"   # <db:result>
    VERIFY = "addresses read once (DESIGN §2.6), 'to' must be ours; then relayed"  # <db:verify>
    STANZA = "'from'/'to' must be a pair the backend confirmed (DESIGN §3.1 step 5)"
    SASL = "answered by the proxy (SASL EXTERNAL, DESIGN §3.3), never relayed"
    ANSWER = "a dialback answer only for a question the backend asked on this stream"
    FEATURES = "relayed without <starttls/> and bidi (they are the proxy's business)"
    RELAY = "relayed as is"
    SWALLOW = "neither relayed nor refused"
    AUTHENTICATE = "the proxy authenticates the pair to the peer itself and answers (DESIGN §3.3)"
    CHECK_KEY = "answered by the proxy if the key is its own, else asked of the peer (DESIGN §3.3)"


@dataclass(frozen=True)
class Refusal:
    """A stream error for the peer; `why` completes the sentence "<element> ..."."""

    condition: str
    why: str


_STANZAS = ("message", "presence", "iq")
# XEP-0198 §3-§5, the elements an initiating entity sends on S2S: enable, resume, and the
# ack request/answer both sides send.  enabled/resumed/failed come from the receiving
# entity, which on an inbound stream is the backend.
_SM_FROM_INITIATOR = ("enable", "resume", "r", "a")
_SM_FROM_RECEIVER = ("enabled", "resumed", "failed", "r", "a")

_BEFORE_AUTH = "before any domain was authenticated"

# The table.  Before authentication (RFC 6120 §4.9.3.12 not-authorized for anything else):
# only dialback.  A stanza gets invalid-from (DESIGN §3.5: stanza from an unauthenticated
# domain).  The peer's parting <stream:error> is swallowed: the header is all a backend sees
# of a peer no domain was accepted for (DESIGN §3.1 step 3).
# SASL `<auth/>` is the proxy's to answer (DESIGN §3.3): the session offers EXTERNAL, judges
# it, and refuses it when not offered (policy-violation: RFC 6120 §6.4.6 allows one
# authentication per stream, and nothing else of SASL is ever relayed).
_SASL_OVER = Refusal("policy-violation", "is not passed to the backend: authentication on this stream is over "
                                         "(RFC 6120 §6.4.6)")
_INBOUND_UNAUTHENTICATED: dict[tuple[str, str], Passage | Refusal] = {
    (NS_DIALBACK, "result"): Passage.JUDGE,
    (NS_DIALBACK, "verify"): Passage.VERIFY,
    (NS_STREAMS, "error"): Passage.SWALLOW,
    (NS_SASL, "auth"): Passage.SASL,
    **{(NS_SERVER, name): Refusal("invalid-from", f"{_BEFORE_AUTH} (DESIGN §3.1 step 5)") for name in _STANZAS},
}
# After <success/> and the restart, before the backend confirmed the pair the proxy asserted
# for the peer: stanzas pass the STANZA check, which holds those of that pair (DESIGN §3.3).
_INBOUND_SASL_PENDING: dict[tuple[str, str], Passage | Refusal] = {
    (NS_DIALBACK, "result"): Passage.JUDGE,
    (NS_DIALBACK, "verify"): Passage.VERIFY,
    (NS_STREAMS, "error"): Passage.SWALLOW,
    (NS_SASL, "auth"): _SASL_OVER,
    **{(NS_SERVER, name): Passage.STANZA for name in _STANZAS},
}
_INBOUND_AUTHENTICATED: dict[tuple[str, str], Passage | Refusal] = {
    (NS_DIALBACK, "result"): Passage.JUDGE,
    (NS_DIALBACK, "verify"): Passage.VERIFY,
    (NS_STREAMS, "error"): Passage.RELAY,
    **{(NS_SERVER, name): Passage.STANZA for name in _STANZAS},
    **{(NS_SM, name): Passage.RELAY for name in _SM_FROM_INITIATOR},
    (NS_SASL, "auth"): _SASL_OVER,
}
# A stream the proxy opened carries the backend's traffic out; the peer only answers.  No
# stanzas: they would need bidi (XEP-0288), which the proxy withholds from both sides.
_OUTBOUND_PEER: dict[tuple[str, str], Passage | Refusal] = {
    (NS_STREAMS, "features"): Passage.FEATURES,
    (NS_STREAMS, "error"): Passage.RELAY,
    (NS_DIALBACK, "result"): Passage.ANSWER,
    (NS_DIALBACK, "verify"): Passage.ANSWER,
    # SASL EXTERNAL of the backend's domain (DESIGN §3.2), the peer's half of it.
    **{(NS_SASL, name): Passage.RELAY for name in ("challenge", "success", "failure")},
    **{(NS_SM, name): Passage.RELAY for name in _SM_FROM_RECEIVER},
    **{(NS_SERVER, name): Refusal(
        "unsupported-stanza-type",
        "on a stream the proxy opened: stanzas from the peer need bidi (XEP-0288), which is not offered")
       for name in _STANZAS},
}

# The backend's outbound stream is answered by the proxy (DESIGN §3.3): it asks for dialback
# (<db:result>, answered once the peer accepted the pair), checks keys (<db:verify>), and then
# sends stanzas, which go to the peer only for a pair answered valid.  Its parting
# <stream:error> ends the stream; the peer gets our own close.
_OUTBOUND_BACKEND: dict[tuple[str, str], Passage | Refusal] = {
    (NS_DIALBACK, "result"): Passage.AUTHENTICATE,
    (NS_DIALBACK, "verify"): Passage.CHECK_KEY,
    (NS_STREAMS, "error"): Passage.SWALLOW,
    **{(NS_SERVER, name): Passage.STANZA for name in _STANZAS},
}

GATE: Mapping[Stage, Mapping[tuple[str, str], Passage | Refusal]] = MappingProxyType({
    Stage.INBOUND_UNAUTHENTICATED: MappingProxyType(_INBOUND_UNAUTHENTICATED),
    Stage.INBOUND_AUTHENTICATED: MappingProxyType(_INBOUND_AUTHENTICATED),
    Stage.INBOUND_SASL_PENDING: MappingProxyType(_INBOUND_SASL_PENDING),
    Stage.OUTBOUND_PEER: MappingProxyType(_OUTBOUND_PEER),
    Stage.OUTBOUND_BACKEND: MappingProxyType(_OUTBOUND_BACKEND),
})
# Anything not in the table.  Before authentication RFC 6120 §4.9.3.12 (not-authorized: data
# before the stream is authenticated); afterwards §4.9.3.24 (unsupported-stanza-type: a
# first-level element the server does not support).
OTHERWISE: Mapping[Stage, Refusal] = MappingProxyType({
    Stage.INBOUND_UNAUTHENTICATED: Refusal("not-authorized", f"is not allowed {_BEFORE_AUTH}"),
    Stage.INBOUND_AUTHENTICATED: Refusal("unsupported-stanza-type", "is not passed to the backend (not in the gate's list)"),
    Stage.INBOUND_SASL_PENDING: Refusal("not-authorized", "is not allowed before the backend confirmed the domain"),
    Stage.OUTBOUND_PEER: Refusal("unsupported-stanza-type", "is not expected from the peer on a stream the proxy opened"),
    Stage.OUTBOUND_BACKEND: Refusal("unsupported-stanza-type",
                                    "is not passed to the peer (not in the gate's list for the outbound stream)"),
})


# The same tables as plain dicts for the lookup (it runs per stanza; read-only views above).
_LOOKUP = {stage: dict(table) for stage, table in GATE.items()}
_OTHERWISE = dict(OTHERWISE)


def admit(stage: Stage, ns: str, name: str) -> Passage | Refusal:
    """How the element `{ns}name` passes in `stage`, or the refusal it gets."""
    return _LOOKUP[stage].get((ns, name)) or _OTHERWISE[stage]


def describe(ns: str, name: str) -> str:
    """The element as a peer's operator would recognise it in an error text."""
    prefix = {NS_SERVER: "", NS_DIALBACK: "db:", NS_STREAMS: "stream:"}.get(ns)
    if prefix is not None:
        return f"<{prefix}{name}>"
    return f"<{name} xmlns='{ns}'>" if ns else f"<{name} xmlns=''>"


__all__ = ["GATE", "NS_SM", "OTHERWISE", "Passage", "Refusal", "Stage", "admit", "describe"]
