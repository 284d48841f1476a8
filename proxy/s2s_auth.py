"""The authentication steps both directions share (DESIGN §3.3): SASL EXTERNAL and dialback.

Pure functions over `proxy.xmlstream` elements and the bytes to send; no I/O, no state.  The
inbound session (`proxy.inbound_session`) offers and judges EXTERNAL and answers verifications
of its own keys; the outbound session (`proxy.outbound`) performs EXTERNAL towards a peer and
answers the backend's verifications.  Both build and read the same elements here, so the two
directions cannot drift apart in how they spell them.

Everything we send declares its own prefixes (`xmlns:db=…`, a default `xmlns` for SASL):
it must not depend on which prefixes the other side's stream header happened to declare.
"""
from __future__ import annotations

import base64
import binascii
import xml.parsers.expat
from dataclasses import dataclass

from proxy.xmlstream import NS_DIALBACK, NS_STANZA_ERRORS, Element, xml_attr, xml_text

NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_DIALBACK_FEATURE = "urn:xmpp:features:dialback"      # XEP-0220 §2.1 stream feature
EXTERNAL = "EXTERNAL"
# RFC 6120 §6.4.2: an authzid is a JID, here a bare domain (XEP-0178 §3); 1023 octets is a
# domainpart's limit (RFC 7622 §3.2) — anything longer is malformed, not a long name.
_MAX_AUTHZID_BYTES = 1023


class SaslError(Exception):
    """A SASL exchange the peer got wrong: `condition` is the RFC 6120 §6.5 failure element."""

    def __init__(self, condition: str, text: str) -> None:
        super().__init__(text)
        self.condition = condition
        self.text = text


@dataclass(frozen=True)
class SaslAuth:
    """An `<auth/>` read: the mechanism and the authorization identity (None = empty)."""

    mechanism: str
    authzid: str | None


def element_text(el: Element) -> str:
    """The character data directly inside `el` (a dialback key, a SASL payload), entities
    decoded.  `Element` keeps no text, so its exact bytes are read once more by expat — without
    namespace processing, because the prefixes were declared on the stream header, not here."""
    return "".join(_texts_at_depth(el.raw, 1)[0])


def _texts_at_depth(raw: bytes, want: int, local_name: str | None = None) -> list[list[str]]:
    """For each element at depth `want` of the XML in `raw` (1 = the root), and called
    `local_name` (any prefix) if given, its direct text."""
    found: list[list[str]] = []
    depth = 0
    current: list[str] | None = None     # the text of the element at `want` being read

    def start(name, _attrs):
        nonlocal depth, current
        depth += 1
        if depth == want:
            current = [] if local_name is None or name.rpartition(":")[2] == local_name else None
            if current is not None:
                found.append(current)

    def end(_name):
        nonlocal depth, current
        if depth == want:
            current = None
        depth -= 1

    def chars(data: str) -> None:
        if depth == want and current is not None:
            current.append(data)

    parser = xml.parsers.expat.ParserCreate()
    parser.StartElementHandler, parser.EndElementHandler = start, end
    parser.CharacterDataHandler = chars
    parser.Parse(raw, True)
    return found or [[]]


# ----------------------------------------------------------------------------------------- SASL

def mechanisms_feature(*mechanisms: str) -> bytes:
    """RFC 6120 §6.4.1: the `<mechanisms/>` stream feature offering `mechanisms`."""
    inner = "".join(f"<mechanism>{xml_text(m)}</mechanism>" for m in mechanisms)
    return f"<mechanisms xmlns={xml_attr(NS_SASL)}>{inner}</mechanisms>".encode()


def offered_mechanisms(features: Element) -> frozenset[str]:
    """The mechanism names a peer's `<stream:features>` offers (RFC 6120 §6.4.1).  Every child
    of `<mechanisms/>` is a `<mechanism/>` in the SASL namespace by its schema; their text is
    read from the feature's own bytes."""
    offer = features.find(NS_SASL, "mechanisms")
    if offer is None or offer.span is None:
        return frozenset()
    texts = _texts_at_depth(features.raw[offer.span[0]:offer.span[1]], 2)
    return frozenset(name for name in ("".join(t).strip() for t in texts) if name)


def read_auth(el: Element) -> SaslAuth:
    """RFC 6120 §6.4.2 / XEP-0178 §3: the mechanism and authzid of an `<auth/>`.

    The payload is base64 of the authzid; "=" (or nothing) means an empty response.  Raises
    SaslError with `invalid-mechanism`, `incorrect-encoding` or `malformed-request`."""
    mechanism = el.attrs.get("mechanism", "")
    if not mechanism:
        raise SaslError("invalid-mechanism", "<auth/> names no mechanism (RFC 6120 §6.4.2)")
    payload = element_text(el).strip()
    if payload in ("", "="):
        return SaslAuth(mechanism, None)
    try:
        decoded = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise SaslError("incorrect-encoding", "the <auth/> payload is not base64 (RFC 6120 §6.4.2)") from None
    if len(decoded) > _MAX_AUTHZID_BYTES:
        raise SaslError("malformed-request", f"the authorization identity is over {_MAX_AUTHZID_BYTES} bytes")
    try:
        return SaslAuth(mechanism, decoded.decode("utf-8"))
    except UnicodeDecodeError:
        raise SaslError("incorrect-encoding", "the authorization identity is not UTF-8") from None


