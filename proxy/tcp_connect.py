"""TCP to a peer: happy eyeballs (RFC 8305) over IP literals that *our* validating resolver
returned.  Each attempt is `trio.open_tcp_stream(IP, port)`: the OS resolver is never asked
for a name, so the address connected to is always one DNSSEC evidence vouched for.

Its own module so that every client that reaches out (the S2S connector in `proxy.connect`,
the HTTPS GET of POSH and host-meta in `proxy.https_get`) shares it without importing each
other.
"""
from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence

import trio

__all__ = ["ConnectError", "HAPPY_EYEBALLS_DELAY", "format_address", "open_tcp", "order_addresses"]

# RFC 8305 §5: "the recommended value for the Connection Attempt Delay is 250 ms"; also
# trio's open_tcp_stream default and what Firefox/Chrome use.
HAPPY_EYEBALLS_DELAY = 0.25


class ConnectError(Exception):
    """TCP could not be established to any address; the message lists each address's error."""


def format_address(ip: str, port: int) -> str:
    """`IP:PORT`, `[v6]:PORT` (the `peer=` form of DESIGN §6)."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def order_addresses(addresses: Sequence[str]) -> list[str]:
    """Connection order for one target's addresses (RFC 8305 §4): IPv6 first, then the
    families alternate, each family keeping its resolver order.  Non-IP text is dropped (it
    would make the OS resolve a name)."""
    v6, v4 = [], []
    for text in addresses:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        (v6 if ip.version == 6 else v4).append(str(ip))
    out: list[str] = []
    for i in range(max(len(v6), len(v4))):
        out += v6[i:i + 1] + v4[i:i + 1]
    return out


async def open_tcp(addresses: Sequence[str], port: int, *,
                   delay: float = HAPPY_EYEBALLS_DELAY) -> tuple[trio.SocketStream, str]:
    """Connect to the first of `addresses` (IP literals) that answers, RFC 8305 style.

    An attempt starts; if it has neither failed nor succeeded after `delay` seconds (or as
    soon as it fails) the next address is tried in parallel; the first connection wins and the
    rest are cancelled.  Returns (stream, IP).  Raises ConnectError naming every failure.
    """
    ordered = order_addresses(addresses)
    if not ordered:
        raise ConnectError("no IP address to connect to")
    winner: tuple[trio.SocketStream, str] | None = None
    errors: list[str] = []

    async with trio.open_nursery() as nursery:

        async def attempt(ip: str, failed: trio.Event) -> None:
            nonlocal winner
            try:
                # An IP literal: trio's getaddrinfo takes its numeric fast path, no DNS.
                stream = await trio.open_tcp_stream(ip, port, happy_eyeballs_delay=delay)
            except OSError as exc:
                errors.append(f"{format_address(ip, port)}: {_os_reason(exc)}")
                failed.set()
                return
            if winner is None:
                winner = (stream, ip)
                nursery.cancel_scope.cancel()
            else:
                await trio.aclose_forcefully(stream)

        for ip in ordered:
            failed = trio.Event()
            nursery.start_soon(attempt, ip, failed)
            with trio.move_on_after(delay):
                await failed.wait()
    if winner is None:
        raise ConnectError("; ".join(errors) or "connection failed")
    return winner


def _os_reason(exc: OSError) -> str:
    # open_tcp_stream wraps the real error ("Connection refused") in an OSError whose cause
    # is a group of per-address errors; one address here, so one error to name.
    cause = exc.__cause__
    inner = getattr(cause, "exceptions", None)
    if inner:
        exc = inner[0]
    if exc.errno:
        return os.strerror(exc.errno)     # trio's strerror repeats the address
    return str(exc)
