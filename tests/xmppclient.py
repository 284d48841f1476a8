"""Minimal XMPP plumbing for tests (trio): stream reader, raw stream driver, c2s client.

* `XmlStreamReader` — incremental, sans-IO: feed bytes, get `StreamHeader`, `Stanza`
  (top-level element with its raw bytes exactly as received and an ElementTree element with
  `{namespace}local` tags) and `StreamEnd` events.  expat does the parsing.
* `XmppStream` — a trio stream plus that reader: `send()`, `next_event()`, `expect_*()`
  and `wait_for()` with deadlines, `restart()` after SASL/STARTTLS, and a `transcript` of
  everything sent and received (to print real protocol exchanges).
* `C2SClient` — plaintext c2s login (SASL PLAIN, resource bind), presence, messages.
* `deliver_message()` — synchronous one-liner for end-to-end tests: log two accounts in,
  send a message from one to the other, return it as received (or raise with the bounce).

This is a test client: it trusts the server it talks to and implements only what the tests
need.  It never negotiates TLS.
"""
from __future__ import annotations

import base64
import itertools
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Callable, Union
from xml.parsers import expat
from xml.sax.saxutils import escape, quoteattr

import trio

NS_STREAM = "http://etherx.jabber.org/streams"
NS_CLIENT = "jabber:client"
NS_SERVER = "jabber:server"
NS_DIALBACK = "jabber:server:dialback"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
NS_XML = "http://www.w3.org/XML/1998/namespace"

DEFAULT_TIMEOUT = 10.0


class XmppError(Exception):
    """The peer closed, sent a stream error, or did not answer as a test expected."""


@dataclass
class StreamHeader:
    """The opening `<stream:stream ...>` tag; `attrs` keys are `name` or `{ns}name`."""

    attrs: dict[str, str]
    raw: bytes

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.attrs.get(name, default)


@dataclass
class Stanza:
    """A complete top-level element: `raw` bytes as received, `element` parsed."""

    element: ET.Element
    raw: bytes

    @property
    def tag(self) -> str:
        """`{namespace}local`, e.g. `{jabber:client}message`."""
        return self.element.tag

    @property
    def name(self) -> str:
        return self.element.tag.rpartition("}")[2]

    @property
    def ns(self) -> str:
        return self.element.tag[1:].partition("}")[0] if self.element.tag.startswith("{") else ""

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.element.get(name, default)

    @property
    def body(self) -> str | None:
        """Text of the `<body/>` child (in the stanza's own namespace), if any."""
        node = self.element.find(f"{{{self.ns}}}body") if self.ns else self.element.find("body")
        return None if node is None else (node.text or "")

    def __str__(self) -> str:
        return self.raw.decode("utf-8", errors="replace")


@dataclass
class StreamEnd:
    """`</stream:stream>` was received."""

    raw: bytes = b"</stream:stream>"


Event = Union[StreamHeader, Stanza, StreamEnd]


def _qname(name: str) -> str:
    # expat reports "uri local" with namespace_separator=" "; ElementTree wants "{uri}local".
    uri, sep, local = name.rpartition(" ")
    return f"{{{uri}}}{local}" if sep else name


def _tag_end(buf: bytes | bytearray, pos: int) -> int:
    """Offset just past the `>` closing the tag that starts at `pos` (quotes respected)."""
    quote = None
    for i in range(pos, len(buf)):
        c = buf[i]
        if quote is not None:
            if c == quote:
                quote = None
        elif c in (0x22, 0x27):
            quote = c
        elif c == 0x3E:
            return i + 1
    raise XmppError("tag not terminated in buffer")  # cannot happen after expat saw it


