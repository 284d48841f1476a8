"""XML stream framing (proxy/xmlstream.py): events, exact byte spans, RFC 6120 §11 rules, limits."""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import xmlstream
from proxy.xmlstream import (
    NS_DIALBACK, NS_DIALBACK_FEATURES, NS_SERVER, NS_STREAM_ERRORS, NS_STREAMS, NS_TLS,
    Element, StreamClosed, StreamOpened, XmlError, XmlStreamParser, stream_error, stream_header,
)


@pytest.fixture(autouse=True, scope="module", params=["python", "c"])
def framer(request):
    """Every test here runs on both framers (tests/test_xmlstream_differential.py compares them)."""
    global XmlStreamParser
    cls = xmlstream.PyXmlStreamParser if request.param == "python" else xmlstream.CXmlStreamParser
    if cls is None:
        pytest.skip("the C framer is not built")
    saved, XmlStreamParser = XmlStreamParser, cls
    yield request.param
    XmlStreamParser = saved

HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
    b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
    b"from='a.example' to='b.example' version='1.0'>"
)


def feed_all(chunks, **kwargs) -> list:
    parser = XmlStreamParser(**kwargs)
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events


def one_byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


def error_of(events) -> XmlError:
    assert events and isinstance(events[-1], XmlError), events
    assert all(not isinstance(e, XmlError) for e in events[:-1])
    return events[-1]


# ------------------------------------------------------------------------------ basics

def test_header_elements_and_close_with_exact_bytes():
    features = (b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/>"
                b"</starttls><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback></stream:features>")
    result = b"<db:result from='a.example' to='b.example'>c0ffee\xc3\xa9</db:result >"
    empty = b"<presence from='u@a.example' to='v@b.example' note='1 > 0 \"q\"'/>"
    data = HEADER + b"\n  " + features + b" " + result + empty + b"\n</stream:stream>"
    events = feed_all([data])
    opened, feat, res, pres, closed = events
    assert isinstance(opened, StreamOpened)
    assert opened.raw == HEADER[len(b"<?xml version='1.0'?>"):]
    assert (opened.to, opened.from_, opened.version, opened.content_ns) == ("b.example", "a.example", "1.0", NS_SERVER)
    assert opened.namespaces["db"] == NS_DIALBACK and opened.namespaces["stream"] == NS_STREAMS
    assert feat.is_(NS_STREAMS, "features") and feat.raw == features
    starttls = feat.find(NS_TLS, "starttls")
    assert starttls is not None and starttls.find(NS_TLS, "required") is not None
    assert feat.find(NS_DIALBACK_FEATURES, "dialback").find(NS_DIALBACK_FEATURES, "errors") is not None
    assert feat.raw_without(lambda n: n.is_(NS_TLS, "starttls")) == (
        b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback></stream:features>")
    assert res.is_(NS_DIALBACK, "result") and res.attrs == {"from": "a.example", "to": "b.example"}
    assert res.raw == result
    assert pres.is_(NS_SERVER, "presence") and pres.raw == empty and pres.attrs["note"] == '1 > 0 "q"'
    assert isinstance(closed, StreamClosed)


def test_namespaced_attributes_use_clark_notation():
    events = feed_all([HEADER + b"<message xml:lang='de' to='x'><body>hi</body></message>"])
    msg = events[1]
    assert msg.attrs == {"{http://www.w3.org/XML/1998/namespace}lang": "de", "to": "x"}
    # Stanzas are routed by from/to alone: their children are not built (raw is complete).
    assert msg.children == () and msg.raw.endswith(b"<body>hi</body></message>")


def test_tree_is_kept_three_levels_deep_but_raw_is_complete():
    deep = b"<stream:features><a xmlns='urn:x'><b><c><d/></c></b></a></stream:features>"
    features = feed_all([HEADER + deep])[1]
    a = features.find("urn:x", "a")
    b = a.find("urn:x", "b")
    assert b is not None and b.children == ()  # grandchildren's children are not kept
    assert features.raw == deep


def test_text_between_elements_is_dropped_and_not_buffered():
    parser = XmlStreamParser()
    parser.feed(HEADER)
    for _ in range(2000):  # whitespace keepalives (RFC 6120 §4.6.1)
        assert parser.feed(b" \n") == []
    assert parser.buffered == 0
    assert [e.name for e in parser.feed(b"<message/>")] == ["message"]


def test_stream_close_ignores_anything_after():
    parser = XmlStreamParser()
    events = parser.feed(HEADER + b"</stream:stream><garbage")
    assert isinstance(events[-1], StreamClosed) and parser.state == "closed"
    assert parser.feed(b"more <<<") == []


def test_stop_after_starttls_hands_following_bytes_over():
    tls_bytes = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
    parser = XmlStreamParser(stop_after=lambda e: e.is_(NS_TLS, "starttls"))
    events = parser.feed(HEADER + b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>" + tls_bytes[:4])
    assert [type(e) for e in events] == [StreamOpened, Element] and events[1].name == "starttls"
    assert parser.state == "stopped"
    assert parser.feed(tls_bytes[4:]) == []
    assert parser.trailing == tls_bytes


def test_stop_after_when_element_arrives_in_pieces():
    parser = XmlStreamParser(stop_after=lambda e: e.is_(NS_TLS, "starttls"))
    data = HEADER + b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
    events = []
    for chunk in one_byte_at_a_time(data):
        events += parser.feed(chunk)
    assert events[-1].name == "starttls" and parser.trailing == b""


# ------------------------------------------------------------------------------ chunking invariance

_NAMES = ["message", "presence", "iq", "body", "x", "item", "db:result", "db:verify", "stream:features"]
_XML_CHARS = st.characters(
    blacklist_categories=("Cs",),
    blacklist_characters="\x00\x01\x02\x03\x04\x05\x06\x07\x08\x0b\x0c\x0e\x0f\x10\x11\x12\x13\x14"
                         "\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f\ufffe\uffff\r",
)


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;")


@st.composite
def _attr_value(draw) -> str:
    text = draw(st.text(_XML_CHARS, max_size=12))
    quote = draw(st.sampled_from(["'", '"']))
    other = '"' if quote == "'" else "'"
    body = _esc(text).replace(quote, "&apos;" if quote == "'" else "&quot;")
    # A literal '>' and the other quote character are legal inside a quoted value.
    return quote + body + draw(st.sampled_from(["", ">", other, "/>", "&#233;", "&gt;"])) + quote


@st.composite
def _content(draw, depth: int) -> str:
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["text", "cdata", "ref", "elem"] if depth < 4 else ["text", "cdata", "ref"]))
        if kind == "text":
            parts.append(_esc(draw(st.text(_XML_CHARS, max_size=20))))
        elif kind == "cdata":
            parts.append("<![CDATA[" + draw(st.text(_XML_CHARS, max_size=10)).replace("]]>", "") + "]]>")
        elif kind == "ref":
            parts.append(draw(st.sampled_from(["&lt;", "&gt;", "&amp;", "&apos;", "&quot;", "&#x1F600;", "&#10;"])))
        else:
            parts.append(draw(_element(depth + 1)))
    return "".join(parts)


