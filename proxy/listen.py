"""Binding the configured listen addresses, with errors that name the address.

An operator whose port 5269 is taken by the backend (or by a second proxy) must see
`cannot listen on [::]:5269: Address already in use`, not a bare errno text: the proxy binds
up to four kinds of listeners and the message is the only hint which one failed.
"""
from __future__ import annotations

import trio


class ListenError(OSError):
    """Binding `address` (as written in the configuration) failed; str() is the operator's line."""

    def __init__(self, address: str, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.address = address

    def __str__(self) -> str:
        return f"cannot listen on {self.address}: {self.strerror}"


async def tcp_listeners(address: str, port: int, host: str | None) -> list[trio.SocketListener]:
    """`trio.open_tcp_listeners(port, host=host)`, raising ListenError naming `address`."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ListenError(address, exc) from exc