class XmlStreamReader:
    """Incremental XMPP stream parser (sans-IO): `feed(bytes) -> list[Event]`.

    Call `reset()` when the stream restarts (after SASL success or STARTTLS).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        parser = expat.ParserCreate(encoding="UTF-8", namespace_separator=" ")
        # XMPP forbids DTDs and entity declarations (RFC 6120 §11.1); never resolve any.
        parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
        parser.StartElementHandler = self._start
        parser.EndElementHandler = self._end
        parser.CharacterDataHandler = self._text
        parser.buffer_text = True
        self._parser = parser
        self._buf = bytearray()
        self._base = 0  # absolute stream offset of _buf[0]
        self._stack: list[ET.Element] = []
        self._depth = 0
        self._stanza_start = 0
        self._events: list[Event] = []

    def feed(self, data: bytes) -> list[Event]:
        self._buf += data
        try:
            self._parser.Parse(data, False)
        except expat.ExpatError as exc:
            raise XmppError(f"not well-formed XML from peer: {exc}") from exc
        events, self._events = self._events, []
        return events

    def _slice(self, start: int, end: int) -> bytes:
        return bytes(self._buf[start - self._base:end - self._base])

    def _start(self, name: str, attrs: dict[str, str]) -> None:
        attrs = {_qname(k): v for k, v in attrs.items()}
        index = self._parser.CurrentByteIndex
        if self._depth == 0:
            end = self._base + _tag_end(self._buf, index - self._base)
            self._events.append(StreamHeader(attrs, self._slice(index, end)))
            self._drop_before(end)
        else:
            if self._depth == 1:
                self._stanza_start = index
                elem = ET.Element(_qname(name), attrs)
            else:
                elem = ET.SubElement(self._stack[-1], _qname(name), attrs)
            self._stack.append(elem)
        self._depth += 1

    def _end(self, name: str) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._events.append(StreamEnd())
            return
        elem = self._stack.pop()
        if self._depth == 1:
            start = self._stanza_start
            open_end = self._base + _tag_end(self._buf, start - self._base)
            if self._buf[open_end - self._base - 2] == 0x2F:  # "<x .../>": empty element
                end = open_end
            else:
                index = self._parser.CurrentByteIndex  # at "</x>"
                end = self._base + _tag_end(self._buf, index - self._base)
            self._events.append(Stanza(elem, self._slice(start, end)))
            self._drop_before(end)

    def _text(self, data: str) -> None:
        if not self._stack:
            return  # whitespace keepalives between stanzas
        elem = self._stack[-1]
        if len(elem):
            elem[-1].tail = (elem[-1].tail or "") + data
        else:
            elem.text = (elem.text or "") + data

    def _drop_before(self, offset: int) -> None:
        del self._buf[: offset - self._base]
        self._base = offset


def stream_header(
    *, to: str | None = None, from_: str | None = None, ns: str = NS_CLIENT, dialback: bool = False,
    id: str | None = None, version: str = "1.0",
) -> bytes:
    """An opening `<stream:stream>` tag (with XML declaration)."""
    attrs = [f"xmlns={quoteattr(ns)}", f"xmlns:stream={quoteattr(NS_STREAM)}"]
    if dialback:
        attrs.append(f"xmlns:db={quoteattr(NS_DIALBACK)}")
    for key, value in (("from", from_), ("to", to), ("id", id), ("version", version)):
        if value is not None:
            attrs.append(f"{key}={quoteattr(value)}")
    return f"<?xml version='1.0'?><stream:stream {' '.join(attrs)}>".encode()


class XmppStream:
    """A trio byte stream carrying XMPP, with a reader, deadlines and a transcript.

    `transcript` collects `(label, direction, bytes)`: direction ">" for what we sent, "<"
    for each event received.  Pass one list to several streams to record a whole exchange
    in order; `format_transcript()` prints it.  Sending is serialised by a lock, so
    several tasks may answer on one stream.
    """

    def __init__(
        self, stream: trio.abc.Stream, *, label: str = "", transcript: list[tuple[str, str, bytes]] | None = None,
    ) -> None:
        self.stream = stream
        self.label = label
        self.reader = XmlStreamReader()
        self.transcript: list[tuple[str, str, bytes]] = [] if transcript is None else transcript
        self._pending: list[Event] = []
        self._send_lock = trio.Lock()
        self.eof = False  # the peer closed its side
        self.closed = False  # we closed ours

    @classmethod
    async def connect(
        cls, host: str, port: int, *, label: str = "", transcript: list[tuple[str, str, bytes]] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> "XmppStream":
        with trio.fail_after(timeout):
            return cls(await trio.open_tcp_stream(host, port), label=label, transcript=transcript)

    async def send(self, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        async with self._send_lock:
            self.transcript.append((self.label, ">", raw))
            await self.stream.send_all(raw)

    def restart(self) -> None:
        """Forget the old stream's parser state (RFC 6120 §4.3.3 stream restart)."""
        self.reader.reset()
        self._pending.clear()

    async def next_event(self, timeout: float = DEFAULT_TIMEOUT) -> Event:
        """The next header, stanza or stream end; XmppError on EOF, trio.TooSlowError at the deadline."""
        with trio.fail_after(timeout):
            while not self._pending:
                data = await self.stream.receive_some(65536)
                if not data:
                    self.eof = True
                    raise XmppError(f"{self.label or 'peer'} closed the connection")
                for event in self.reader.feed(data):
                    self.transcript.append((self.label, "<", event.raw))
                    self._pending.append(event)
            return self._pending.pop(0)

    async def expect_header(self, timeout: float = DEFAULT_TIMEOUT) -> StreamHeader:
        event = await self.next_event(timeout)
        if not isinstance(event, StreamHeader):
            raise XmppError(f"expected a stream header, got {event.raw!r}")
        return event

    async def expect_stanza(self, timeout: float = DEFAULT_TIMEOUT) -> Stanza:
        """The next top-level element; a stream error or stream end raises XmppError."""
        event = await self.next_event(timeout)
        if isinstance(event, StreamEnd):
            raise XmppError(f"{self.label or 'peer'} closed the stream")
        if isinstance(event, StreamHeader):
            raise XmppError(f"unexpected stream header {event.raw!r}")
        if event.tag == f"{{{NS_STREAM}}}error":
            raise XmppError(f"stream error from {self.label or 'peer'}: {event.raw.decode(errors='replace')}")
        return event

    async def wait_for(self, predicate: Callable[[Stanza], bool], timeout: float = DEFAULT_TIMEOUT) -> Stanza:
        """Skip stanzas until one satisfies `predicate` (skipped ones stay in the transcript)."""
        with trio.fail_after(timeout):
            while True:
                stanza = await self.expect_stanza(timeout=timeout)
                if predicate(stanza):
                    return stanza

    async def aclose(self, *, close_stream: bool = True) -> None:
        """Send `</stream:stream>` (unless `close_stream=False` or the peer is gone) and
        close the connection; safe to call twice and from a cancelled task."""
        if self.closed:
            return
        self.closed = True
        try:
            if close_stream and not self.eof:
                with trio.move_on_after(1):
                    try:
                        await self.send(b"</stream:stream>")
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
        finally:
            await trio.aclose_forcefully(self.stream)

    def format_transcript(self) -> str:
        return format_transcript(self.transcript)


