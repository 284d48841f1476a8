"""proxy/dialback_keys.py: XEP-0185 keys, bound to both domains and the stream id."""
import hashlib
import hmac

from hypothesis import given, strategies as st

from proxy.dialback_keys import DialbackKeys

domains = st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}", fullmatch=True)
ids = st.text(alphabet="abcdef0123456789-", min_size=1, max_size=40)


def test_key_is_xep_0185_example_construction():
    """XEP-0185 §3: HMAC-SHA256(SHA256(secret), receiving ' ' originating ' ' id), hex."""
    secret = b"s3cr3tf0rd14lb4ck"
    want = hmac.new(hashlib.sha256(secret).digest(), b"example.org example.com D60000229F",
                    hashlib.sha256).hexdigest()
    assert DialbackKeys(secret).mint("example.org", "example.com", "D60000229F") == want


@given(domains, domains, ids, domains, domains, ids)
def test_a_key_is_valid_for_exactly_its_pair_and_stream(r, o, i, r2, o2, i2):
    keys = DialbackKeys(b"0" * 32)
    key = keys.mint(r, o, i)
    assert keys.is_ours(r, o, i, key)
    assert keys.is_ours(r, o, i, f"  {key.upper()}\n")      # XML text may carry whitespace
    assert keys.is_ours(r2, o2, i2, key) == ((r2, o2, i2) == (r, o, i))


def test_other_secret_other_process_does_not_recognise_the_key():
    key = DialbackKeys(b"a" * 32).mint("local.example", "peer.example", "id1")
    assert not DialbackKeys(b"b" * 32).is_ours("local.example", "peer.example", "id1", key)
    assert not DialbackKeys().is_ours("local.example", "peer.example", "id1", key)


def test_garbage_keys_and_empty_ids_are_not_ours():
    keys = DialbackKeys(b"c" * 32)
    for bad in ("", "x" * 64, "0" * 63, keys.mint("a", "b", "") ):
        assert not keys.is_ours("a", "b", "", bad)
    assert not keys.is_ours("a", "b", "i", "zz" * 40)
