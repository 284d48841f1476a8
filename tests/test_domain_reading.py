"""One reading of every domain (DESIGN §2.6, policy/domain_reading.py)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.domain_reading import DomainReadingError, _read_slowly, domainpart, read_domain


@pytest.mark.parametrize("name,canonical", [
    ("example.org", "example.org"), ("Example.ORG.", "example.org"), ("münchen.example", "xn--mnchen-3ya.example"),
    ("MÜNCHEN.example", "xn--mnchen-3ya.example"), ("xn--mnchen-3ya.example", "xn--mnchen-3ya.example"),
    # An A-label of a deviation character is one domain to both readings (Prosody keeps it
    # as written, UTS #46 validates it): the legitimate spelling of straße.example.
    ("xn--strae-oqa.example", "xn--strae-oqa.example"),
    ("ＥＸＡＭＰＬＥ.org", "example.org"), ("example.org。", "example.org"), ("σ.example", "xn--4xa.example"),
])
def test_one_reading(name, canonical):
    assert read_domain(name) == canonical


@pytest.mark.parametrize("name,words", [
    ("straße.example", ["strasse.example", "xn--strae-oqa.example"]),      # ß
    ("ς.example", ["xn--4xa.example", "xn--3xa.example"]),                 # final sigma
    ("a\u200db.example", ["ab.example", "UTS #46"]),                      # ZWJ
    ("a\u200cb.example", ["ab.example", "UTS #46"]),                      # ZWNJ
    ("☃.example", ["xn--n3h.example", "refused"]),                         # IDNA2008 refuses symbols
    ("foo_bar.example", ["foo_bar.example", "refused"]),
    ("xn--zz.example", ["refused"]),                                       # a malformed A-label
    ("a..b", ["not a domain"]), ("", ["empty"]), ("a@b.example", ["refused"]),
    ("x" * 2000, ["2000 characters"]),
])
def test_two_readings_or_none_are_refused(name, words):
    with pytest.raises(DomainReadingError) as info:
        read_domain(name)
    for word in words:
        assert word in str(info.value), str(info.value)


LDH = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True)


@given(labels=st.lists(LDH, min_size=1, max_size=5), dot=st.booleans())
@settings(max_examples=300)
def test_the_ascii_fast_path_agrees_with_both_readings(labels, dot):
    name = ".".join(labels) + ("." if dot else "")
    try:
        slow = _read_slowly(name)
    except DomainReadingError:
        slow = None
    try:
        fast = read_domain(name)
    except DomainReadingError:
        fast = None
    assert fast == slow


@pytest.mark.parametrize("jid,part", [
    ("u@Example.org/r@x/y", "Example.org"), ("example.org", "example.org"), ("example.org/r", "example.org"),
    ("a@b@c", "b@c"),
])
def test_domainpart(jid, part):
    assert domainpart(jid) == part
