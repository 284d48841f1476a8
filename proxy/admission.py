"""`limits.max_unauthenticated`: a bound on inbound connections not yet authenticated.

A peer that completes TLS (or not even that) and never gets a domain pair confirmed costs a
slot, a backend connection and DNS lookups for up to `limits.handshake_timeout`.  Without a
bound of their own, enough of them fill `limits.max_connections` and lock everyone out.  With
it, a flood fills only its share: connections over the bound are refused at once
(`resource-constraint`, or a plain close where the peer expects TLS first), while authenticated
streams -- and new peers, once the flood's connections time out -- still have the rest.

Precedents: OpenSSH's `MaxStartups` (unauthenticated connections, default 10 of an unlimited
total), nginx's `limit_conn` applied to handshakes; XMPP servers bound pre-auth streams only by
time (Prosody's and ejabberd's 30 s negotiation timeouts), which the handshake deadline is.
"""
from __future__ import annotations

# 0 in the config: a quarter of max_connections.  Three quarters stay for authenticated
# streams however many never-authenticating peers arrive at once, while a quarter (2,500 of the
# default 10,000) is far above the number of S2S peers that authenticate at the same moment on
# even a large server (each takes a second or so: TLS, DNS, one dialback round trip).
UNAUTHENTICATED_SHARE = 4


def effective_max_unauthenticated(max_unauthenticated: int, max_connections: int) -> int:
    """The bound in force: the configured one, or (0) `max_connections // 4`, at least 1."""
    if max_unauthenticated > 0:
        return min(max_unauthenticated, max_connections)
    return max(1, max_connections // UNAUTHENTICATED_SHARE)


class UnauthenticatedSlots:
    """The count of connections holding an unauthenticated slot."""

    def __init__(self) -> None:
        self.held = 0

    def take(self, limit: int) -> "UnauthenticatedSlot | None":
        """A slot, or None if `limit` are held already."""
        if self.held >= limit:
            return None
        self.held += 1
        return UnauthenticatedSlot(self)


class UnauthenticatedSlot:
    """One connection's slot; `release()` when its first pair is authenticated or it ends
    (the second call does nothing)."""

    __slots__ = ("_owner",)

    def __init__(self, owner: UnauthenticatedSlots) -> None:
        self._owner: UnauthenticatedSlots | None = owner

    def release(self) -> None:
        if self._owner is not None:
            self._owner.held -= 1
            self._owner = None


__all__ = ["UNAUTHENTICATED_SHARE", "UnauthenticatedSlot", "UnauthenticatedSlots", "effective_max_unauthenticated"]