def auth_external(authzid: str) -> bytes:
    """`<auth mechanism='EXTERNAL'>` asserting `authzid` (XEP-0178 §3: the sending domain)."""
    payload = base64.b64encode(authzid.encode("utf-8")).decode("ascii") if authzid else "="
    return f"<auth xmlns={xml_attr(NS_SASL)} mechanism='EXTERNAL'>{payload}</auth>".encode()


def success() -> bytes:
    return f"<success xmlns={xml_attr(NS_SASL)}/>".encode()


def failure(condition: str, text: str) -> bytes:
    """RFC 6120 §6.5: `<failure>` with its condition and a human-readable reason."""
    return (f"<failure xmlns={xml_attr(NS_SASL)}><{condition}/>"
            f"<text xml:lang='en'>{xml_text(text)}</text></failure>").encode("utf-8")


# ------------------------------------------------------------------------------------- dialback

def db_result(sender: str, target: str, key: str) -> bytes:
    """XEP-0220 §2.1.1: `sender` asks `target` to accept it, with `key`."""
    return (f"<db:result xmlns:db={xml_attr(NS_DIALBACK)} from={xml_attr(sender)} to={xml_attr(target)}>"
            f"{xml_text(key)}</db:result>").encode("utf-8")


def db_result_answer(sender: str, target: str, valid: bool) -> bytes:
    """XEP-0220 §2.1.3: `target`'s answer to `sender`'s `<db:result>` (from/to swapped)."""
    return (f"<db:result xmlns:db={xml_attr(NS_DIALBACK)} from={xml_attr(target)} to={xml_attr(sender)} "
            f"type={xml_attr('valid' if valid else 'invalid')}/>").encode("utf-8")


def db_verify_answer(sender: str, target: str, stream_id: str, valid: bool) -> bytes:
    """XEP-0220 §2.1.2: the authoritative server's answer to `sender`'s `<db:verify>` asking
    `target` about a key on stream `stream_id` (from/to swapped, same id)."""
    return (f"<db:verify xmlns:db={xml_attr(NS_DIALBACK)} from={xml_attr(target)} to={xml_attr(sender)} "
            f"id={xml_attr(stream_id)} type={xml_attr('valid' if valid else 'invalid')}/>").encode("utf-8")


def dialback_error(sender: str, target: str, condition: str, text: str, *, name: str = "result",
                   id: str | None = None) -> bytes:
    """`<db:result type='error'>` (XEP-0220 §2.4) from our `target` to the peer's `sender`
    (`name="verify"` and its `id` for a `<db:verify>`)."""
    id_attr = f" id={xml_attr(id)}" if id is not None else ""
    return (
        f"<db:{name} xmlns:db={xml_attr(NS_DIALBACK)} from={xml_attr(target)} to={xml_attr(sender)}{id_attr} "
        f"type='error'><error type='cancel'><{condition} xmlns={xml_attr(NS_STANZA_ERRORS)}/>"
        f"<text xmlns={xml_attr(NS_STANZA_ERRORS)} xml:lang='en'>{xml_text(text)}</text></error></db:{name}>"
    ).encode("utf-8")


def db_verify(sender: str, target: str, stream_id: str, key: str) -> bytes:
    """XEP-0220 §2.1.2: `sender` asks `target`'s authoritative server whether `key` is the one
    `target` issued on stream `stream_id` (the outbound side relays the backend's question)."""
    return (f"<db:verify xmlns:db={xml_attr(NS_DIALBACK)} from={xml_attr(sender)} to={xml_attr(target)} "
            f"id={xml_attr(stream_id)}>{xml_text(key)}</db:verify>").encode("utf-8")


def dialback_error_reason(el: Element) -> str:
    """`condition: text` of a `<db:result type='error'>` / `<db:verify type='error'>` (XEP-0220
    §2.4): the `<error/>` child's stanza-error condition and its `<text/>`, as far as given."""
    error = next((c for c in el.children if c.name == "error"), None)
    if error is None:
        return "undefined-condition"
    condition = next((c.name for c in error.children if c.ns == NS_STANZA_ERRORS and c.name != "text"),
                     "undefined-condition")
    text = ""
    if error.span is not None:
        # Children of <error/> carry no spans of their own: read <text/> from error's bytes.
        text = "".join(_texts_at_depth(el.raw[error.span[0]:error.span[1]], 2, "text")[0]).strip()
    return f"{condition}: {text}" if text else condition


__all__ = [
    "EXTERNAL", "NS_DIALBACK_FEATURE", "NS_SASL", "SaslAuth", "SaslError", "auth_external", "db_result",
    "db_result_answer", "db_verify", "db_verify_answer", "dialback_error", "dialback_error_reason", "element_text",
    "failure", "mechanisms_feature", "offered_mechanisms", "read_auth", "success",
]
