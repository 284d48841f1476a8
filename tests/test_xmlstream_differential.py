"""The C framer (proxy/_xmlframe.c) against the Python framer: the same events for any input.

A framer that disagreed with the other one about where an element ends, what it is called or
whether it is allowed would be a parser differential a peer could use to smuggle an element
(issue 13).  So both are fed the same bytes in the same chunks -- well-formed streams, hostile
XML (DTDs, entities, comments, PIs, namespace tricks, CDATA, huge attributes, deep nesting),
broken UTF-8 and random mutations -- and must return equal events after every single `feed`,
with equal `state`, `buffered` and `trailing`.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import xmlstream
from proxy.xmlstream import NS_TLS, Element, PyXmlStreamParser, StreamOpened, XmlError

pytestmark = pytest.mark.skipif(xmlstream.CXmlStreamParser is None, reason="the C framer is not built")

NS_DECLS = (b" xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'"
            b" xmlns:db='jabber:server:dialback'")
HEADERS = [
    b"<?xml version='1.0'?><stream:stream" + NS_DECLS + b" to='b.example' from='a.example' version='1.0'>",
    b"<stream:stream" + NS_DECLS + b">",
    b"\xef\xbb\xbf<stream:stream" + NS_DECLS + b" xml:lang='en'>",
    b"<?xml version='1.0' encoding='UTF-8'?>\n<stream:stream" + NS_DECLS + b">",
    b"<?xml version='1.0' encoding='utf_8'?><stream:stream" + NS_DECLS + b">",
    b"<?xml version='1.0' encoding='latin-1'?><stream:stream" + NS_DECLS + b">",
    b"<?xml version='1.0' standalone='yes'?><stream:stream" + NS_DECLS + b">",
    b"<s:stream xmlns:s='http://etherx.jabber.org/streams' xmlns='jabber:server' xmlns:stream='urn:other'>",
    b"<stream xmlns='http://etherx.jabber.org/streams'>",
    b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns=''>",
    b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns:xml='http://www.w3.org/XML/1998/namespace'>",
    b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' a:b='1' xmlns:a='urn:a' xmlns='jabber:client'>",
    b"<stream:stream xmlns:stream='urn:wrong'>",
    b"<stream:foo xmlns:stream='http://etherx.jabber.org/streams'>",
    b"<stream:stream" + NS_DECLS + b"/>",
    b"<stream:stream" + NS_DECLS + b" id='&lt;&#x1F600;&amp;'>",
    b"  \n<stream:stream" + NS_DECLS + b">",
]

STANZA_NAMES = [b"message", b"presence", b"iq", b"db:result", b"db:verify", b"stream:features",
                b"stream:error", b"r", b"starttls", b"x:y", b"stream:stream"]
ATTRS = [b" to='b.example'", b" from='a@a.example/r'", b" type='valid'", b" id='1'",
         b" xml:lang='de'", b" xmlns='urn:ietf:params:xml:ns:xmpp-tls'", b" xmlns='jabber:server'",
         b" xmlns='jabber:client'", b" xmlns=''", b" xmlns:x='urn:x'", b" x:a='1'",
         b" note='a > b \"q\" /&gt;'", b' v="it\'s"', b" to='&#233;&amp;&#x10000;'",
         b" xmlns:stream='urn:not-streams'", b" xmlns:db='urn:not-dialback'",
         b" a='1' a='2'", b" xmlns:x='urn:x' xmlns:z='urn:x' x:k='1' z:k='2'",
         b" xmlns:xmlns='urn:bad'", b" xmlns:xml='urn:bad'", b" xmlns:p=''", b" to='\t\n\r'"]
CONTENT = [b"hello", b"\xc3\xa9\xe6\x97\xa5\xf0\x9f\x98\x80", b"&lt;&gt;&amp;&apos;&quot;", b"&#10;&#x1F600;",
           b"<![CDATA[ <not> & an ]] element ]]>", b"<body>text</body>", b"<a xmlns='urn:a'><b><c><d/></c></b></a>",
           b"<x:q/>", b"<required/>", b"<errors xmlns='urn:xmpp:features:dialback'/>",
           b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>",
           b"<text xmlns='urn:ietf:params:xml:ns:xmpp-streams' xml:lang='en'>bye</text>",
           b"<message xmlns='jabber:server'/>", b" \n\t ", b"\r\n"]
HOSTILE = [
    b"<!-- comment -->", b"<?pi data?>", b"<?xml version='1.0'?>", b"<?xml-stylesheet href='x'?>",
    b"<!DOCTYPE x>", b"<!DOCTYPE s [<!ENTITY e 'x'>]>", b"<!ENTITY e SYSTEM 'file:///etc/passwd'>",
    b"&e;", b"&nbsp;", b"&#0;", b"&#xD800;", b"&#65535;", b"<![CDATA[x]]>", b"]]>",
    b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe6\x97", b"\xf4\x90\x80\x80", b"\x00", b"\x0c",
    b"<u:x/>", b"<x u:a='1'/>", b"</stream:stream>", b"</stream:stream>trailing<junk",
    b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>\x16\x03\x01\x02\x00",
    b"<a></b>", b"<a", b"<a b='", b">", b"<", b"&", b"&amp", b"<1/>", b"<a:b:c/>",
    b"<x xmlns:p='urn:p'><p:y xmlns:p='urn:q' p:z='1'/></x>",
    b"<x xmlns='urn:a'><y xmlns=''><z/></y></x>",
    b"<x xmlns:a='has space'/>",
    b"<message xmlns:m='jabber:server'><m:body/></message>",
    b"<m:message xmlns:m='jabber:server' to='x' from='y'/>",
    b"<message xmlns='jabber:client' to='x'><body/></message>",
    b"<stream:features><a xmlns='urn:x'><b><c><d/></c></b></a><starttls xmlns='" + NS_TLS.encode()
    + b"'/><x xmlns='urn:y'/></stream:features>",
    b"<db:result from='a.example' to='b.example' type='valid'/>",
    b"<stream:error><not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>",
]


@st.composite
def element(draw, depth: int = 0) -> bytes:
    name = draw(st.sampled_from(STANZA_NAMES if depth == 0 else STANZA_NAMES + [b"body", b"a", b"x"]))
    attrs = b"".join(draw(st.lists(st.sampled_from(ATTRS), max_size=3)))
    if draw(st.integers(0, 3)) == 0:
        return b"<" + name + attrs + draw(st.sampled_from([b"/>", b" />"]))
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.integers(0, 9))
        if kind < 6:
            parts.append(draw(st.sampled_from(CONTENT)))
        elif kind < 8 and depth < 5:
            parts.append(draw(element(depth + 1)))
        elif kind == 8:
            parts.append(draw(st.sampled_from(HOSTILE)))
        else:
            parts.append(draw(st.binary(max_size=8)))
    return b"<" + name + attrs + b">" + b"".join(parts) + b"</" + name + draw(st.sampled_from([b">", b" >", b"\n>"]))


@st.composite
def stream(draw) -> bytes:
    parts = [draw(st.sampled_from(HEADERS))]
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 9))
        if kind < 6:
            parts.append(draw(element()))
        elif kind < 8:
            parts.append(draw(st.sampled_from(HOSTILE + CONTENT)))
        elif kind == 8:
            # Deep nesting and long runs: limits and the buffer arithmetic.
            n = draw(st.integers(1, 300))
            parts.append(draw(st.sampled_from([b"<a>" * n, b"<message><body>" + b"x" * (n * 7),
                                               b"<iq to='" + b"v" * (n * 5) + b"'/>", b" " * n])))
        else:
            parts.append(draw(st.binary(max_size=20)))
    data = b"".join(parts)
    if data and draw(st.integers(0, 4)) == 0:
        # A random byte flipped somewhere: whatever that makes, both must agree on it.
        pos = draw(st.integers(0, len(data) - 1))
        data = data[:pos] + bytes([draw(st.integers(0, 255))]) + data[pos + 1:]
    return data


def chunks_of(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *[c % (len(data) + 1) for c in cuts]})
    return [data[a:b] for a, b in zip(points, points[1:])]


def starttls(el: Element) -> bool:
    return el.is_(NS_TLS, "starttls")


# Routes (stanza name, from domainpart, to domainpart) for the fast path: the JIDs and names
# the generated streams use, plus near misses (case, a trailing dot, the other direction).
ROUTES = {(name, frm, to): True for name in ("message", "presence", "iq")
          for frm, to in (("a.example", "b.example"), ("y", "x"), ("a.example", "x"))}
ROUTES.update({("message", "A.example", "b.example"): True, ("iq", "b.example", "a.example."): True})


def both_agree(chunks: list[bytes], max_stanza_bytes: int, stop: bool, release: bool = False,
               routes: dict | None = None, **more) -> list:
    """`release`: the C framer frees its expat parser whenever it can after a chunk
    (`release_idle`, memory per idle stream) and must still agree on every event.  `routes`:
    both pass the stanzas it names as bytes (routes are only ever added to, between feeds)."""
    kwargs = {"max_stanza_bytes": max_stanza_bytes, "stop_after": starttls if stop else None, **more}
    py, c = PyXmlStreamParser(**kwargs), xmlstream.CXmlStreamParser(**kwargs)
    if routes is not None:
        py.routes, c.routes = dict(routes), dict(routes)
    seen = []
    for i, chunk in enumerate(chunks):
        want = py.feed(chunk)
        got = c.feed(chunk)
        assert got == want, (i, chunk)
        assert (c.state, c.buffered, c.trailing) == (py.state, py.buffered, py.trailing), i
        if release:
            c.release_idle()
            assert py.release_idle() is False
        seen += want
    return seen


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=stream(), cuts=st.lists(st.integers(0, 100_000), max_size=12),
       limit=st.sampled_from([48, 160, 700, 4096, xmlstream.DEFAULT_MAX_STANZA_BYTES]),
       stop=st.booleans(), release=st.booleans(), routes=st.sampled_from([None, {}, ROUTES]), draw=st.data())
def test_same_events_for_any_stream_and_any_chunking(data, cuts, limit, stop, release, routes, draw):
    chunks = chunks_of(data, cuts)
    # The limit right at, just under or just over the size of an element (or the header,
    # or what is buffered after a chunk) of this very stream: the edges of every bound.
    sizes = [len(e.raw) for e in PyXmlStreamParser().feed(data) if isinstance(e, (Element, StreamOpened))]
    sizes += [len(b"".join(chunks[:i + 1])) for i in range(min(3, len(chunks)))]
    if sizes and draw.draw(st.booleans()):
        limit = max(1, draw.draw(st.sampled_from(sizes)) + draw.draw(st.sampled_from([-1, 0, 1])))
    more = {}
    if draw.draw(st.booleans()):
        # The header bound, counted from the first byte, at the edges of this stream's header.
        ends = [len(e.raw) + data.find(e.raw) for e in PyXmlStreamParser().feed(data)[:1]
                if isinstance(e, StreamOpened)] or [len(data)]
        more["max_header_bytes"] = max(1, draw.draw(st.sampled_from(ends)) + draw.draw(st.sampled_from([-1, 0, 1])))
    both_agree(chunks, limit, stop, release, routes, **more)


@settings(max_examples=150, deadline=None)
@given(data=stream(), stop=st.booleans(), release=st.booleans(), routes=st.sampled_from([None, ROUTES]))
def test_same_events_one_byte_at_a_time(data, stop, release, routes):
    both_agree([data[i:i + 1] for i in range(len(data))], 4096, stop, release, routes)


RELAYED = [b"<message from='u@a.example/r' to='v@b.example'><body>1</body></message>",
           b"<presence to='b.example' from='a.example'/>",
           b"<iq from='y' to='x' type='get' id='1'><q xmlns='urn:q'/></iq>",
           b"<message from='u@A.example' to='b.example'/>",          # another spelling: its own route
           b"<message from='u@a.example' to='w@c.example'/>",        # no route
           b"<message to='b.example'/>",                              # no 'from'
           b"<message xmlns='jabber:client' from='a.example' to='b.example'/>",
           b"<m:message xmlns:m='jabber:server' from='a.example' to='b.example'/>",
           b"<message x:from='a.example' xmlns:x='urn:x' to='b.example' from='c.example'/>",
           b"<db:result from='a.example' to='b.example'>k</db:result>", b" ", b"\n"]


@settings(max_examples=400, deadline=None)
@given(items=st.lists(st.sampled_from(RELAYED + HOSTILE[:12]), max_size=12),
       cuts=st.lists(st.integers(0, 4000), max_size=8), release=st.booleans())
def test_passed_stanzas_agree_and_are_exactly_the_routed_ones(items, cuts, release):
    """The fast path: both framers pass the same stanzas, as the same merged buffers, and
    their bytes are exactly the routed stanzas as received, in order."""
    data = HEADERS[0] + b"".join(items)
    events = both_agree(chunks_of(data, cuts), 4096, False, release, ROUTES)
    plain = PyXmlStreamParser(max_stanza_bytes=4096).feed(data)

    def dp(jid: str) -> str:   # the domainpart as written (RFC 7622 §3.2)
        local, at, domain = jid.partition("/")[0].partition("@")
        return domain if at else local

    def routed(e) -> bool:
        return (isinstance(e, Element) and e.ns == "jabber:server" and e.name in ("message", "presence", "iq")
                and "from" in e.attrs and "to" in e.attrs and (e.name, dp(e.attrs["from"]), dp(e.attrs["to"])) in ROUTES)

    if not any(isinstance(e, XmlError) for e in plain):
        assert b"".join(e for e in events if isinstance(e, bytes)) == b"".join(e.raw for e in plain if routed(e))
        assert [e for e in events if not isinstance(e, bytes)] == [e for e in plain if not routed(e)]


def test_a_read_of_passed_stanzas_only_leaves_as_the_same_object_and_the_rest_is_kept():
    """The C framer parses a read where it lies when nothing was held back (issue 13): a read
    that is nothing but passed stanzas is forwarded as that very bytes object; a read that
    ends inside one forwards the complete ones and keeps the rest, which the next read
    completes."""
    stanza = b"<message from='a@a.example/r' to='b@b.example' type='chat'><body>x</body></message>"
    c = xmlstream.CXmlStreamParser()
    c.feed(HEADERS[0])
    c.routes = dict(ROUTES)
    assert ("message", "a.example", "b.example") in c.routes
    read = stanza * 3
    (event,) = c.feed(read)
    assert event is read
    first = stanza * 2 + stanza[:20]
    (event,) = c.feed(first)
    assert event == stanza * 2 and event is not first
    del first                                 # the caller's buffer goes; the tail was copied
    (event,) = c.feed(bytearray(stanza[20:] + stanza))
    assert event == stanza * 2 and isinstance(event, bytes)


@settings(max_examples=300, deadline=None)
@given(header=st.sampled_from(HEADERS), items=st.lists(st.sampled_from(
    [b"<message to='b@b.example' from='a@a.example'><body>x</body></message>", b" ", b"\n", b"\r\n",
     b"<iq\nto='x'/>", b"<db:result from='a' to='b'>k</db:result>\n\n"] + HOSTILE), max_size=8))
def test_released_between_every_element_same_events(header, items):
    """One element per read, the parser released after each: the replayed header must leave
    expat exactly as it was (namespaces, offsets, lines and columns of later errors)."""
    both_agree([header, *items], 4096, False, release=True)


def test_release_frees_the_parser_and_only_between_elements():
    import tracemalloc

    header = HEADERS[0]
    tracemalloc.start()   # expat allocates through Python's allocator in the C framer
    try:
        c = xmlstream.CXmlStreamParser()
        assert c.release_idle() is False                      # no header yet
        c.feed(header[:10])
        assert c.release_idle() is False
        c.feed(header[10:] + b"<message to='b' from='a'><body>")
        assert c.release_idle() is False                      # inside an element
        c.feed(b"</body></message>")
        before = tracemalloc.get_traced_memory()[0]
        assert c.release_idle() is True
        freed = before - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert c.release_idle() is False                      # released already
    (el,) = c.feed(b"<iq to='b' from='a' type='get'/>")
    assert el.raw == b"<iq to='b' from='a' type='get'/>" and el.attrs["type"] == "get"
    assert freed > 4096, freed                             # expat's pools and tables


@settings(max_examples=300, deadline=None)
@given(junk=st.binary(max_size=200), header=st.sampled_from(HEADERS))
def test_same_events_for_random_bytes(junk, header):
    both_agree([header + junk], 1000, False)
    both_agree([junk], 1000, False)


@pytest.mark.parametrize("data", HOSTILE)
def test_each_hostile_fragment_in_a_stream(data):
    events = both_agree([HEADERS[0], data, b"<message to='x' from='y'/>"], 4096, True)
    assert isinstance(events[0], StreamOpened)


def test_elements_larger_than_a_parse_chunk():
    # pyexpat hands expat 1 MiB at a time; the C framer does the same.
    big = b"<message to='x'><body>" + b"z" * (3 << 20) + b"</body></message>"
    events = both_agree([HEADERS[1] + big + big[:100]], 4 << 20, False)
    assert [e.raw for e in events if isinstance(e, Element)] == [big]
    events = both_agree([HEADERS[1] + big], 1 << 20, False)
    assert isinstance(events[-1], XmlError) and events[-1].condition == "policy-violation"


def test_billion_laughs_and_deep_nesting_agree():
    laughs = (b"<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'>"
              + b"".join(b"<!ENTITY lol%d '%s'>" % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
                         for i in range(1, 10))
              + b"]>" + HEADERS[1] + b"<message><body>&lol9;</body></message>")
    assert both_agree([laughs], 4096, False)[-1].condition == "restricted-xml"
    deep = HEADERS[1] + b"<message>" + b"<a>" * 20000 + b"</a>" * 20000 + b"</message>"
    events = both_agree([deep], 1 << 20, False)
    assert events[-1].raw.startswith(b"<message><a><a>")


@settings(max_examples=200, deadline=None)
@given(token=st.sampled_from([
    b"<message to='" + b"v" * 3000 + b"' from='x>y'>",
    b"<message to=\"" + b"'>" * 500 + b"\" note='\">'/>",
    b"<!--" + b"- -" * 500 + b"-->", b"<?pi " + b"?" * 700 + b"?>", b"</message" + b" " * 2000 + b">",
    b"&" + b"a" * 1500 + b";", b"&#" + b"1" * 900 + b";", b"&amp;" * 300, b"&#\xff\xfe;", b"&a\x80#b;", b"<![CDATA[" + b"]" * 900 + b"]]>",
    b"<message xmlns='jabber:server' to='a' from='b'>" + b"<x y='" + b"z" * 2000 + b"'/>" * 2 + b"</message>",
]), prefix=st.sampled_from([b"", b"<message>", b"<message><body>"]), sizes=st.lists(st.integers(1, 9), min_size=1, max_size=40))
def test_dripped_long_tokens_are_held_back_alike(token, prefix, sizes):
    """A token fed a few bytes at a time: both hold the bytes back from expat until they can
    end it (linear CPU) and report what follows after the same feed."""
    data = HEADERS[1] + prefix + token + b"</message>"
    chunks, at, i = [], 0, 0
    while at < len(data):
        n = sizes[i % len(sizes)]
        chunks.append(data[at:at + n])
        at, i = at + n, i + 1
    both_agree(chunks, 2048, False)
    both_agree(chunks, 1 << 20, False)


@pytest.mark.parametrize("pad", [0, 1, 8000, 8100, 8192, 9000])
def test_header_bound_agrees(pad):
    header = HEADERS[0].replace(b" version='1.0'>", b" version='1.0' x='" + b"p" * pad + b"'>")
    for split in (None, 7, 1000):
        chunks = [header] if split is None else [header[i:i + split] for i in range(0, len(header), split)]
        events = both_agree(chunks + [b"<message/>"], 1 << 20, False)
        assert isinstance(events[0], StreamOpened) == (len(header) <= xmlstream.MAX_HEADER_BYTES)


@pytest.mark.parametrize("wanted,framer", [("", "c"), ("c", "c"), ("python", "python"), ("PYTHON ", "python")])
def test_the_framer_is_chosen_at_import(wanted, framer):
    code = "from proxy import xmlstream as x; print(x.FRAMER, x.XmlStreamParser.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "XMPP_DANE_PROXY_FRAMER": wanted}).stdout.split()
    assert out == [framer, {"c": "CXmlStreamParser", "python": "PyXmlStreamParser"}[framer]]


def test_an_unknown_framer_is_refused_at_import():
    run = subprocess.run([sys.executable, "-c", "import proxy.xmlstream"], capture_output=True, text=True,
                         env={**os.environ, "XMPP_DANE_PROXY_FRAMER": "rust"})
    assert run.returncode != 0 and "XMPP_DANE_PROXY_FRAMER='rust': use 'c' or 'python'" in run.stderr