def format_transcript(entries: list[tuple[str, str, bytes]]) -> str:
    """One line per entry: `label > sent` / `label < received`."""
    return "\n".join(f"{label} {d} {raw.decode('utf-8', errors='replace')}" for label, d, raw in entries)


_ids = itertools.count(1)


class C2SClient:
    """A logged-in plaintext c2s session (SASL PLAIN, bound resource)."""

    def __init__(self, xs: XmppStream, jid: str) -> None:
        self.xs = xs
        self.jid = jid  # full JID as bound by the server

    @classmethod
    async def login(
        cls, host: str, port: int, jid: str, password: str, *, resource: str = "test",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> "C2SClient":
        """Connect, authenticate with SASL PLAIN over plaintext, bind `resource`."""
        user, _, domain = jid.partition("@")
        if not domain:
            raise ValueError(f"bare JID with a domain expected, not {jid!r}")
        xs = await XmppStream.connect(host, port, label=f"c2s {jid}", timeout=timeout)
        try:
            with trio.fail_after(timeout):
                await xs.send(stream_header(to=domain))
                await xs.expect_header()
                features = await xs.expect_stanza()
                mechs = [m.text for m in features.element.iter(f"{{{NS_SASL}}}mechanism")]
                if "PLAIN" not in mechs:
                    raise XmppError(f"server offers no SASL PLAIN (offers {mechs}): {features}")
                token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
                await xs.send(f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{token}</auth>")
                answer = await xs.expect_stanza()
                if answer.name != "success":
                    raise XmppError(f"SASL PLAIN as {jid} failed: {answer}")
                xs.restart()
                await xs.send(stream_header(to=domain))
                await xs.expect_header()
                await xs.expect_stanza()  # features: bind (+ session, optional in 0.12)
                iq_id = f"bind{next(_ids)}"
                await xs.send(
                    f"<iq type='set' id='{iq_id}'><bind xmlns='{NS_BIND}'>"
                    f"<resource>{escape(resource)}</resource></bind></iq>"
                )
                result = await xs.wait_for(lambda s: s.name == "iq" and s.get("id") == iq_id)
                bound = result.element.find(f"{{{NS_BIND}}}bind/{{{NS_BIND}}}jid")
                if result.get("type") != "result" or bound is None:
                    raise XmppError(f"resource bind failed: {result}")
                return cls(xs, bound.text)
        except BaseException:
            await xs.aclose(close_stream=False)
            raise

    async def send_presence(self) -> None:
        """Initial available presence (makes the session eligible for messages)."""
        await self.xs.send("<presence/>")

    async def become_available(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Initial presence, and wait until the server has processed it: RFC 6121 §4.2.2, the
        server broadcasts it to all of the user's available resources, this one included.
        Until then a message to the bare JID may find no available resource (ejabberd routes
        each session in a process of its own, so our presence and another user's message race)."""
        await self.send_presence()
        await self.xs.wait_for(lambda s: s.name == "presence" and s.get("from") == self.jid
                               and s.get("type") in (None, "available"), timeout=timeout)

    async def send_message(self, to: str, body: str, *, type: str = "chat", id: str | None = None) -> None:
        stanza_id = id or f"m{next(_ids)}"
        await self.xs.send(
            f"<message to={quoteattr(to)} type={quoteattr(type)} id={quoteattr(stanza_id)}>"
            f"<body>{escape(body)}</body></message>"
        )

    async def wait_for_message(
        self, body: str | None = None, *, sender: str | None = None, timeout: float = DEFAULT_TIMEOUT,
    ) -> Stanza:
        """The first incoming `<message>` with this body (and bare/full `sender`, if given).

        Raises trio.TooSlowError after `timeout` seconds; error-type messages raise XmppError
        when they match, so a bounced message fails the test with its reason.
        """

        def match(s: Stanza) -> bool:
            if s.name != "message" or s.ns != NS_CLIENT:
                return False
            if sender is not None and s.get("from") != sender and (s.get("from") or "").split("/")[0] != sender:
                return False
            if s.get("type") == "error":
                return body is None or s.body in (None, body)
            return body is None or s.body == body

        stanza = await self.xs.wait_for(match, timeout=timeout)
        if stanza.get("type") == "error":
            raise XmppError(f"message bounced: {stanza}")
        return stanza

    async def aclose(self) -> None:
        await self.xs.aclose()


@dataclass(frozen=True)
class Account:
    """Where and as whom to log in over c2s (see ProsodyServer.account())."""

    host: str
    port: int
    jid: str
    password: str

    async def login(self, *, resource: str = "test", timeout: float = DEFAULT_TIMEOUT) -> C2SClient:
        return await C2SClient.login(self.host, self.port, self.jid, self.password, resource=resource, timeout=timeout)


async def deliver_message_async(sender: Account, recipient: Account, body: str, *, timeout: float = DEFAULT_TIMEOUT) -> Stanza:
    """Send `body` from `sender` to `recipient`'s bare JID; return the stanza as it arrived.

    Both sessions send presence first, and the recipient's is processed before the message
    goes.  If the sender gets an error bounce from the
    recipient's address first (e.g. S2S failed), raise XmppError with it instead of
    waiting for the deadline.
    """
    alice = await sender.login(resource="sender", timeout=timeout)
    try:
        bob = await recipient.login(resource="recipient", timeout=timeout)
        try:
            await alice.send_presence()
            await bob.become_available(timeout)    # before the message is routed to the bare JID
            await alice.send_message(recipient.jid, body)
            arrived: list[Stanza] = []
            bounced: list[Stanza] = []
            with trio.fail_after(timeout):
                async with trio.open_nursery() as nursery:
                    # Whichever comes first ends both waits (errors would arrive wrapped in
                    # an ExceptionGroup, so outcomes are collected instead of raised here).

                    async def receive() -> None:
                        # Inner deadlines are later than the outer one, which thus raises
                        # a plain TooSlowError rather than one wrapped in a group.
                        arrived.append(await bob.wait_for_message(body, sender=sender.jid, timeout=timeout + 1))
                        nursery.cancel_scope.cancel()

                    async def watch_bounce() -> None:
                        bounced.append(await alice.xs.wait_for(
                            lambda s: s.name == "message" and s.get("type") == "error"
                            and (s.get("from") or "").split("/")[0] == recipient.jid,
                            timeout=timeout + 1,
                        ))
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(receive)
                    nursery.start_soon(watch_bounce)
            if bounced and not arrived:
                raise XmppError(f"message from {sender.jid} to {recipient.jid} bounced: {bounced[0]}")
            return arrived[0]
        finally:
            await bob.aclose()
    finally:
        await alice.aclose()


def deliver_message(sender: Account, recipient: Account, body: str, *, timeout: float = DEFAULT_TIMEOUT) -> Stanza:
    """Synchronous `deliver_message_async` (runs its own trio loop)."""
    return trio.run(lambda: deliver_message_async(sender, recipient, body, timeout=timeout))