@st.composite
def _element(draw, depth: int = 0) -> str:
    name = draw(st.sampled_from(_NAMES))
    attrs = "".join(
        f"{sep}{key}={draw(_attr_value())}"
        for key, sep in zip(draw(st.lists(st.sampled_from(["to", "from", "id", "type", "xml:lang"]), unique=True, max_size=3)),
                            draw(st.lists(st.sampled_from([" ", "\n", "  "]), min_size=3, max_size=3)))
    )
    if draw(st.booleans()):
        return f"<{name}{attrs}{draw(st.sampled_from(['', ' ']))}/>"
    return f"<{name}{attrs}>{draw(_content(depth))}</{name}{draw(st.sampled_from(['', ' ', chr(10)]))}>"


@st.composite
def _document(draw) -> tuple[bytes, list[bytes]]:
    stanzas = [draw(_element()).encode("utf-8") for _ in range(draw(st.integers(0, 5)))]
    seps = [draw(st.sampled_from([b"", b" ", b"\n", b"\r\n\t"])) for _ in stanzas]
    body = b"".join(sep + s for sep, s in zip(seps, stanzas))
    closing = draw(st.sampled_from([b"</stream:stream>", b""]))
    return HEADER + body + closing, stanzas


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *[c % (len(data) + 1) for c in cuts]})
    return [data[a:b] for a, b in zip(points, points[1:])]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_document(), cuts=st.lists(st.integers(0, 10_000), max_size=30))
