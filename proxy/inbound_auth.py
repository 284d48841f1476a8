"""Authentication at the proxy on an inbound stream (DESIGN §3.3), sans-IO: SASL EXTERNAL
judged by the proxy, dialback keys of its own towards the backend, and local answers to a
peer's verification of keys the proxy minted.

`proxy.inbound_session.InboundSession` owns the stream and performs the steps; this module
holds what is not stream plumbing: reading an `<auth/>` into the domain it asserts, the
per-stream SASL state (offered? which pair succeeded? stanzas held until the backend
confirms), and the dialback elements built from `proxy.dialback_keys.DialbackKeys`.

Why the proxy mints keys: once a certificate proved the peer's domain (DANE, PKIX, POSH),
dialback's reverse connection proves nothing more (XEP-0344 §2).  So the backend is asked to
accept the pair with a key only the proxy can vouch for; the backend's `<db:verify>` for it
leaves through `outbound.listen`, where the proxy's outbound side recognises its own key and
answers `valid` without a connection to the peer.  The backend needs no change.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from policy.domain_reading import DomainReadingError, read_domain
from proxy.dialback_keys import DialbackKeys
from proxy.s2s_auth import (
    EXTERNAL, NS_SASL, SaslError, db_result, mechanisms_feature, read_auth,
)
from proxy.xmlstream import Element

# Stanzas a peer sends between `<success/>` and the backend's confirmation are held, not
# refused: the peer rightly believes it is authenticated (RFC 6120 §6.4.6).  The backend
# answers within one round trip over loopback plus its own check of the key through the
# proxy's outbound side (milliseconds), so what arrives meanwhile is the peer's queue flushed
# on connecting: typically a handful of stanzas.  1000 stanzas or 1 MiB (four stanzas of the
# default limits.max_stanza_bytes) is far above that while keeping a peer from parking
# unbounded memory in the proxy (each held element costs its bytes plus ~0.5 KiB of objects);
# the handshake deadline bounds the time.  Over it the stream ends with a stream error.
MAX_HELD_STANZAS = 1000
MAX_HELD_BYTES = 1 << 20
# RFC 6120 §6.4.5: the receiving entity SHOULD allow "at least 2 and no more than 5" retries;
# after that the stream ends (policy-violation, §4.9.3.18, is the SHOULD).
MAX_SASL_FAILURES = 5

# What a peer's operator -- and ours, in the log -- reads when the backend refused the key the
# proxy presented on the peer's behalf: the usual cause is a backend whose outbound S2S does
# not go through the proxy, so nothing answers its verification of the proxy's key.
BACKEND_REFUSED_KEY = ("the backend did not accept the proxy's dialback key: does its outbound S2S go through "
                       "outbound.listen? see inbound.sasl_external")


def is_sasl_auth(element: Element) -> bool:
    """`<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>` (RFC 6120 §6.4.2)."""
    return element.name == "auth" and element.ns == NS_SASL


def certificate_proved(prooftype: str | None) -> bool:
    """Whether a verdict rested on the certificate (DANE, PKIX, POSH) rather than on dialback
    itself (`tls`: TLS without a certificate check, dialback being the proof)."""
    return prooftype is not None and prooftype != "tls"


def external_identity(auth: Element, stream_from: str | None) -> str:
    """The domain an `<auth mechanism='EXTERNAL'>` asserts, in its one reading (DESIGN §2.6).

    XEP-0178 §3 (RFC 6120 §6.3.8): the authorization identity is the sending domain, or empty,
    in which case the stream header's `from` is meant.  Both given and different is
    `invalid-authzid`.  `stream_from` is the header's `from` already in its one reading.
    Raises `SaslError` with the RFC 6120 §6.5 condition and a reason."""
    request = read_auth(auth)
    if request.mechanism != EXTERNAL:
        raise SaslError("invalid-mechanism", f"mechanism {request.mechanism[:40]!r} is not offered; "
                                             "this server offers EXTERNAL only")
    if request.authzid is None:
        if stream_from is None:
            raise SaslError("not-authorized", "no identity to authenticate: the <auth/> carries no authorization "
                                              "identity and the stream header no 'from' (XEP-0178 §3)")
        return stream_from
    if "@" in request.authzid or "/" in request.authzid:
        raise SaslError("invalid-authzid", f"the authorization identity {request.authzid[:80]!r} is not a bare "
                                           "domain (XEP-0178 §3: a server authenticates as its domain)")
    try:
        domain = read_domain(request.authzid)
    except DomainReadingError as exc:
        raise SaslError("invalid-authzid", f"the authorization identity: {exc}") from None
    if stream_from is not None and domain != stream_from:
        raise SaslError("invalid-authzid", f"the authorization identity {domain} differs from the stream "
                                           f"header's 'from' {stream_from} (XEP-0178 §3)")
    return domain


def with_mechanisms(features: bytes, offer: bytes) -> bytes:
    """`features` (a `<stream:features>` element's bytes, any prefix, possibly empty-element
    form) with `offer` appended as its last child, the rest byte-exact."""
    end_of_start = _end_of_start_tag(features)
    if features[end_of_start - 2:end_of_start] == b"/>" and end_of_start == len(features.rstrip()):
        qname = features[1:].split(None, 1)[0].split(b"/", 1)[0].split(b">", 1)[0]
        return features[:end_of_start - 2] + b">" + offer + b"</" + qname + b">"
    close = features.rfind(b"</")
    return features[:close] + offer + features[close:]


def _end_of_start_tag(raw: bytes) -> int:
    """Offset just past the start tag's '>' (a '>' inside a quoted attribute value is text)."""
    quote = 0
    for i, byte in enumerate(raw):
        if quote:
            if byte == quote:
                quote = 0
        elif byte in (0x22, 0x27):
            quote = byte
        elif byte == 0x3E:
            return i + 1
    return len(raw)


