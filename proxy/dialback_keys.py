"""Dialback keys the proxy mints itself, so it can answer their verification itself (DESIGN §3.3).

Once a peer's certificate has proved its domain (DANE, PKIX, POSH), dialback's reverse
connection proves nothing more (XEP-0344 §2).  The proxy then authenticates the pair to the
other side by dialback with a key of its own, and when that key comes back in a `<db:verify>`
it answers from the key alone: no connection, no state to share between workers.

XEP-0185 §3 (the recommended key generation):

    key = HMAC-SHA256(SHA256(secret), receiving + ' ' + originating + ' ' + stream id)

hex-encoded.  Binding the key to both domains and the stream id means a key shown on one stream
cannot be replayed for another pair or another stream (XEP-0185 §2).  The secret is 32 random
bytes per service start; with `[server] workers > 1` the supervisor generates it and hands it
to every worker over its stdin pipe (never the environment or a file), so a key minted by one
worker is recognised by another.  It is never logged.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets

from proxy.s2s_auth import db_verify_answer, element_text
from proxy.xmlstream import Element

# XEP-0185 uses SHA-256 for both steps; 32 bytes is its output size and the key space of the
# HMAC key, so more secret would add nothing.
SECRET_BYTES = 32


class DialbackKeys:
    """Mints keys for (receiving, originating, stream id) and recognises its own."""

    def __init__(self, secret: bytes | None = None) -> None:
        if secret is not None and len(secret) < 16:
            raise ValueError("a dialback secret needs at least 16 bytes")
        self._hmac_key = hashlib.sha256(secret or secrets.token_bytes(SECRET_BYTES)).digest()

    def mint(self, receiving: str, originating: str, stream_id: str) -> str:
        """The key for `originating` authenticating to `receiving` on stream `stream_id`.
        Domains must be in their one canonical form (`policy.domain_reading.read_domain`)."""
        message = f"{receiving} {originating} {stream_id}".encode("utf-8")
        return hmac.new(self._hmac_key, message, hashlib.sha256).hexdigest()

    def is_ours(self, receiving: str, originating: str, stream_id: str, key: str) -> bool:
        """Whether `key` is what `mint` gives for exactly this pair and stream (constant time)."""
        key = key.strip().lower()
        if not stream_id or len(key) != 64:
            return False
        return hmac.compare_digest(self.mint(receiving, originating, stream_id), key)

    def answer(self, verify: Element, sender: str, target: str) -> bytes | None:
        """XEP-0220 §2.1.2: the answer to `<db:verify from=sender to=target id=…>KEY` (domains
        in their one reading) when KEY is one minted here for `target` authenticating to
        `sender` on that stream, else None (the question is for someone else).  Both
        directions answer their side's verifications of the proxy's keys with it."""
        stream_id = verify.attrs.get("id", "")
        if not self.is_ours(receiving=sender, originating=target, stream_id=stream_id, key=element_text(verify)):
            return None
        return db_verify_answer(sender, target, stream_id, True)


def new_secret() -> bytes:
    """A fresh secret for one service start (the supervisor's, shared with its workers)."""
    return secrets.token_bytes(SECRET_BYTES)


__all__ = ["DialbackKeys", "SECRET_BYTES", "new_secret"]
