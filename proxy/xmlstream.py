"""Sans-IO framing of an XMPP XML stream (RFC 6120 §4): bytes in, events out.

`XmlStreamParser.feed(data)` returns events: `StreamOpened` (the stream header),
`Element` (one complete first-level child of the stream: a stanza, `<db:result>`,
`<stream:features>`, ...), `StreamClosed` (`</stream:stream>`), and at most one `XmlError`
after which the parser accepts nothing more.  There is no I/O in here.

The proxy relays bytes as they were received, never re-serialised (DESIGN §8), so every
`Element` carries `raw`: its exact byte span in the input.  expat tells where a start tag
begins (`CurrentByteIndex`); the end of the element is found from there (see
`_element_end`).  Only the names and attributes the proxy needs are parsed into a small tree
(first-level element plus two levels of children, no text).

Input is checked against RFC 6120 §11: restricted XML (no DTD, comments, processing
instructions, entity declarations or references other than the five predefined ones),
UTF-8 only, and a size limit on each first-level element that is enforced while its bytes
are still arriving, so a peer cannot make the proxy buffer without bound.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from xml.parsers import expat

from policy.domain_reading import domainpart
from proxy.streamerrors import CONDITIONS

NS_STREAMS = "http://etherx.jabber.org/streams"
NS_SERVER = "jabber:server"
NS_DIALBACK = "jabber:server:dialback"
NS_DIALBACK_FEATURES = "urn:xmpp:features:dialback"
NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
NS_STREAM_ERRORS = "urn:ietf:params:xml:ns:xmpp-streams"
NS_STANZA_ERRORS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_XML = "http://www.w3.org/XML/1998/namespace"

# 256 KiB: the default stanza size limit of ejabberd (max_stanza_size) and of xmpp-proxy;
# Prosody's s2s default (s2s_stanza_size_limit) is 512 KiB, so nothing legitimate between
# Prosody servers is near it, while a peer still cannot make us hold megabytes per stream.
DEFAULT_MAX_STANZA_BYTES = 262144
# The stream header, counted from the parser's first byte (XML declaration and whitespace
# included) to the header's closing '>', may be at most this long (DESIGN §3.1: "the stream
# header is bounded").  A real header is a few hundred bytes: seven or eight attributes, of
# which `to` and `from` are domains of at most 1023 octets each (RFC 7622 §3.2), so even the
# longest legal one stays under 4 KiB; 8 KiB leaves room and stops a peer from making us hold
# (and, before the header, re-scan) stanza-sized data before we know whom it wants.
# The exact rule, for every framer behind this API: if the header's start tag ends at byte
# offset E (exclusive, counted from the first byte fed to this parser) and E > the bound, or
# more than the bound bytes were fed without the header's start tag being complete, the
# parser reports XmlError("policy-violation", ...) and nothing else.  The bound is
# min(max_header_bytes, max_stanza_bytes).
MAX_HEADER_BYTES = 8192

# Children kept in Element.children: first-level element (depth 0 here) plus two levels.
# Enough for <stream:features><starttls><required/>, <stream:error><cond/>, and
# <db:result><error><not-authorized/>; deeper content is relayed but not inspected.
_TREE_DEPTH = 3
# First-level elements whose children are never looked at (RFC 6120 §8: routed by from/to).
_FLAT_STANZAS = frozenset({"message", "presence", "iq"})

# A start tag up to its closing '>', skipping '>' inside quoted attribute values (XML 1.0
# §3.1 allows a literal '>' there).  Only applied to tags expat already accepted as
# well-formed; the possessive quantifier rules out backtracking.
_START_TAG = re.compile(rb"""<[^\s/>]+(?:[^>"']|"[^"]*"|'[^']*')*+>""")
# Inside a start tag outside quotes: the bytes that change the scan's state.
_TAG_STOP = re.compile(rb"""['">]""")
# Ends an entity or character reference's name ('&amp;', '&#38;'), or makes it malformed.
_REFERENCE_STOP = re.compile(rb"[^A-Za-z0-9._:#\-\x80-\xff]")

# Characters not allowed in XML 1.0 (§2.2); removed from text we generate, because reasons
# can quote data that came from a peer.
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

_E = expat.errors
# RFC 6120 §11.1: entity references other than the predefined ones are "restricted XML",
# not merely malformed; expat reports them as these errors when no DTD declared them.
_RESTRICTED_CODES = {
    _E.codes[getattr(_E, name)]
    for name in (
        "XML_ERROR_UNDEFINED_ENTITY", "XML_ERROR_RECURSIVE_ENTITY_REF",
        "XML_ERROR_BINARY_ENTITY_REF", "XML_ERROR_ATTRIBUTE_EXTERNAL_ENTITY_REF",
        "XML_ERROR_EXTERNAL_ENTITY_HANDLING", "XML_ERROR_ENTITY_DECLARED_IN_PE",
        "XML_ERROR_AMPLIFICATION_LIMIT_BREACH",
    )
    if hasattr(_E, name)
}
_UNBOUND_PREFIX = _E.codes[_E.XML_ERROR_UNBOUND_PREFIX]
_ENCODING_CODES = {_E.codes[_E.XML_ERROR_UNKNOWN_ENCODING], _E.codes[_E.XML_ERROR_INCORRECT_ENCODING]}


# Slots: an element is made per stanza, and a stream keeps its header (issue 13).
@dataclass(frozen=True, slots=True)
class Node:
    """An element's name, namespace and attributes, and (to a limited depth) its children.

    Attribute names without a namespace are plain (`"to"`); namespaced ones use Clark
    notation (`"{http://www.w3.org/XML/1998/namespace}lang"`).  `span` is the child's byte
    range inside its first-level element's `raw` (only set on direct children of it).
    """

    ns: str
    name: str
    attrs: Mapping[str, str]
    children: tuple["Node", ...] = ()
    span: tuple[int, int] | None = None

    def is_(self, ns: str, name: str) -> bool:
        return self.name == name and self.ns == ns

    def find(self, ns: str, name: str) -> "Node | None":
        """The first direct child called `{ns}name`, or None."""
        for child in self.children:
            if child.name == name and child.ns == ns:
                return child
        return None

    def iter(self) -> Iterator["Node"]:
        """This node and every kept descendant, depth first."""
        yield self
        for child in self.children:
            yield from child.iter()


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The stream header `<stream:stream ...>`; `raw` is the start tag exactly as received.

    `namespaces` maps each prefix declared on the header to its URI (`None` for the
    default namespace): XEP-0220 §2.4.1 has peers announce dialback with `xmlns:db`.
    """

    attrs: Mapping[str, str]
    namespaces: Mapping[str | None, str]
    raw: bytes

    @property
    def to(self) -> str | None:
        return self.attrs.get("to")

    @property
    def from_(self) -> str | None:
        return self.attrs.get("from")

    @property
    def id(self) -> str | None:
        return self.attrs.get("id")

    @property
    def version(self) -> str | None:
        return self.attrs.get("version")

    @property
    def content_ns(self) -> str | None:
        """The default namespace declared on the header (`jabber:server` for S2S)."""
        return self.namespaces.get(None)


@dataclass(frozen=True, slots=True)
class Element(Node):
    """A complete first-level child of the stream; `raw` is its exact byte span as received."""

    raw: bytes = b""

    def raw_without(self, drop: Callable[[Node], bool]) -> bytes:
        """`raw` with the direct children for which `drop` is true cut out, byte-exactly.

        Used to pass on a `<stream:features>` minus `<starttls/>` without re-serialising.
        """
        out, pos = [], 0
        for child in self.children:
            if child.span is not None and drop(child):
                out.append(self.raw[pos:child.span[0]])
                pos = child.span[1]
        out.append(self.raw[pos:])
        return b"".join(out)


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """`</stream:stream>` was received."""


@dataclass(frozen=True, slots=True)
class XmlError:
    """The input violates XML or RFC 6120's rules for it; `condition` is the stream error."""

    condition: str
    text: str


Event = StreamOpened | Element | StreamClosed | XmlError | bytes   # bytes: passed stanzas (`routes`)


class _Halt(Exception):
    """Raised inside an expat handler to stop parsing the current buffer."""


class _Builder:
    __slots__ = ("ns", "name", "attrs", "children", "start")

    def __init__(self, ns: str, name: str, attrs: dict[str, str], start: int) -> None:
        self.ns, self.name, self.attrs, self.children, self.start = ns, name, attrs, [], start


def _split(qname: str) -> tuple[str, str]:
    ns, sep, local = qname.rpartition(" ")
    return (ns, local) if sep else ("", qname)


def _attrs(raw: dict[str, str]) -> dict[str, str]:
    if not any(" " in key for key in raw):
        return raw
    out = {}
    for key, value in raw.items():
        ns, local = _split(key)
        out[f"{{{ns}}}{local}" if ns else local] = value
    return out


class PyXmlStreamParser:
    """Frames one XML stream.  Create a fresh one for each stream restart (RFC 6120 §4.3.3).

    `stop_after(element)` returning true makes the parser stop right after that element:
    bytes that followed it in the input are kept in `trailing` and later `feed` calls only
    append there.  That is how the bytes after `<starttls/>` (the start of the TLS
    handshake, if the peer sent it early) are handed to TLS instead of to expat.
    """

    def __init__(
        self,
        *,
        max_stanza_bytes: int = DEFAULT_MAX_STANZA_BYTES,
        stop_after: Callable[[Element], bool] | None = None,
        max_header_bytes: int = MAX_HEADER_BYTES,
    ) -> None:
        self.max_stanza_bytes = max_stanza_bytes
        self.max_header_bytes = min(max_header_bytes, max_stanza_bytes)
        self._stop_after = stop_after
        # RFC 6120 §11.6: XMPP is UTF-8 only; forcing it also keeps byte offsets meaningful.
        p = expat.ParserCreate(encoding="UTF-8", namespace_separator=" ")
        # No CharacterDataHandler is installed (text is relayed as raw bytes, never
        # delivered), so `buffer_text` would only cost its 8 KiB buffer per parser.
        p.buffer_text = False
        p.ordered_attributes = False
        # Parameter entities (and with them external DTD subsets) are never read.
        p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
        # expat >= 2.6 may defer reparsing an incomplete token until much more data has
        # arrived; in an interactive protocol that would hold back a complete stream header
        # while the peer waits for our answer.
        if hasattr(p, "SetReparseDeferralEnabled"):
            p.SetReparseDeferralEnabled(False)
        p.StartElementHandler = self._start
        p.EndElementHandler = self._end
        p.StartNamespaceDeclHandler = self._ns_decl
        p.XmlDeclHandler = self._xml_decl
        # RFC 6120 §11.1: none of these may appear in an XML stream.
        p.CommentHandler = lambda _data: self._restricted("comment")
        p.ProcessingInstructionHandler = lambda target, _data: self._restricted("pi", target)
        p.StartDoctypeDeclHandler = lambda name, *_: self._restricted("doctype", name)
        p.EntityDeclHandler = lambda name, *_: self._restricted("entity-decl", name)
        p.SkippedEntityHandler = lambda name, _is_pe: self._restricted("skipped-entity", name)
        p.ExternalEntityRefHandler = lambda *_: self._restricted("external-entity")
        self._p = p
        self._buf = bytearray()
        self._base = 0          # absolute stream offset of _buf[0]
        self._consumed = 0      # absolute offset just after the last complete event
        self._depth = 0
        self._flat = False
        self._el_start = -1     # absolute offset of the open first-level element, or -1
        self._stack: list[_Builder] = []
        self._pending_ns: dict[str | None, str] = {}
        self._events: list[Event] = []
        self._state = "open"    # open | stopped | closed | failed
        self.trailing = b""
        # Authorised stanzas leave as bytes (see `routes`); the run of passed stanzas not yet
        # handed out, as absolute [start, end), and whether the open one passes.
        self.routes: dict | None = None
        self._run: list[int] | None = None
        self._pass = False
        # Slow input, linear cost (see `_may_complete`): how far expat has been fed, where
        # its unfinished token starts (== _fed when there is none), and the quote-aware scan
        # of an unfinished start tag (token start, scanned up to, open quote or 0).
        self._fed = 0
        self._tok = 0
        self._scan = (-1, 0, 0)

    # ---------------------------------------------------------------- public API

    @property
    def state(self) -> str:
        """`open`, `stopped` (after a `stop_after` element), `closed` or `failed`."""
        return self._state

    def feed(self, data: bytes) -> list[Event]:
        """Parse `data` (any split of the stream is fine); return the events it completed."""
        if self._state == "stopped":
            self.trailing += data
            return []
        if self._state != "open" or not data:
            return []
        self._buf += data
        if self._tok >= self._fed or self._may_complete():
            chunk = bytes(self._buf[self._fed - self._base:]) if self._tok < self._fed else data
            self._fed = self._base + len(self._buf)
            try:
                self._p.Parse(chunk, False)
            except _Halt:
                pass
            except expat.ExpatError as exc:
                self._fail(*self._classify(exc))
            # After Parse returns, expat's current index is the start of the token it could
            # not finish (the end of the input if there is none): it re-scans that token
            # from its start on the next Parse.
            self._flush_run()
            if self._state == "open":
                index = self._p.CurrentByteIndex
                self._tok = index if index >= 0 else self._fed
        if self._state == "open":
            self._compact_and_check()
        events, self._events = self._events, []
        return events

    @property
    def buffered(self) -> int:
        """Bytes held for an element (or header) that is not complete yet."""
        return len(self._buf)

    # `routes` (both framers): None, or a dict whose keys are (stanza name, domainpart of
    # 'from', domainpart of 'to') as written (`policy.domain_reading.domainpart`).  A
    # jabber:server message/presence/iq whose own unqualified 'from' and 'to' give a key in it
    # is not made into an `Element`: its bytes are an event of type `bytes`, together with
    # the passed stanzas right before it when no byte lies between them.  Decided when the
    # stanza's start tag is read.  The inbound session fills it with the pairs it has already
    # passed a stanza for (all it reads of a stanza is exactly that), so a read of stanzas
    # is forwarded as one buffer (issue 13).

    def release_idle(self) -> bool:
        """Free what an idle stream does not need until the next `feed`; whether anything was
        freed.  The C framer frees its expat parser between first-level elements (and makes
        it again from the stream header when bytes arrive); this one keeps pyexpat's.  Either
        way the events stay exactly the same."""
        return False

    # ---------------------------------------------------------------- slow input

    def _may_complete(self) -> bool:
        """Whether the bytes fed since expat last stopped inside a token could finish it.

        expat re-tokenises an unfinished token from its start on every Parse call (its own
        remedy, reparse deferral since 2.6, is off: it can hold back a complete stream header
        in an interactive protocol).  A peer dripping a 256 KiB attribute value a few bytes
        at a time would cost a re-scan of the whole value per read: quadratic CPU.  So bytes
        are held back from expat until they contain what ends the token expat stopped in:
        a '>' outside quotes for a start tag, '>' for an end tag, '-->' for a comment, '?>'
        for a processing instruction or XML declaration, a non-name byte for a reference.
        Each byte is looked at a bounded number of times, so any input costs linear CPU.
        Other unfinished tokens (a split UTF-8 character, a '\r', ']' in text, a DTD's
        pieces before the header) are a few bytes long, or bounded by the header limit.
        The same rule must hold for any framer behind this API."""
        base, buf = self._base, self._buf
        tok, new = self._tok - base, self._fed - base
        head = bytes(buf[tok:tok + 4])
        if head[:1] == b"&":
            return _REFERENCE_STOP.search(buf, new) is not None
        if head[:1] != b"<" or len(head) < 2:
            return True
        if head[1:2] == b"/":
            return buf.find(b">", new) >= 0
        if head[1:2] == b"?":
            return buf.find(b"?>", max(tok + 2, new - 1)) >= 0
        if head[1:2] == b"!":
            if head == b"<!--":
                return buf.find(b"-->", max(tok + 4, new - 2)) >= 0
            return True   # '<!-' so far, CDATA opener, or a DTD (restricted, and pre-header)
        return self._tag_may_end(tok)

    def _tag_may_end(self, tok: int) -> bool:
        """A '>' outside quoted attribute values after the start tag at `tok` (relative to
        _buf)?  The scan resumes where the previous call stopped."""
        base, buf = self._base, self._buf
        start, at, quote = self._scan
        if start != tok + base:
            at, quote = tok + base + 1, 0
        i, n = at - base, len(buf)
        found = False
        while i < n:
            if quote:
                j = buf.find(quote, i)
                if j < 0:
                    i = n
                    break
                quote, i = 0, j + 1
            else:
                m = _TAG_STOP.search(buf, i)
                if m is None:
                    i = n
                    break
                c = buf[m.start()]
                i = m.start() + 1
                if c == 0x3E:   # '>'
                    found = True
                    break
                quote = c
        self._scan = (tok + base, i + base, quote)
        return found

    # ---------------------------------------------------------------- expat handlers

    def _ns_decl(self, prefix: str | None, uri: str) -> None:
        self._pending_ns[prefix] = uri

    def _xml_decl(self, version: str | None, encoding: str | None, standalone: int) -> None:
        if encoding is not None and encoding.lower().replace("_", "-") not in ("utf-8", "utf8"):
            # RFC 6120 §11.6 / §4.9.3.22
            self._fail(*_error_text("encoding", encoding))
            raise _Halt

    def _start(self, qname: str, attrs: dict[str, str]) -> None:
        depth = self._depth
        self._depth = depth + 1
        if depth == 0:
            self._open_stream(qname, attrs)
            return
        if depth == 1:
            start = self._p.CurrentByteIndex
            self._el_start = start
            self._pending_ns.clear()
            ns, name = _split(qname)
            self._stack = [_Builder(ns, name, _attrs(attrs), start)]
            # Stanzas are routed by their own from/to alone; building their children would
            # be half the framing cost of a small message (bench/parts.py).
            self._flat = ns == NS_SERVER and name in _FLAT_STANZAS
            self._pass = self._flat and self.routes is not None and self._passes(name, attrs)
        elif depth <= _TREE_DEPTH and not self._flat:
            if self._pending_ns:
                self._pending_ns.clear()
            ns, name = _split(qname)
            self._stack.append(_Builder(ns, name, _attrs(attrs), self._p.CurrentByteIndex))
        elif self._pending_ns:
            self._pending_ns.clear()

    def _end(self, qname: str) -> None:
        depth = self._depth - 1
        self._depth = depth
        if depth == 0:
            self._state = "closed"
            self._emit(StreamClosed())
            raise _Halt
        if depth > _TREE_DEPTH or (depth >= 2 and self._flat):
            return
        if depth >= 2:
            b = self._stack.pop()
            span = None
            if depth == 2:
                # Direct child of the first-level element: remember its byte range,
                # relative to the first-level element's start.
                end = self._element_end(b.start, self._p.CurrentByteIndex)
                span = (b.start - self._el_start, end - self._el_start)
            self._stack[-1].children.append(Node(b.ns, b.name, b.attrs, tuple(b.children), span))
            return
        # depth == 1: a first-level element is complete.
        b = self._stack.pop()
        start = self._el_start
        end = self._element_end(start, self._p.CurrentByteIndex)
        if end - start > self.max_stanza_bytes:
            self._too_big(end - start)
            raise _Halt
        if self._pass:
            # Adjacent passed stanzas (no byte between them) leave as one buffer.
            self._pass = False
            if self._run is not None and self._run[1] == start:
                self._run[1] = end
            else:
                self._flush_run()
                self._run = [start, end]
            self._el_start = -1
            self._consumed = end
            return
        raw = bytes(self._buf[start - self._base:end - self._base])
        element = Element(b.ns, b.name, b.attrs, tuple(b.children), None, raw)
        self._el_start = -1
        self._consumed = end
        self._emit(element)
        if self._stop_after is not None and self._stop_after(element):
            self._state = "stopped"
            self.trailing = bytes(self._buf[end - self._base:])
            raise _Halt

    def _open_stream(self, qname: str, attrs: dict[str, str]) -> None:
        ns, name = _split(qname)
        namespaces, self._pending_ns = dict(self._pending_ns), {}
        # RFC 6120 §4.8.1: the root element is <stream> in the stream namespace.
        if name != "stream":
            self._fail(*_error_text("header-name", name))
            raise _Halt
        if ns != NS_STREAMS:
            self._fail(*_error_text("header-ns", ns))
            raise _Halt
        start = self._p.CurrentByteIndex
        end = self._tag_end(start)
        if end > self.max_header_bytes:
            self._header_too_big(end)
            raise _Halt
        self._consumed = end
        self._emit(StreamOpened(_attrs(attrs), namespaces, bytes(self._buf[start - self._base:end - self._base])))

    def _passes(self, name: str, attrs: dict[str, str]) -> bool:
        sender, target = attrs.get("from"), attrs.get("to")
        if sender is None or target is None:
            return False
        return (name, domainpart(sender), domainpart(target)) in self.routes  # type: ignore[operator]

    def _emit(self, event: Event) -> None:
        self._flush_run()
        self._events.append(event)

    def _flush_run(self) -> None:
        """The run of passed stanzas becomes one bytes event (before any other event, and
        before the buffer it lies in changes)."""
        if self._run is not None:
            start, end = self._run
            self._run = None
            self._events.append(bytes(self._buf[start - self._base:end - self._base]))

    def _restricted(self, *what: str) -> None:
        self._fail(*_error_text(*what))
        raise _Halt

    # ---------------------------------------------------------------- framing helpers

    def _tag_end(self, start: int) -> int:
        """Absolute offset just past the start tag beginning at absolute offset `start`."""
        m = _START_TAG.match(self._buf, start - self._base)
        if m is None:  # cannot happen for a tag expat accepted; fail closed if it does
            raise AssertionError(f"no start tag at byte {start}")
        return m.end() + self._base

    def _element_end(self, start: int, event_index: int) -> int:
        """Absolute offset just past the element whose start tag begins at `start`.

        In an end-element callback expat's CurrentByteIndex is the start of the end tag
        `</x>` -- or, for an empty-element tag `<x/>`, the end of that tag.  Which case
        applies is read from the start tag itself (does it end in "/>"), not assumed.
        """
        tag_end = self._tag_end(start)
        rel = tag_end - self._base
        if self._buf[rel - 2:rel] == b"/>":
            return tag_end
        return self._buf.index(b">", event_index - self._base) + 1 + self._base

    def _compact_and_check(self) -> None:
        if self._depth >= 2:
            keep = self._el_start
        elif self._depth == 1:
            # Between first-level elements only whitespace (keepalives) is meaningful;
            # everything up to the next '<' can go, so idle pings never accumulate.
            lt = self._buf.find(b"<", max(0, self._consumed - self._base))
            keep = self._base + len(self._buf) if lt < 0 else self._base + lt
            keep = min(keep, self._tok)   # never bytes expat has not finished with
            self._consumed = keep
        else:
            keep = self._base  # header not complete yet
        drop = keep - self._base
        if drop > 0:
            del self._buf[:drop]
            self._base = keep
        pending = len(self._buf)
        if self._depth == 0:
            if self._base + pending > self.max_header_bytes:
                self._header_too_big(self._base + pending, incomplete=True)
        elif pending > self.max_stanza_bytes:
            self._too_big(pending, incomplete=True)

    def _header_too_big(self, size: int, incomplete: bool = False) -> None:
        self._fail(*_error_text("header-too-big", size, self.max_header_bytes, incomplete))

    def _too_big(self, size: int, incomplete: bool = False) -> None:
        self._fail(*_error_text("too-big", size, self.max_stanza_bytes, incomplete))

    def _classify(self, exc: expat.ExpatError) -> tuple[str, str]:
        return _error_text("expat", exc.code, self._p.ErrorByteIndex, exc.lineno, exc.offset)

    def _fail(self, condition: str, text: str) -> None:
        if self._state in ("failed", "closed"):
            return
        self._state = "failed"
        self._emit(XmlError(condition, text))
        self._buf = bytearray()


def _error_text(kind: str, *args) -> tuple[str, str]:
    """The stream error condition and text for a framing failure of `kind`; both framers
    word their errors through here, so they agree on them too."""
    if kind == "expat":
        code, index, line, column = args
        return _condition_of_expat(code, f"at byte {index} (line {line}, column {column})")
    if kind == "too-big":
        # DESIGN §3.3: a stanza over limits.max_stanza_bytes is a policy-violation.
        size, limit, incomplete = args
        more = "more than " if incomplete else ""
        return "policy-violation", f"element of {more}{size} bytes exceeds the limit of {limit} bytes"
    if kind == "header-too-big":
        size, limit, incomplete = args
        more = "more than " if incomplete else ""
        return "policy-violation", f"stream header of {more}{size} bytes exceeds the limit of {limit} bytes"
    if kind == "encoding":
        return "unsupported-encoding", f"the XML declaration names encoding {args[0]!r}; XMPP is UTF-8 only"
    if kind == "header-name":
        return "bad-format", f"the stream must start with <stream:stream>, not <{args[0]}>"
    if kind == "header-ns":
        return "invalid-namespace", f"the stream element's namespace is {args[0] or 'empty'!r}, not {NS_STREAMS!r}"
    what = {
        "comment": "an XML comment",
        "pi": "a processing instruction <?{} ...?>",
        "doctype": "a DTD (<!DOCTYPE {}>)",
        "entity-decl": "an entity declaration ({})",
        "skipped-entity": "an entity reference &{};",
        "external-entity": "an external entity reference",
    }[kind].format(*args)
    return "restricted-xml", f"{what} is not allowed in an XMPP stream (RFC 6120 §11.1)"


# -------------------------------------------------------------------- the framer in C

def _c_error(kind: str, *args) -> XmlError:
    return XmlError(*_error_text(kind, *args))


try:
    from proxy import _xmlframe
except ImportError:   # built without a compiler: the Python framer does the work
    _xmlframe = None
else:
    _xmlframe.configure(Node, Element, StreamOpened, StreamClosed, _c_error)

    class CXmlStreamParser(_xmlframe.Framer):
        """`PyXmlStreamParser` with its expat handlers in C (proxy/_xmlframe.c): the same
        events for the same bytes, one Python object per first-level element."""

        __slots__ = ()

        def __init__(self, *, max_stanza_bytes: int = DEFAULT_MAX_STANZA_BYTES,
                     stop_after: Callable[[Element], bool] | None = None,
                     max_header_bytes: int = MAX_HEADER_BYTES) -> None:
            super().__init__(max_stanza_bytes, stop_after, max_header_bytes)

FRAMER_ENV = "XMPP_DANE_PROXY_FRAMER"


def _choose_framer() -> str:
    wanted = os.environ.get(FRAMER_ENV, "").strip().lower()
    if wanted not in ("", "c", "python"):
        raise ImportError(f"{FRAMER_ENV}={wanted!r}: use 'c' or 'python'")
    if wanted == "c" and _xmlframe is None:
        raise ImportError(f"{FRAMER_ENV}=c, but the C framer (proxy._xmlframe) is not built")
    # The C framer by default: same events, a fraction of the CPU per stanza (bench/).
    return "python" if wanted == "python" or _xmlframe is None else "c"


#: Which framer `XmlStreamParser` is: "c" or "python" (for logs and bench/).
FRAMER = _choose_framer()
XmlStreamParser: type = CXmlStreamParser if FRAMER == "c" else PyXmlStreamParser
if _xmlframe is None:
    CXmlStreamParser = None  # type: ignore[assignment,misc]



# -------------------------------------------------------------------- building output

def classify_expat_error(exc: expat.ExpatError, where: str, *, prefix_hint: str = "",
                         malformed_hint: str = "") -> tuple[str, str]:
    """The RFC 6120 §4.9.3 stream error condition and text for an expat error at `where`."""
    return _condition_of_expat(exc.code, where, prefix_hint=prefix_hint, malformed_hint=malformed_hint)


def _condition_of_expat(code: int, where: str, *, prefix_hint: str = "",
                        malformed_hint: str = "") -> tuple[str, str]:
    message = expat.ErrorString(code)
    if code in _RESTRICTED_CODES:
        return "restricted-xml", f"{message} {where}: only the five predefined entities may be referenced (RFC 6120 §11.1)"
    if code == _UNBOUND_PREFIX:
        return "bad-namespace-prefix", f"{message} {where}{prefix_hint}"
    if code in _ENCODING_CODES:
        return "unsupported-encoding", f"{message} {where}: XMPP is UTF-8 only"
    return "not-well-formed", f"{message} {where}{malformed_hint}"


def xml_text(text: str) -> str:
    """`text` safe as XML character data: escaped, and characters XML forbids replaced."""
    text = _NOT_XML_CHAR.sub("\ufffd", text)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def xml_attr(value: str) -> str:
    """`value` quoted for use as an attribute value (single quotes)."""
    return "'" + xml_text(value).replace("'", "&apos;").replace('"', "&quot;") + "'"


def stream_header(
    *,
    to: str | None = None,
    from_: str | None = None,
    id: str | None = None,
    version: str | None = "1.0",
    content_ns: str = NS_SERVER,
    dialback: bool = True,
    lang: str | None = "en",
    xml_declaration: bool = True,
) -> bytes:
    """A stream header (RFC 6120 §4.7), with `xmlns:db` when `dialback` (XEP-0220 §2.4.1)."""
    parts = ["<stream:stream", f" xmlns={xml_attr(content_ns)}", f" xmlns:stream={xml_attr(NS_STREAMS)}"]
    if dialback:
        parts.append(f" xmlns:db={xml_attr(NS_DIALBACK)}")
    for name, value in (("from", from_), ("to", to), ("id", id), ("version", version), ("xml:lang", lang)):
        if value is not None:
            parts.append(f" {name}={xml_attr(value)}")
    parts.append(">")
    decl = "<?xml version='1.0'?>" if xml_declaration else ""
    return (decl + "".join(parts)).encode("utf-8")


STREAM_CLOSE = b"</stream:stream>"


def stream_error(condition: str, text: str, *, close: bool = True) -> bytes:
    """`<stream:error>` with `condition` and a `<text>` reason (RFC 6120 §4.9.2), then the
    closing `</stream:stream>` unless `close` is false.  Assumes the `stream` prefix is bound,
    as it is in every header `stream_header` builds.
    """
    if condition not in CONDITIONS:
        raise ValueError(f"{condition!r} is not an RFC 6120 §4.9.3 stream error condition")
    body = (
        f"<stream:error><{condition} xmlns={xml_attr(NS_STREAM_ERRORS)}/>"
        f"<text xmlns={xml_attr(NS_STREAM_ERRORS)} xml:lang='en'>{xml_text(text)}</text></stream:error>"
    ).encode("utf-8")
    return body + (STREAM_CLOSE if close else b"")


__all__ = [
    "CXmlStreamParser", "DEFAULT_MAX_STANZA_BYTES", "Element", "FRAMER", "FRAMER_ENV", "MAX_HEADER_BYTES", "Event",
    "Node", "NS_DIALBACK", "NS_DIALBACK_FEATURES", "NS_SERVER", "NS_STANZA_ERRORS", "NS_STREAM_ERRORS", "NS_STREAMS",
    "NS_TLS", "NS_XML", "PyXmlStreamParser",
    "STREAM_CLOSE", "StreamClosed", "StreamOpened", "XmlError", "XmlStreamParser",
    "stream_error", "stream_header", "xml_attr", "xml_text",
]
