"""Stanzas that cannot be delivered: the error reply their sender gets (RFC 6120 §8.3).

When the backend's connection is gone, a stanza the peer sent can no longer reach it.  A server
answers such a stanza with an error stanza back to its sender rather than dropping it: the
sender's server can tell its user (a message shows as failed, an iq's caller gets its answer).

The condition is `<service-unavailable/>` (type `cancel`), not `<recipient-unavailable/>`:
RFC 6120 §8.3.3.13 forbids `recipient-unavailable` wherever it would reveal a recipient's
availability to someone not authorised to know it, and the proxy cannot judge presence
authorisation; `service-unavailable` (§8.3.3.19) is what a server returns for a stanza it
will not deliver, whoever the recipient is.  The `<text>` says why.
"""
from __future__ import annotations

from proxy.xmlstream import NS_SERVER, NS_STANZA_ERRORS, Element, XmlStreamParser, xml_attr, xml_text

STANZAS = frozenset({"message", "presence", "iq"})


def needs_error_reply(el: Element) -> bool:
    """RFC 6120 §8.3.1: an error reply is expected for a stanza, but never for an error
    (it would loop) nor for an iq result (nothing waits for an answer to an answer)."""
    return el.ns == NS_SERVER and el.name in STANZAS and el.attrs.get("type") not in ("error", "result")


def error_reply(el: Element, text: str) -> bytes:
    """`<message|presence|iq type='error'>` from the stanza's `to` to its `from`, same `id`
    (RFC 6120 §8.3.1: the addresses swapped, the id kept so the sender can match it)."""
    attrs = "".join(
        f" {name}={xml_attr(value)}"
        for name, value in (("from", el.attrs.get("to")), ("to", el.attrs.get("from")), ("id", el.attrs.get("id")))
        if value
    )
    return (
        f"<{el.name}{attrs} type='error'><error type='cancel'>"
        f"<service-unavailable xmlns={xml_attr(NS_STANZA_ERRORS)}/>"
        f"<text xmlns={xml_attr(NS_STANZA_ERRORS)} xml:lang='en'>{xml_text(text)}</text>"
        f"</error></{el.name}>"
    ).encode("utf-8")


def elements_in(data: bytes, header: bytes, max_stanza_bytes: int) -> list[Element]:
    """The elements in `data`, bytes that were on their way to the backend: complete
    elements, possibly preceded by the stream header (which then declares the prefixes
    itself) or followed by `</stream:stream>`.  Otherwise `header` (the peer's stream
    header as received) supplies the namespace declarations.  Unparseable input gives []."""
    parser = XmlStreamParser(max_stanza_bytes=max_stanza_bytes)
    events = parser.feed(data if data.startswith(b"<?xml") else header + data)
    return [e for e in events if isinstance(e, Element)]


__all__ = ["STANZAS", "elements_in", "error_reply", "needs_error_reply"]
