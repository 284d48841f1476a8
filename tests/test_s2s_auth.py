"""proxy/s2s_auth.py: the SASL and dialback elements both directions read and write."""
import base64

import pytest
from hypothesis import given, strategies as st

from proxy import s2s_auth
from proxy.xmlstream import Element, XmlStreamParser

HEADER = (b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' "
          b"xmlns:db='jabber:server:dialback'>")


def first_element(xml: bytes) -> Element:
    """`xml` framed exactly as a peer's stream would be (prefixes from the header)."""
    return next(e for e in XmlStreamParser().feed(HEADER + xml) if isinstance(e, Element))


def auth(payload: str, mechanism: str = "EXTERNAL") -> Element:
    return first_element(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='{mechanism}'>"
                         f"{payload}</auth>".encode())


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=60))
def test_authzid_round_trips_through_our_own_auth(authzid):
    """What auth_external writes, read_auth reads back (any Unicode authzid)."""
    assert s2s_auth.read_auth(first_element(s2s_auth.auth_external(authzid))) == s2s_auth.SaslAuth("EXTERNAL", authzid)


def test_empty_response_is_no_authzid():
    for payload in ("", "=", "  =  "):
        assert s2s_auth.read_auth(auth(payload)).authzid is None


@pytest.mark.parametrize("payload, condition", [
    ("not base64!", "incorrect-encoding"),
    ("ZXhhbXBsZS5vcmc", "incorrect-encoding"),                       # missing padding
    (base64.b64encode(b"\xff\xfe").decode(), "incorrect-encoding"),  # not UTF-8
    (base64.b64encode(b"a" * 1024).decode(), "malformed-request"),   # over a domainpart's limit
])
def test_bad_payloads_are_named_failures(payload, condition):
    with pytest.raises(s2s_auth.SaslError) as err:
        s2s_auth.read_auth(auth(payload))
    assert err.value.condition == condition


def test_auth_without_mechanism_is_invalid_mechanism():
    el = first_element(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>=</auth>")
    with pytest.raises(s2s_auth.SaslError) as err:
        s2s_auth.read_auth(el)
    assert err.value.condition == "invalid-mechanism"


def test_offered_mechanisms_reads_the_peer_features():
    features = first_element(
        b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
        b"<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>EXTERNAL</mechanism>"
        b"<mechanism>\n SCRAM-SHA-1 </mechanism></mechanisms></stream:features>")
    assert s2s_auth.offered_mechanisms(features) == {"EXTERNAL", "SCRAM-SHA-1"}
    assert s2s_auth.offered_mechanisms(first_element(b"<stream:features/>")) == frozenset()
    # Same local name in another namespace is not a SASL offer.
    other = first_element(b"<stream:features><mechanisms xmlns='urn:example'><mechanism>EXTERNAL"
                          b"</mechanism></mechanisms></stream:features>")
    assert s2s_auth.offered_mechanisms(other) == frozenset()


def test_element_text_decodes_entities_and_ignores_children():
    el = first_element(b"<db:verify from='a' to='b' id='i'>k&amp;&#x41;<x>no</x>y</db:verify>")
    assert s2s_auth.element_text(el) == "k&Ay"


def test_built_elements_parse_with_their_own_prefixes():
    """Each element we write declares its own prefixes, so it frames on a stream whose header
    declared none (what a backend that names no dialback prefix sends)."""
    bare = b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'>"
    for data in (s2s_auth.db_result("a.example", "b.example", "k"),
                 s2s_auth.db_result_answer("a.example", "b.example", True),
                 s2s_auth.db_verify_answer("a.example", "b.example", "id'<", False),
                 s2s_auth.dialback_error("a.example", "b.example", "item-not-found", "why <&>"),
                 s2s_auth.failure("not-authorized", "no <match>"), s2s_auth.success(),
                 s2s_auth.mechanisms_feature("EXTERNAL")):
        events = XmlStreamParser().feed(bare + data)
        assert [type(e).__name__ for e in events][-1] == "Element", (data, events)


def test_dialback_error_reason_reads_what_dialback_error_wrote():
    el = first_element(s2s_auth.dialback_error("a.example", "b.example", "item-not-found", "why <&> here"))
    assert s2s_auth.dialback_error_reason(el) == "item-not-found: why <&> here"
    bare = first_element(b"<db:result from='b' to='a' type='error'/>")
    assert s2s_auth.dialback_error_reason(bare) == "undefined-condition"