def proxy_db_result(keys: DialbackKeys, sender: str, target: str, backend_stream_id: str) -> bytes:
    """The `<db:result>` the proxy sends the backend for the pair `sender` -> `target` (one
    reading each), with the key it mints for the backend's stream (XEP-0185 §3: bound to both
    domains and the stream id the backend -- the receiving server -- gave)."""
    key = keys.mint(receiving=target, originating=sender, stream_id=backend_stream_id)
    return db_result(sender, target, key)


@dataclass(slots=True)   # one per stream, for its life (issue 13, memory per idle stream)
class ExternalAuth:
    """One inbound stream's SASL EXTERNAL, the proxy's side (RFC 6120 §6, XEP-0178).

    `offerable`: the peer presented a client certificate on a TCP stream and the operator lets
    the proxy offer EXTERNAL (`inbound.sasl_external`).  `offered` once the features carrying
    it went out.  After `<success/>`, `pair` is (peer, local), `awaiting_restart` until the
    peer's new header, and stanzas of the pair wait in `held` until the backend confirms."""

    offerable: bool = False
    offered: bool = False
    pair: tuple[str, str] | None = None
    confirmed: bool = False
    awaiting_restart: bool = False
    failures: int = 0
    held: list = field(default_factory=list)   # appended, then taken whole (an empty deque is 0.7 KiB)
    held_bytes: int = 0

    @property
    def pending(self) -> bool:
        """Succeeded towards the peer, not yet confirmed by the backend."""
        return self.pair is not None and not self.confirmed

    def features(self, raw: bytes) -> bytes:
        """The backend's features (already without what is withheld) as the peer gets them."""
        if not self.offerable or self.pair is not None:
            return raw
        self.offered = True
        return with_mechanisms(raw, mechanisms_feature(EXTERNAL))

    def hold(self, stanza: Element) -> str | None:
        """Keep `stanza` until the backend confirms; the reason to end the stream if the
        bound is exceeded, else None."""
        if len(self.held) >= MAX_HELD_STANZAS or self.held_bytes + len(stanza.raw) > MAX_HELD_BYTES:
            return (f"over {MAX_HELD_STANZAS} stanzas or {MAX_HELD_BYTES} bytes sent before the backend "
                    f"confirmed {self.pair[0]} (held by the proxy after SASL EXTERNAL, DESIGN §3.3)")
        self.held.append(stanza)
        self.held_bytes += len(stanza.raw)
        return None

    def release(self) -> list[Element]:
        """The held stanzas, in the order they arrived; the hold is empty afterwards."""
        out = list(self.held)
        self.held.clear()
        self.held_bytes = 0
        return out


__all__ = [
    "BACKEND_REFUSED_KEY", "ExternalAuth", "MAX_HELD_BYTES", "MAX_HELD_STANZAS", "MAX_SASL_FAILURES",
    "certificate_proved", "external_identity", "is_sasl_auth", "proxy_db_result",
    "with_mechanisms",
]
