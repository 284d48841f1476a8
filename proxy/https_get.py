"""One bounded HTTPS GET, for POSH documents (RFC 7711) and host-meta (XEP-0156 / XEP-0468).

The host's addresses come from our validating resolver, never the OS resolver, and a bogus or
timed-out address answer is a failure, never "no address" (DESIGN §2.1).  The web server is
verified with PKIX and its name checked (RFC 9110 §4.3.4) against the trust store the policy
uses.  HTTP is h11 (sans-IO HTTP/1.1): one GET, `Connection: close`, redirects not followed,
the body read only for a 200 and bounded.  Every problem is an `HttpsGetError` whose message
says what failed; callers turn it into their own status.
"""
from __future__ import annotations

import ipaddress
import ssl
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import h11
import trio
from cryptography.hazmat.primitives.serialization import Encoding

from policy.dns import Resolver
from policy.pkix import TrustStore
from policy.pkix_names import normalise_domain
from proxy.tcp_connect import ConnectError, open_tcp

HTTPS_PORT = 443
# Status line plus headers; h11's own default limit for an incomplete event.
MAX_HEADER_BYTES = 16384
_RECEIVE_SIZE = 16384


class HttpsGetError(Exception):
    """The GET failed; the message names the stage and the problem."""


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes            # empty unless status is 200
    location: str | None   # the Location header, for a reason that names a redirect


_CONTEXTS: "weakref.WeakKeyDictionary[TrustStore, ssl.SSLContext]" = weakref.WeakKeyDictionary()


def client_context(trust: TrustStore) -> ssl.SSLContext:
    """PKIX with name check against `trust`'s anchors, TLS ≥ 1.2; one per trust store."""
    ctx = _CONTEXTS.get(trust)
    if ctx is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)       # CERT_REQUIRED, check_hostname
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        for anchor in trust.anchors:
            try:
                ctx.load_verify_locations(cadata=anchor.public_bytes(Encoding.DER))
            except ssl.SSLError:
                continue   # one anchor OpenSSL will not take must not void the store
        _CONTEXTS[trust] = ctx
    return ctx


async def host_addresses(host: str, resolver: Resolver | None) -> list[str]:
    """IPv6 then IPv4 addresses of `host` from our resolver (an IP literal as it is)."""
    try:
        return [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        pass
    if resolver is None:
        raise HttpsGetError(f"no resolver to look up {host}")
    answers: dict[str, object] = {}

    async def lookup(rdtype: str) -> None:
        answers[rdtype] = await resolver.lookup(host, rdtype)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lookup, "A")
            nursery.start_soon(lookup, "AAAA")
    except ValueError as exc:   # not a name DNS can carry
        raise HttpsGetError(f"cannot look up {host}: {exc}") from None
    failed = [a for a in answers.values() if a.failed]   # type: ignore[attr-defined]
    if failed:
        raise HttpsGetError(f"address lookup for {host} failed: "
                            + "; ".join(a.describe() for a in failed))  # type: ignore[attr-defined]
    addresses = [rd.to_text() for key in ("AAAA", "A") for rd in answers[key].rrset]  # type: ignore[attr-defined]
    if not addresses:
        raise HttpsGetError(f"{host} has no A/AAAA record")
    return addresses


def tls_reason(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate does not verify ({cause.verify_message})"
    if isinstance(cause, ssl.SSLError):
        return f"TLS handshake failed ({cause.reason or cause})"
    return f"TLS handshake failed ({cause or exc})"


async def https_get(
    host: str,
    port: int,
    target: str,
    *,
    trust: TrustStore,
    resolver: Resolver | None,
    max_body: int,
    overrides: Mapping[str, tuple[str, int]] | None = None,
    happy_eyeballs_delay: float,
    headers: Sequence[tuple[str, str]] = (),
    stage: list[str] | None = None,
    connect_port: int | None = None,
) -> HttpResponse:
    """GET https://host:port/target.  `overrides` maps a host to the (ip, port) to connect to,
    `connect_port` replaces the port connected to (tests; URL, SNI and certificate check stay
    the host's).  `stage[0]` is kept up to date
    with what is being waited for, so a caller's timeout can say where it stopped."""

    stage = stage if stage is not None else [""]
    url = f"https://{host}{'' if port == HTTPS_PORT else f':{port}'}{target}"
    override = (overrides or {}).get(normalise_domain(host))
    stage[0] = f"resolving {host}"
    if override is not None:
        addresses, connect_port = [override[0]], override[1]
    else:
        addresses, connect_port = await host_addresses(host, resolver), connect_port or port
    stage[0] = f"connecting to {host}"
    try:
        tcp, _ip = await open_tcp(addresses, connect_port, delay=happy_eyeballs_delay)
    except ConnectError as exc:
        raise HttpsGetError(f"cannot connect for {url}: {exc}") from None
    stream = trio.SSLStream(tcp, client_context(trust), server_hostname=host, https_compatible=True)
    try:
        stage[0] = f"TLS handshake with {host}"
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            raise HttpsGetError(f"HTTPS to {host}: {tls_reason(exc)}") from None
        stage[0] = f"waiting for the HTTP response from {url}"
        return await _get(stream, host, port, target, url, max_body, headers)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            await trio.aclose_forcefully(stream)


async def _get(stream: trio.abc.Stream, host: str, port: int, target: str, url: str,
               max_body: int, extra_headers: Sequence[tuple[str, str]]) -> HttpResponse:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
    authority = host if port == HTTPS_PORT else f"{host}:{port}"
    request = h11.Request(method="GET", target=target, headers=[
        ("Host", authority), ("User-Agent", "xmpp-dane-proxy"), *extra_headers, ("Connection", "close")])
    limit = f"{max_body // 1024} KiB limit"
    try:
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        status: int | None = None
        location: str | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(_RECEIVE_SIZE))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
                location = headers.get("location")
                if status != 200:
                    return HttpResponse(status, b"", location)   # an error page is of no use
                length = headers.get("content-length", "")
                if length.isdigit() and int(length) > max_body:
                    raise HttpsGetError(f"{url}: document of {length} bytes is over the {limit}")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_body:
                    raise HttpsGetError(f"{url}: document is over the {limit}")
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                if status is None:
                    raise HttpsGetError(f"{url}: connection closed before a response")
                return HttpResponse(status, bytes(body), location)
    except h11.RemoteProtocolError as exc:
        raise HttpsGetError(f"{url}: bad HTTP response ({exc})") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise HttpsGetError(f"{url}: connection lost ({exc.__cause__ or exc})") from None
