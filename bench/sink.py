"""The backend stand-in for the benchmarks: a plaintext XMPP "server" on loopback.

Both the proxy and stunnel relay to this one process, so the far end of every measurement is
the same.  Per connection it

1. answers the first stream header with a header and features (including `<starttls/>`,
   which the proxy must strip, as a real legacy backend's plaintext port would offer it),
2. acknowledges each `<db:result from=A to=B>` with `<db:result from=B to=A type='valid'/>`
   (as a backend whose Server Dialback succeeded would),
3. then only counts bytes, without parsing them, until it sees the end-of-burst marker
   `<iq ... id='bench-end-N'/>`; it answers that with `<iq type='result' id='bench-end-N'>`
   carrying the number of bytes received in the burst, so the load client can check that
   every byte it sent arrived (nothing dropped, nothing added) and stop its clock.

The sink is deliberately cheap (no XML parser on the bulk path) so that it is not what is
measured.  It runs as its own process (`python3 bench/sink.py`), prints `LISTENING <port>` on
stdout and answers `count` on stdin with `open=<N> total=<M>` (connections open now / ever).
It stops at EOF on stdin.
"""
from __future__ import annotations

import asyncio
import re
import sys

_HEADER_END = re.compile(rb"<(?:stream:)?stream\b[^>]*>")
_DB_RESULT = re.compile(rb"<db:result\b([^>]*?)(?:/>|>.*?</db:result>)", re.S)
_ATTR = re.compile(rb"""\b(from|to)=['"]([^'"]*)['"]""")
_MARKER = b"bench-end-"
_MARKER_ELEMENT = re.compile(rb"<iq\b[^>]*\bid='(bench-end-\d+)'[^>]*/>")

HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
          b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
          b"id='sink-%d' from='%s' version='1.0'>")
FEATURES = (b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
            b"<dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback></stream:features>")


class SinkProtocol(asyncio.Protocol):
    open_connections = 0
    total_connections = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        SinkProtocol.open_connections += 1
        SinkProtocol.total_connections += 1
        self.transport = transport
        self.number = SinkProtocol.total_connections
        self.phase = "header"
        self.buf = b""
        self.burst_bytes = 0
        self.tail = b""

    def connection_lost(self, exc: Exception | None) -> None:
        SinkProtocol.open_connections -= 1

    def data_received(self, data: bytes) -> None:
        if self.phase == "bulk":
            self._bulk(data)
            return
        self.buf += data
        if self.phase == "header":
            m = _HEADER_END.search(self.buf)
            if m is None:
                return
            to = re.search(rb"""\bto=['"]([^'"]*)['"]""", m.group(0))
            self.transport.write(HEADER % (self.number, to.group(1) if to else b"") + FEATURES)
            self.buf = self.buf[m.end():]
            self.phase = "dialback"
        if self.phase == "dialback":
            m = _DB_RESULT.search(self.buf)
            if m is None:
                return
            attrs = dict(_ATTR.findall(m.group(1)))
            self.transport.write(b"<db:result from='%s' to='%s' type='valid'/>"
                                 % (attrs.get(b"to", b""), attrs.get(b"from", b"")))
            rest, self.buf = self.buf[m.end():], b""
            self.phase = "bulk"
            if rest:
                self._bulk(rest)

    def _bulk(self, data: bytes) -> None:
        self.burst_bytes += len(data)
        window = self.tail + data
        if window.endswith(b"</stream:stream>"):
            # The peer ended its stream: end ours (RFC 6120 §4.4) and close.
            self.transport.write(b"</stream:stream>")
            self.transport.close()
            return
        if _MARKER in window:
            m = _MARKER_ELEMENT.search(window)
            if m is not None:
                # Everything up to and including the marker element belongs to this burst.
                after = len(window) - m.end()
                count = self.burst_bytes - after
                self.transport.write(b"<iq type='result' id='%s'><count xmlns='urn:bench' bytes='%d'/></iq>"
                                     % (m.group(1), count))
                self.burst_bytes = after
                window = window[m.end():]
        # Keep enough to find a marker element split across reads (it is < 200 bytes).
        self.tail = window[-256:]


async def main() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(SinkProtocol, "127.0.0.1", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    print(f"LISTENING {port}", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        if line.strip() == b"count":
            print(f"open={SinkProtocol.open_connections} total={SinkProtocol.total_connections}", flush=True)
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
