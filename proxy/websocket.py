"""XMPP server-to-server over WebSocket (XEP-0468): RFC 7395 framing ⇄ an RFC 6120 byte stream.

XEP-0468 is RFC 7395 (XMPP over WebSocket) for S2S: subprotocol `xmpp`, wss only, and the
framing namespace `urn:ietf:params:xml:ns:xmpp-framing-server` instead of the c2s one.  The
stream is not one XML document but a series of WebSocket text messages, each a complete XML
element: `<open/>` instead of the `<stream:stream>` header, `<close/>` instead of
`</stream:stream>`, and every stanza or other element in a message of its own, carrying its
own namespace declarations.

Nothing else of the proxy changes for a WebSocket peer.  `WebSocketFraming` (sans-IO) turns
the peer's messages into the byte stream a TCP peer would have sent, and the byte stream meant
for the peer into messages; `WebSocketStream` is that translation as a `trio.abc.Stream`, so
the inbound gate (`proxy.inbound_session.InboundSession`: header, dialback verdicts, stanza checks)
and the outbound relay run unchanged over it.  What differs is only how TLS happens: the peer
did it before the HTTP upgrade, presenting its client certificate there, so there is no
STARTTLS (RFC 7395 §3.7 forbids it inside) and the inbound session starts with the chain
already known (`InboundSession.transport_secured`).

`handle_websocket_inbound` serves one connection accepted on `inbound.websocket_listen`:
TLS (our pyOpenSSL `TlsStream`, ALPN `http/1.1`), the WebSocket upgrade with trio-websocket
(subprotocol `xmpp` required), then an `InboundConnection` over a `WebSocketStream`.

Rules a peer's message must follow, and the stream error for breaking each (always with a
`<text>`; RFC 7395 §3.3.3 makes every message a standalone XML document):

* not one complete, well-formed element (two elements, a fragment, text, an empty message)
  → `not-well-formed`; comments, PIs, DTDs, entities → `restricted-xml` (RFC 6120 §11.1);
  an unbound prefix → `bad-namespace-prefix`; a non-UTF-8 declaration → `unsupported-encoding`
* a binary message (RFC 7395 §3.2: text only), a `<stream:stream>` header inside a message,
  anything before `<open/>` or a second `<open/>` (no stream restart exists here: TLS is
  wss and SASL is not offered) → `bad-format`
* the c2s framing namespace, or a first-level element in no namespace → `invalid-namespace`
* over `limits.max_stanza_bytes` → `policy-violation` (as an oversized stanza on TCP).
  Messages are held whole by trio-websocket before we see them, so it is given a hard bound
  of twice that (`WS_HARD_LIMIT_FACTOR`); above it the library itself closes the WebSocket
  with 1009 (message too big) and no stream error can be sent any more.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from xml.parsers import expat

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from proxy.inbound import InboundConnection, InboundSettings
from proxy.inbound_session import BACKEND_MAX_ELEMENT_BYTES
from proxy.logsetup import format_peer, log_event
from proxy.streamerrors import StreamError
from proxy.tls import TlsError, TlsInfo, TlsStream
from proxy.xmlstream import (
    DEFAULT_MAX_STANZA_BYTES, NS_SERVER, NS_STREAMS, NS_XML, STREAM_CLOSE, Element,
    StreamClosed, StreamOpened, XmlError, XmlStreamParser, classify_expat_error, xml_attr,
)

log = logging.getLogger("xmpp_dane_proxy.websocket")

# XEP-0468 §2: the S2S framing namespace (RFC 7395 §3.3.2's c2s one is NS_FRAMING_CLIENT).
NS_FRAMING_SERVER = "urn:ietf:params:xml:ns:xmpp-framing-server"
NS_FRAMING_CLIENT = "urn:ietf:params:xml:ns:xmpp-framing"
# RFC 7395 §3.1 / §5.1: the WebSocket subprotocol name registered for XMPP.
SUBPROTOCOL = "xmpp"
# RFC 7301: the HTTP/1.1 ALPN id.  The WebSocket upgrade is an HTTP/1.1 request (RFC 6455
# §4.1), and naming the protocol of this port (never "xmpp-server") keeps a client of one
# protocol from being served another (ALPACA).
ALPN_HTTP_1_1 = b"http/1.1"
# trio-websocket holds a whole message before handing it over; it may hold up to this many
# times limits.max_stanza_bytes (Prosody's websocket_frame_buffer_limit default is also
# 2 x its stanza limit), so a message just over the limit still gets a policy-violation.
WS_HARD_LIMIT_FACTOR = 2
# One message waits in trio-websocket's queue at a time: backpressure reaches the peer's TCP
# window instead of our memory (trio-websocket's own default).
MESSAGE_QUEUE_SIZE = 1
_RECEIVE_SIZE = 65536
# RFC 6455 §7.4.1: 1009 = "message too big", what trio-websocket closes with over its bound.
_CLOSE_MESSAGE_TOO_BIG = 1009

_OPEN_ATTRS = ("from", "to", "id", "version")
_XML_LANG = f"{{{NS_XML}}}lang"
# A start tag's name ends at whitespace, '/' or '>'; its attributes follow, values quoted
# (applied only to tags expat accepted, so quoting is known to be balanced).
_NAME_END = re.compile(rb"[\s/>]")
_ATTR = re.compile(rb"""\s*([^\s=/>]+)\s*=\s*(?:"[^"]*"|'[^']*')""")



