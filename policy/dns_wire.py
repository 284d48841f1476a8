"""One DNS question to one resolver, and reading its answer record by record (DESIGN §2.1 item 4).

dnspython parses a response all or nothing: one TLSA record whose digest does not fit its
matching type (a 20-byte `3 1 1`, a SHA-512 value published as type 1) makes the whole message
a `FormError`.  Through `dns.asyncquery.udp(..., ignore_errors=True)` that validated answer was
thrown away as garbage and the lookup waited out its timeout — a validated answer turned into a
`timeout`.  RFC 7671 §9 / RFC 6698 §4.1: such a record is merely *unusable*; the others decide.

So the exchange here does its own (small) transport, keeps the wire, and when dnspython refuses
the message, reads the answer section again record by record: a record of a type in
`LENIENT_TYPES` whose rdata does not parse is kept as RFC 3597 generic rdata
(`dns.rdata.GenericRdata`, dnspython's own representation of opaque rdata), so the TLSA layer can
name it as unusable.  Any other unparsable record still makes the response an error (bad
response → `bogus`), never a silent wait.
"""
from __future__ import annotations

import socket
import struct

import dns.exception
import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.wire
import trio

__all__ = ["LENIENT_TYPES", "exchange_tcp", "exchange_udp", "parse_response"]

# Types whose unparsable records are kept as opaque rdata: only TLSA, whose consumer
# (`policy.tlsa`) already classifies a record it cannot use (DESIGN §2.2).
LENIENT_TYPES = frozenset({dns.rdatatype.TLSA})
# RFC 1035 §4.2.1 / RFC 6891: a UDP response is at most 65535 bytes.
MAX_UDP_RESPONSE = 65535
_HEADER = struct.Struct("!HHHHHH")


def parse_response(wire: bytes) -> dns.message.Message:
    """Parse a response; a malformed rdata of a `LENIENT_TYPES` record in the answer section
    becomes a `GenericRdata` instead of failing the message.  Raises `dns.exception.FormError`
    (or another DNSException) when the message is malformed anywhere else."""
    try:
        return dns.message.from_wire(wire)
    except dns.exception.DNSException as first:
        strict_error = first
    # Parse what can be parsed (header, question, other sections), then rebuild the answer
    # section ourselves.  Errors outside the answer section (a skipped record in authority or
    # additional) cost nothing worse than a shorter negative-cache time.
    message = dns.message.from_wire(wire, continue_on_error=True)
    try:
        rebuilt = _lenient_answer(wire)
    except (dns.exception.DNSException, ValueError, struct.error) as exc:
        raise dns.exception.FormError(f"{strict_error}; {exc}") from None
    for rrset in rebuilt:
        # Merge into the message's own RRsets (through its API, so its lookup index stays
        # right): the records dnspython skipped join the ones it parsed.
        mine = message.find_rrset(message.answer, rrset.name, rrset.rdclass, rrset.rdtype,
                                  rrset.covers, create=True)
        mine.update(rrset)
    return message


def _lenient_answer(wire: bytes) -> list[dns.rrset.RRset]:
    parser = dns.wire.Parser(wire)
    _id, _flags, qdcount, ancount, _ns, _ar = parser.get_struct("!HHHHHH")
    for _ in range(qdcount):
        parser.get_name(decompress=True)
        parser.get_struct("!HH")
    rrsets: dict[tuple, dns.rrset.RRset] = {}
    for _ in range(ancount):
        name = parser.get_name(decompress=True)
        rdtype, rdclass, ttl, rdlen = parser.get_struct("!HHIH")
        start = parser.current
        try:
            with parser.restrict_to(rdlen):
                rdata = dns.rdata.from_wire_parser(rdclass, rdtype, parser, None)
        except (dns.exception.DNSException, ValueError) as exc:
            if rdtype not in LENIENT_TYPES:
                raise dns.exception.FormError(
                    f"{name} {dns.rdatatype.to_text(rdtype)}: {exc}") from None
            parser.seek(start)
            rdata = dns.rdata.GenericRdata(rdclass, rdtype, parser.get_bytes(rdlen))
        key = (name, rdclass, rdtype, rdata.covers())
        rrset = rrsets.get(key)
        if rrset is None:
            rrset = rrsets[key] = dns.rrset.RRset(name, rdclass, rdtype, rdata.covers())
        rrset.add(rdata, ttl)
    return list(rrsets.values())


def _expects(query: dns.message.Message, wire: bytes) -> bool:
    """Whether a datagram claims to answer `query` (same ID, QR set): anything else on the
    socket is ignored, as dnspython's `ignore_unexpected` did."""
    if len(wire) < _HEADER.size:
        return False
    msg_id, flags = struct.unpack_from("!HH", wire)
    return msg_id == query.id and bool(flags & 0x8000)


async def exchange_udp(query: dns.message.Message, host: str, port: int) -> dns.message.Message:
    """Ask over UDP; wait (the caller bounds the wait) for the response with the query's ID.

    A connected socket only receives datagrams from the resolver's address (RFC 5452 §4.1
    source checks); one with our ID that does not parse, or answers another question, is an
    error (`FormError`), not something to wait past."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
        await sock.connect((host, port))
        await sock.send(query.to_wire())
        while True:
            wire = await sock.recv(MAX_UDP_RESPONSE)
            if not _expects(query, wire):
                continue
            response = parse_response(wire)
            if not query.is_response(response):
                raise dns.exception.FormError("response does not answer the question asked")
            return response


async def exchange_tcp(query: dns.message.Message, host: str, port: int) -> dns.message.Message:
    """Ask over TCP (RFC 7766: two-byte length prefix); the caller bounds the wait."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        wire = query.to_wire()
        await stream.send_all(struct.pack("!H", len(wire)) + wire)
        length = struct.unpack("!H", await _read_exactly(stream, 2))[0]
        response = parse_response(await _read_exactly(stream, length))
    if not query.is_response(response):
        raise dns.exception.FormError("response does not answer the question asked")
    return response


async def _read_exactly(stream: trio.abc.ReceiveStream, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        if not chunk:
            raise dns.exception.FormError(f"connection closed after {len(data)} of {count} bytes")
        data += chunk
    return bytes(data)
