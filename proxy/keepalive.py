"""TCP keepalive on every stream's sockets: a peer that vanishes without a FIN is noticed.

A peer whose host lost power or whose route went away sends neither FIN nor RST; without
keepalive its connection (two descriptors, buffers, a task) is held until the other side
happens to send something.  Prosody enables SO_KEEPALIVE on S2S connections for this reason
(mod_s2s, `s2s_tcp_keepalives`, default on), with the kernel's timers: on Linux 2 h idle,
then 9 probes 75 s apart — over 2 h 11 min to notice.  The proxy holds those descriptors
for the backend too, so it uses shorter timers: the first probe after 5 min without any
traffic, then one every 30 s, dead after 4 unanswered — a vanished peer is released within
7 min, and a live but idle S2S link (servers often go minutes without a stanza) costs one
tiny probe every 5 min.  `limits.idle_timeout` bounds peers that are alive at the TCP level
but silent at the XMPP level.
"""
from __future__ import annotations

import socket

KEEPALIVE_IDLE = 300        # seconds without traffic before the first probe
KEEPALIVE_INTERVAL = 30     # seconds between unanswered probes
KEEPALIVE_COUNT = 4         # unanswered probes before the kernel drops the connection


def enable_keepalive(stream: object) -> bool:
    """Turn keepalive on for the TCP socket under `stream` (a trio SocketStream or
    SocketListener, or a stream wrapping one in `.transport`); False if there is none (Unix
    socket, memory stream).  On a listener (Linux), every connection it accepts has it."""
    for _ in range(4):   # TlsStream -> SocketStream: a couple of layers at most
        sock = getattr(stream, "socket", None)
        if sock is not None:
            break
        stream = getattr(stream, "transport", None)
    else:
        return False
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                              ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
            if hasattr(socket, option):     # Linux, and most others; else the kernel's defaults
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    except OSError:
        return False   # e.g. the connection is already gone: nothing to keep alive
    return True


__all__ = ["KEEPALIVE_COUNT", "KEEPALIVE_IDLE", "KEEPALIVE_INTERVAL", "enable_keepalive"]
