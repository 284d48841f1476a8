"""How much of a relay ratio is expat, which the proxy must run over every byte it relays.

Framing has to agree byte for byte with the backend's parser (libexpat in Prosody and
ejabberd), so every relayed byte goes through libexpat; stunnel parses nothing.  A proxy that
added nothing to stunnel's own work (TLS, sockets) but the framing would therefore spend
stunnel's CPU per stanza plus the framer's: that sum is the floor of the proxy's CPU per
stanza, and stunnel's CPU over it is the best relay capacity ratio any expat-framing proxy can
reach on this machine (issue 13).

Measured in one process, without sockets, on the same stanzas as `bench/run.py`'s relay
(`bench/loadclient.py`'s `stanza`), fed in 256 KiB pieces (at most what one read of the peer
brings):

- `framer_us`: the proxy's framer as the relay runs it (`proxy.xmlstream.XmlStreamParser`,
  C or Python as `XMPP_DANE_PROXY_FRAMER` selects, with the stanzas' route authorised, so
  they leave as bytes);
- `bare_expat_us`: libexpat alone through pyexpat, namespaces on, no handlers at all.

Best of several rounds (the least disturbed).  `python3 bench/framing_calibration.py 1024 65536`
prints one JSON object keyed by stanza size.
"""
from __future__ import annotations

import json
import sys
import time
import xml.parsers.expat as expat
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from loadclient import HEADER, LOCAL, PEER, stanza  # noqa: E402
from proxy.xmlstream import XmlStreamParser  # noqa: E402

READ = 262144         # bytes fed at a time: one read of the peer's TLS stream (proxy/inbound.py _PEER_READ)
TOTAL = 16 << 20      # bytes framed per round
ROUNDS = 7


def _stream_bytes(size: int) -> tuple[bytes, int]:
    blob = b"".join(stanza(size, i) for i in range(max(1, READ // size)))
    data = blob * max(1, TOTAL // len(blob))
    return data, len(data) // size


def framer_us(size: int) -> float:
    data, count = _stream_bytes(size)
    best = float("inf")
    for _ in range(ROUNDS):
        parser = XmlStreamParser()
        parser.feed(HEADER)
        parser.routes = {("message", PEER, LOCAL): True}
        started = time.process_time()
        for at in range(0, len(data), READ):
            events = parser.feed(data[at:at + READ])
        best = min(best, time.process_time() - started)
        if not events or not all(isinstance(event, bytes) for event in events):
            raise RuntimeError(f"the framer did not pass the stanzas as bytes: {events[:1]!r}")
    return 1e6 * best / count


def bare_expat_us(size: int) -> float:
    data, count = _stream_bytes(size)
    best = float("inf")
    for _ in range(ROUNDS):
        parser = expat.ParserCreate(namespace_separator=" ")
        parser.Parse(HEADER)
        started = time.process_time()
        for at in range(0, len(data), READ):
            parser.Parse(data[at:at + READ])
        best = min(best, time.process_time() - started)
    return 1e6 * best / count


def calibrate(sizes: list[int]) -> dict:
    return {str(size): {"framer_us": framer_us(size), "bare_expat_us": bare_expat_us(size)} for size in sizes}


if __name__ == "__main__":
    print(json.dumps(calibrate([int(arg) for arg in sys.argv[1:]] or [1024, 65536])))