def test_any_split_gives_identical_events_and_exact_spans(doc, cuts):
    data, stanzas = doc
    whole = feed_all([data])
    assert not any(isinstance(e, XmlError) for e in whole), whole
    assert [e.raw for e in whole if isinstance(e, Element)] == stanzas
    assert feed_all(_split(data, cuts)) == whole


@settings(max_examples=40, deadline=None)
@given(doc=_document())
def test_one_byte_at_a_time_gives_identical_events(doc):
    data, _ = doc
    assert feed_all(one_byte_at_a_time(data)) == feed_all([data])


@settings(max_examples=100, deadline=None)
@given(doc=_document(), cuts=st.lists(st.integers(0, 10_000), max_size=10), junk=st.sampled_from(
    [b"<a></b>", b"<!-- c -->", b"&bogus;", b"<?pi?>", b"\xff", b"<a x='1' x='2'/>", b"<u:x/>"]))
def test_errors_are_chunking_invariant_too(doc, cuts, junk):
    data = doc[0].removesuffix(b"</stream:stream>") + junk
    whole = feed_all([data])
    assert isinstance(whole[-1], XmlError)
    assert feed_all(_split(data, cuts)) == whole


def test_utf8_split_inside_a_character():
    text = "é日本😀".encode("utf-8")
    stanza = b"<message to='x'><body>" + text + b"</body></message>"
    data = HEADER + stanza
    for cut in range(len(HEADER), len(data)):
        events = feed_all([data[:cut], data[cut:]])
        assert events[1].raw == stanza, cut