# ================================================================================ one message

@dataclass(frozen=True)
class Message:
    """One WebSocket message, parsed: its element's namespace, name and attributes (Clark
    notation for namespaced ones), the namespaces declared on it, and `raw`: the element's
    bytes exactly as sent (an XML declaration and surrounding whitespace left out)."""

    ns: str
    name: str
    attrs: Mapping[str, str]
    namespaces: Mapping[str | None, str]
    raw: bytes

    def describe(self) -> str:
        return f"<{self.name}>" if not self.ns else f"<{self.name} xmlns='{self.ns}'>"


class _Halt(Exception):
    pass


def parse_message(data: bytes, *, max_bytes: int = DEFAULT_MAX_STANZA_BYTES) -> Message:
    """Parse one message as the standalone XML document RFC 7395 §3.3.3 makes it.

    Raises `StreamError` with the condition the module docstring lists.  The same restricted
    XML rules as the TCP stream (`proxy.xmlstream`) apply: UTF-8 only, no DTD, comments,
    processing instructions or entities beyond the predefined five.
    """
    if len(data) > max_bytes:
        # DESIGN §3.3: a stanza over limits.max_stanza_bytes is a policy-violation.
        raise StreamError("policy-violation",
                          f"message of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    p = expat.ParserCreate(encoding="UTF-8", namespace_separator=" ")
    p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    root: dict = {}
    pending_ns: dict[str | None, str] = {}
    failure: list[tuple[str, str]] = []

    def fail(condition: str, text: str) -> None:
        failure.append((condition, text))
        raise _Halt

    def restricted(what: str) -> None:
        fail("restricted-xml", f"{what} is not allowed in an XMPP stream (RFC 6120 §11.1)")

    def start(qname: str, attrs: dict[str, str]) -> None:
        if root:
            pending_ns.clear()
            return
        ns, _, name = qname.rpartition(" ")
        clark = {}
        for key, value in attrs.items():
            a_ns, sep, local = key.rpartition(" ")
            clark[f"{{{a_ns}}}{local}" if sep else key] = value
        root.update(ns=ns, name=name, attrs=clark, namespaces=dict(pending_ns), start=p.CurrentByteIndex)
        pending_ns.clear()

    def xml_decl(version, encoding, standalone) -> None:
        if encoding is not None and encoding.lower().replace("_", "-") not in ("utf-8", "utf8"):
            fail("unsupported-encoding", f"the XML declaration names encoding {encoding!r}; XMPP is UTF-8 only")

    p.StartElementHandler = start
    p.StartNamespaceDeclHandler = lambda prefix, uri: pending_ns.__setitem__(prefix, uri)
    p.XmlDeclHandler = xml_decl
    p.CommentHandler = lambda _data: restricted("an XML comment")
    p.ProcessingInstructionHandler = lambda target, _data: restricted(f"a processing instruction <?{target} ...?>")
    p.StartDoctypeDeclHandler = lambda name, *_: restricted(f"a DTD (<!DOCTYPE {name}>)")
    p.EntityDeclHandler = lambda name, *_: restricted(f"an entity declaration ({name})")
    p.SkippedEntityHandler = lambda name, _is_pe: restricted(f"an entity reference &{name};")
    p.ExternalEntityRefHandler = lambda *_: restricted("an external entity reference")
    try:
        p.Parse(data, True)
    except _Halt:
        pass
    except expat.ExpatError as exc:
        if root.get("ns") == NS_STREAMS and root.get("name") == "stream":
            failure.append(_stream_header_in_message())
        else:
            failure.append(_classify(exc))
    if failure:
        raise StreamError(*failure[0])
    raw = data[root["start"]:].rstrip(b" \t\r\n")
    return Message(root["ns"], root["name"], root["attrs"], root["namespaces"], raw)


def _classify(exc: expat.ExpatError) -> tuple[str, str]:
    # RFC 7395 §3.3.3: every message is one complete element, parsable as an XML document.
    return classify_expat_error(
        exc, f"at line {exc.lineno}, column {exc.offset}",
        prefix_hint=": each message must declare its namespaces (RFC 7395 §3.3.3)",
        malformed_hint=": each WebSocket message must be exactly one complete XML element (RFC 7395 §3.3.3)")


def _stream_header_in_message() -> tuple[str, str]:
    return ("bad-format", f"a <stream:stream> header in a WebSocket message: the stream is opened with "
                          f"<open xmlns='{NS_FRAMING_SERVER}'/> (RFC 7395 §3.3.2, XEP-0468)")


# ================================================================================ the framing

def qualify(raw: bytes, namespaces: Mapping[str | None, str]) -> bytes:
    """`raw` (a first-level element of a stream whose header declared `namespaces`) as a
    standalone document: the declarations it inherited from the header, and does not make
    itself, are added to its start tag.  Its meaning is unchanged; it is still not
    re-serialised (DESIGN §8)."""
    m = _NAME_END.search(raw, 1)
    if m is None:
        return raw
    name_end = m.start()
    declared: set[str | None] = set()
    pos = name_end
    while (a := _ATTR.match(raw, pos)) is not None:
        key = a.group(1)
        if key == b"xmlns":
            declared.add(None)
        elif key.startswith(b"xmlns:"):
            declared.add(key[6:].decode("utf-8"))
        pos = a.end()
    extra = "".join(
        (f" xmlns={xml_attr(uri)}" if prefix is None else f" xmlns:{prefix}={xml_attr(uri)}")
        for prefix, uri in namespaces.items() if prefix not in declared)
    return raw[:name_end] + extra.encode("utf-8") + raw[name_end:] if extra else raw


def open_element(header: StreamOpened) -> str:
    """The `<open/>` message for a stream header (RFC 7395 §3.3.2 with XEP-0468's namespace):
    the same from/to/id/version/xml:lang, and its prefix declarations (XEP-0220 §2.4.1: a
    declared `xmlns:db` announces dialback errors) except the stream prefix."""
    return f"<open xmlns={xml_attr(NS_FRAMING_SERVER)}{_header_attrs(header.namespaces, header.attrs)}/>"


def _header_attrs(namespaces: dict, attrs: dict) -> str:
    """The prefix declarations (but the stream prefix) and the from/to/id/version/xml:lang
    attributes that an `<open/>` and a `<stream:stream>` header carry alike."""
    parts = [f" xmlns:{prefix}={xml_attr(uri)}" for prefix, uri in namespaces.items()
             if prefix is not None and prefix != "stream"]
    parts += [f" {name}={xml_attr(attrs[name])}" for name in _OPEN_ATTRS if attrs.get(name) is not None]
    if (lang := attrs.get(_XML_LANG)) is not None:
        parts.append(f" xml:lang={xml_attr(lang)}")
    return "".join(parts)


CLOSE_ELEMENT = f"<close xmlns='{NS_FRAMING_SERVER}'/>"


def stream_header_for(message: Message) -> bytes:
    """The RFC 6120 stream header an `<open/>` stands for: `jabber:server` content, the
    stream prefix, the open's own prefix declarations and attributes."""
    head = f"<stream:stream xmlns={xml_attr(NS_SERVER)} xmlns:stream={xml_attr(NS_STREAMS)}"
    return (f"<?xml version='1.0'?>{head}{_header_attrs(message.namespaces, message.attrs)}>").encode("utf-8")


class WebSocketFraming:
    """One connection's translation, sans-IO, usable on either side.

    `from_peer(message)` -> the bytes a TCP peer would have sent for it (raises StreamError
    when the message breaks a framing rule); `to_peer(data)` -> the messages for the bytes
    the proxy would have sent a TCP peer (any split of the byte stream is fine).
    """

    def __init__(self, *, max_message_bytes: int = DEFAULT_MAX_STANZA_BYTES,
                 max_outgoing_element_bytes: int = BACKEND_MAX_ELEMENT_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self.peer_opened = False
        self.peer_closed = False
        self.opened = False          # our <open/> went out
        self.closed = False          # our <close/> went out
        # What goes to the peer was parsed already (backend elements by the session, our
        # own errors are ours); the bound only caps memory, like BACKEND_MAX_ELEMENT_BYTES.
        self._out = XmlStreamParser(max_stanza_bytes=max(max_outgoing_element_bytes, max_message_bytes))
        self._namespaces: Mapping[str | None, str] = {}

    # ------------------------------------------------------------------ peer -> stream

    def from_peer(self, message: str | bytes) -> bytes:
        if isinstance(message, bytes):
            raise StreamError("bad-format", "a binary WebSocket message: XMPP uses text messages only (RFC 7395 §3.2)")
        msg = parse_message(message.encode("utf-8"), max_bytes=self.max_message_bytes)
        if msg.ns == NS_FRAMING_SERVER and msg.name == "open":
            if self.peer_opened:
                raise StreamError("bad-format", "a second <open/>: this stream has no restart (TLS is the "
                                                "WebSocket's, SASL is not offered)")
            self.peer_opened = True
            return stream_header_for(msg)
        if msg.ns == NS_FRAMING_SERVER and msg.name == "close":
            if not self.peer_opened:
                raise StreamError("bad-format", "<close/> before <open/>")
            self.peer_closed = True
            return STREAM_CLOSE
        if msg.ns == NS_FRAMING_CLIENT or msg.ns == NS_FRAMING_SERVER:
            if msg.ns == NS_FRAMING_CLIENT:
                raise StreamError("invalid-namespace", f"{msg.describe()} is client-to-server framing; this endpoint "
                                                       f"is server-to-server ({NS_FRAMING_SERVER!r}, XEP-0468)")
            raise StreamError("bad-format", f"{msg.describe()}: the framing namespace has only <open/> and <close/> "
                                            "(RFC 7395 §3.3.2)")
        if msg.ns == NS_STREAMS and msg.name == "stream":
            raise StreamError(*_stream_header_in_message())
        if not self.peer_opened:
            raise StreamError("bad-format", f"{msg.describe()} before <open xmlns='{NS_FRAMING_SERVER}'/>: "
                                            "the stream must start with <open/> (RFC 7395 §3.3.2)")
        if self.peer_closed:
            raise StreamError("bad-format", f"{msg.describe()} after <close/>")
        if not msg.ns:
            raise StreamError("invalid-namespace", f"{msg.describe()} is in no namespace: each message must "
                                                   f"declare its own (RFC 7395 §3.3.3), e.g. xmlns='{NS_SERVER}'")
        return msg.raw

    # ------------------------------------------------------------------ stream -> peer

    def to_peer(self, data: bytes) -> list[str]:
        out: list[str] = []
        for event in self._out.feed(data):
            if isinstance(event, StreamOpened):
                self._namespaces = dict(event.namespaces)
                self.opened = True
                out.append(open_element(event))
            elif isinstance(event, Element):
                out.append(qualify(event.raw, self._namespaces).decode("utf-8"))
            elif isinstance(event, StreamClosed):
                self.closed = True
                out.append(CLOSE_ELEMENT)
            elif isinstance(event, XmlError):   # our own output: a bug, not the peer's doing
                raise ValueError(f"cannot frame the stream for WebSocket: {event.condition}: {event.text}")
        return out


# ================================================================================ as a trio Stream

class WebSocketStream(trio.abc.Stream):
    """A trio-websocket connection seen as the byte stream a TCP peer would carry.

    `receive_some` returns one message's translation (b"" once the WebSocket is closed) and
    raises StreamError for a message that breaks the framing; `send_all` frames bytes into
    messages.  `aclose` closes the WebSocket (close frame, then the transport).
    """

    def __init__(self, ws: WebSocketConnection, framing: WebSocketFraming) -> None:
        self.ws = ws
        self.framing = framing
        self._pending = b""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._pending:
            try:
                message = await self.ws.get_message()
            except ConnectionClosed as exc:
                if exc.reason is not None and exc.reason.code == _CLOSE_MESSAGE_TOO_BIG:
                    # trio-websocket's hard bound tripped and it closed the WebSocket itself.
                    raise StreamError("policy-violation", f"WebSocket closed: {exc.reason.reason}") from None
                return b""
            self._pending = self.framing.from_peer(message)
        size = max_bytes or len(self._pending)
        data, self._pending = self._pending[:size], self._pending[size:]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            messages = self.framing.to_peer(bytes(data))
        except ValueError as exc:
            raise trio.BrokenResourceError(str(exc)) from None
        for message in messages:
            try:
                await self.ws.send_message(message)
            except ConnectionClosed as exc:
                raise trio.BrokenResourceError(f"WebSocket closed ({exc.reason})") from None
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await self.ws.aclose()


# ================================================================================ inbound

def _log(level: int, event: str, **fields: object) -> None:
    log_event(log, level, event, direction="inbound", transport="websocket", **fields)


class _Refused(Exception):
    """The connection ended before an XMPP stream: `outcome` for the metrics, `reason` for the log."""

    def __init__(self, outcome: str, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


async def _upgrade(nursery: trio.Nursery, transport: trio.SocketStream, settings: InboundSettings
                   ) -> tuple[WebSocketConnection, TlsInfo]:
    """TLS, then the WebSocket upgrade; raises _Refused."""
    certificates = settings.websocket_certificates or settings.certificates
    # XEP-0468 §2: wss is a MUST.  The initial context is the first domain's; SNI switches it.
    tls = TlsStream(transport, certificates.context_for(None), server_side=True)
    try:
        await tls.do_handshake()
    except TlsError as exc:
        raise _Refused("tls-failed", str(exc)) from None
    info = tls.info()
    hard_limit = WS_HARD_LIMIT_FACTOR * settings.max_stanza_bytes
    request = await wrap_server_stream(nursery, tls, message_queue_size=MESSAGE_QUEUE_SIZE,
                                       max_message_size=hard_limit, receive_buffer_size=_RECEIVE_SIZE)
    # RFC 7395 §3.1: the client offers the "xmpp" subprotocol; a server that will not speak
    # it must not pretend to.  400 with the reason tells the operator of the other side.
    if SUBPROTOCOL not in request.proposed_subprotocols:
        offered = ", ".join(request.proposed_subprotocols) or "none"
        reason = f"WebSocket subprotocol 'xmpp' required (RFC 7395 §3.1); offered: {offered}"
        try:
            await request.reject(400, extra_headers=[(b"Content-Type", b"text/plain; charset=utf-8")],
                                 body=reason.encode("utf-8") + b"\n")
        except ConnectionClosed:
            pass
        raise _Refused("policy-violation", reason)
    try:
        ws = await request.accept(subprotocol=SUBPROTOCOL)
    except ConnectionClosed as exc:
        raise _Refused("closed-early", f"connection lost during the WebSocket upgrade ({exc.reason})") from None
    _log(logging.DEBUG, "websocket", peer=_peer_of(transport), path=request.path, version=info.protocol,
         sni=info.server_name, alpn=info.alpn, client_cert=bool(info.chain_der))
    return ws, info


def _peer_of(transport) -> str:
    try:
        return format_peer(transport.socket.getpeername())
    except (AttributeError, OSError):
        return "-"


async def handle_websocket_inbound(transport: trio.SocketStream, settings: InboundSettings, *,
                                   connections: set | None = None, admission=None) -> InboundConnection | None:
    """Serve one connection accepted on `inbound.websocket_listen` to its end.

    TLS and the upgrade count against `limits.handshake_timeout` together with the XMPP
    negotiation after them.  Returns the `InboundConnection` (for its verdicts), or None if
    the connection ended before an XMPP stream.  While the stream runs the connection is in
    `connections` (so the server can say system-shutdown to it).  `admission`: its
    `limits.max_unauthenticated` slot (proxy.admission), released once a pair is authenticated.
    """
    deadline = trio.current_time() + settings.handshake_timeout
    peer = _peer_of(transport)
    metrics = settings.metrics
    conn: InboundConnection | None = None
    refused: _Refused | None = None
    try:
        async with trio.open_nursery() as nursery:   # trio-websocket's reader task lives here
            with trio.move_on_at(deadline):
                try:
                    ws, info = await _upgrade(nursery, transport, settings)
                except _Refused as exc:
                    refused = exc.with_traceback(None)   # kept: no frame <-> traceback cycle
                else:
                    conn = _connection(transport, settings, ws, info, deadline, admission)
            if conn is None:
                if refused is None:
                    refused = _Refused("connection-timeout",
                                       f"TLS and WebSocket upgrade not completed within {settings.handshake_timeout:g} s")
            else:
                if connections is not None:
                    connections.add(conn)
                try:
                    await conn.run()
                finally:
                    if connections is not None:
                        connections.discard(conn)
            nursery.cancel_scope.cancel()
    except* (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as group:
        # trio-websocket's reader can fail answering a peer whose connection already broke.
        if refused is None and conn is None:
            refused = _Refused("closed-early", f"connection lost: {group.exceptions[0]}")
    finally:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(transport)
    if refused is not None:
        if metrics is not None:
            metrics.connection_opened("inbound")
            metrics.connection_closed("inbound", refused.outcome)
        _log(logging.INFO, "stream-closed", peer=peer, outcome=refused.outcome, reason=refused.reason)
    return conn


def _connection(transport: trio.SocketStream, settings: InboundSettings, ws: WebSocketConnection,
                info: TlsInfo, deadline: float, admission=None) -> InboundConnection:
    # The XMPP negotiation gets what is left of the handshake timeout.
    remaining = max(0.0, deadline - trio.current_time())
    conn = InboundConnection(transport, dataclasses.replace(settings, handshake_timeout=remaining),
                             admission=admission)
    conn.peer_stream = WebSocketStream(ws, WebSocketFraming(max_message_bytes=settings.max_stanza_bytes))
    leftover = conn.session.transport_secured(info)
    assert not leftover, leftover   # nothing was queued before the first message
    return conn


__all__ = [
    "ALPN_HTTP_1_1", "CLOSE_ELEMENT", "Message", "NS_FRAMING_CLIENT", "NS_FRAMING_SERVER", "SUBPROTOCOL",
    "WS_HARD_LIMIT_FACTOR", "WebSocketFraming", "WebSocketStream", "handle_websocket_inbound", "open_element",
    "parse_message", "qualify", "stream_header_for",
]