@pytest.mark.parametrize("bad", [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe6\x97"])
def test_invalid_utf8_is_not_well_formed(bad):
    err = error_of(feed_all([HEADER + b"<message><body>" + bad + b"</body></message>"]))
    assert err.condition == "not-well-formed"


# ------------------------------------------------------------------------------ RFC 6120 §11.1

RESTRICTED = {
    "comment at stream level": HEADER + b"<!-- hello -->",
    "comment inside a stanza": HEADER + b"<message><!-- hello --></message>",
    "comment before the header": b"<!-- hi --><stream:stream xmlns:stream='http://etherx.jabber.org/streams'>",
    "processing instruction inside": HEADER + b"<message><?php echo 1 ?></message>",
    "processing instruction before header": b"<?xml version='1.0'?><?xml-stylesheet href='x'?>" + HEADER[21:],
    "internal DTD subset": b"<?xml version='1.0'?><!DOCTYPE stream:stream [<!ELEMENT x ANY>]>" + HEADER[21:],
    "external DTD": b"<!DOCTYPE stream:stream SYSTEM 'http://127.0.0.1/evil.dtd'>" + HEADER[21:],
    "entity declaration": b"<!DOCTYPE s [<!ENTITY e 'x'>]>" + HEADER[21:],
    "external entity (XXE)": b"<!DOCTYPE s [<!ENTITY xxe SYSTEM 'file:///etc/passwd'>]>" + HEADER[21:] + b"<m>&xxe;</m>",
    "undefined entity in text": HEADER + b"<message><body>&nbsp;</body></message>",
    "undefined entity in attribute": HEADER + b"<message to='&foo;'/>",
    "billion laughs": (
        b"<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'>"
        + b"".join(b"<!ENTITY lol%d '%s'>" % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10) for i in range(1, 10))
        + b"]>" + HEADER[21:] + b"<message><body>&lol9;</body></message>"
    ),
}


@pytest.mark.parametrize("name", sorted(RESTRICTED))
def test_restricted_xml(name):
    data = RESTRICTED[name]
    for chunks in ([data], one_byte_at_a_time(data)):
        err = error_of(feed_all(chunks))
        assert err.condition == "restricted-xml", (name, err)
        assert "RFC 6120 §11.1" in err.text


def test_predefined_entities_and_character_references_are_fine():
    stanza = b"<message to='a&amp;b&apos;'><body>&lt;&gt;&amp;&apos;&quot;&#233;&#x1F600;</body></message>"
    events = feed_all([HEADER + stanza])
    assert events[1].raw == stanza and events[1].attrs["to"] == "a&b'"


def test_parser_accepts_nothing_after_an_error():
    parser = XmlStreamParser()
    assert isinstance(parser.feed(HEADER + b"<a></b>")[-1], XmlError)
    assert parser.state == "failed"
    assert parser.feed(b"<message/>") == []


@pytest.mark.parametrize("data,condition", [
    (b"<?xml version='1.0' encoding='ISO-8859-1'?>" + HEADER[21:], "unsupported-encoding"),
    (b"<stream:stream xmlns:stream='urn:wrong'>", "invalid-namespace"),
    (b"<stream xmlns='jabber:server'>", "invalid-namespace"),
    (b"<html xmlns='http://www.w3.org/1999/xhtml'>", "bad-format"),
    (b"<foo:stream>", "bad-namespace-prefix"),
    (HEADER + b"<foo:message/>", "bad-namespace-prefix"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not-well-formed"),
    (b"\x16\x03\x01\x00\xa5\x01\x00", "not-well-formed"),
    (HEADER + b"<message></presence>", "not-well-formed"),
    (HEADER + b"<message a='1' a='2'/>", "not-well-formed"),
    (HEADER + b"<?xml version='1.0'?>", "not-well-formed"),
])
def test_bad_input_conditions(data, condition):
    assert error_of(feed_all([data])).condition == condition


# ------------------------------------------------------------------------------ size limit

def test_element_exactly_at_the_limit_passes_one_byte_over_fails():
    def stanza(size: int) -> bytes:
        head, tail = b"<message><body>", b"</body></message>"
        return head + b"x" * (size - len(head) - len(tail)) + tail

    ok = stanza(1000)
    assert feed_all([HEADER + ok], max_stanza_bytes=1000)[1].raw == ok
    err = error_of(feed_all([HEADER + stanza(1001)], max_stanza_bytes=1000))
    assert err.condition == "policy-violation" and "1001 bytes" in err.text and "1000" in err.text
    # the same when the bytes trickle in
    err = error_of(feed_all(one_byte_at_a_time(HEADER + stanza(1001)), max_stanza_bytes=1000))
    assert err.condition == "policy-violation"


@pytest.mark.parametrize("opening", [
    b"<message><body>",            # endless text
    b"<message><body><x/><y/>",    # endless children
    b"<message to='",              # endless attribute value: start tag never completes
])
def test_oversized_element_is_refused_while_still_arriving(opening):
    limit = 4096
    parser = XmlStreamParser(max_stanza_bytes=limit)
    assert isinstance(parser.feed(HEADER)[0], StreamOpened)
    events = parser.feed(opening)
    chunk = (b"<z/>" if opening.endswith(b"<y/>") else b"A") * 512
    fed = len(opening)
    while not events:
        events = parser.feed(chunk)
        fed += len(chunk)
        assert parser.buffered <= limit + len(chunk)
        assert fed < 10 * limit, "no error although far more than the limit arrived"
    assert error_of(events).condition == "policy-violation"
    assert fed <= limit + len(chunk)


def test_oversized_header_is_refused():
    parser = XmlStreamParser(max_stanza_bytes=2048)
    events = parser.feed(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' x='")
    while not events:
        events = parser.feed(b"a" * 1000)
    assert error_of(events).condition == "policy-violation"


def test_limit_counts_per_element_not_per_stream():
    stanza = b"<message><body>" + b"y" * 800 + b"</body></message>"
    events = feed_all([HEADER] + [stanza] * 50, max_stanza_bytes=1000)
    assert len([e for e in events if isinstance(e, Element)]) == 50


# ------------------------------------------------------------------------------ output builders

def test_stream_header_and_error_parse_back():
    header = stream_header(to="b.example", from_="a'<&>.example", id="abc")
    err = stream_error("not-authorized", "certificate <rejected> & \"so\" \x00\x07 on")
    events = feed_all([header + err])
    opened, error, closed = events
    assert opened.from_ == "a'<&>.example" and opened.id == "abc" and opened.namespaces["db"] == NS_DIALBACK
    assert error.is_(NS_STREAMS, "error")
    assert error.find(NS_STREAM_ERRORS, "not-authorized") is not None
    assert error.find(NS_STREAM_ERRORS, "text") is not None
    assert b"certificate &lt;rejected&gt; &amp; \"so\" \xef\xbf\xbd\xef\xbf\xbd on" in error.raw
    assert isinstance(closed, StreamClosed)


def test_stream_error_refuses_unknown_conditions():
    with pytest.raises(ValueError):
        stream_error("no-such-condition", "x")


def test_random_garbage_never_crashes_and_always_fails_or_waits():
    rng = random.Random(6120)
    for _ in range(300):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        events = feed_all([HEADER + junk])
        assert isinstance(events[0], StreamOpened)
        assert all(not isinstance(e, XmlError) for e in events[:-1])
