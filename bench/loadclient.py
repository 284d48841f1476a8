"""The load client: a remote XMPP server as the proxy (or stunnel) sees it.

Blocking sockets and the standard library's `ssl` (a thin layer over the system OpenSSL), so
the client spends as little of its core as possible on Python.  One `S2SStream` is one
server-to-server stream from the peer domain `PEER` to our local domain `LOCAL`:

- against the proxy (`starttls=True`): TCP, stream header, `<starttls/>`, `<proceed/>`, TLS
  with a client certificate, stream restart, the backend's features (relayed by the proxy),
  `<db:result from=PEER to=LOCAL>`, wait for `type='valid'` (the proxy judged PEER by its
  policy, forwarded the element, the sink acknowledged it);
- against stunnel (`starttls=False`): TCP, TLS with the same client certificate, then the same
  stream header, features, `<db:result>` and `valid`, which stunnel relays without looking.

After that `burst()` streams stanzas and waits for the sink's count of what arrived.
"""
from __future__ import annotations

import re
import socket
import ssl
import time
from dataclasses import dataclass

PEER = "peer.secure.test"          # the remote server's domain, in the signed test zone of tests/dnsenv.py
LOCAL = "local.bench.example"      # the domain the backend serves (the proxy's certificate)

NS_DECL = ("xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' "
           "xmlns:db='jabber:server:dialback'")
HEADER = (f"<?xml version='1.0'?><stream:stream {NS_DECL} from='{PEER}' to='{LOCAL}' "
          f"version='1.0' xml:lang='en'>").encode()
STARTTLS = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
DB_RESULT = f"<db:result from='{PEER}' to='{LOCAL}'>0123456789abcdef0123456789abcdef</db:result>".encode()
CLOSE = b"</stream:stream>"

_FEATURES_END = re.compile(rb"</stream:features>")
_PROCEED = re.compile(rb"<proceed\b[^>]*/>")
_VALID = re.compile(rb"<db:result\b[^>]*\btype='valid'[^>]*/>")
_FAILURE = re.compile(rb"<stream:error\b.*|<db:result\b[^>]*\btype='error'.*|<failure\b.*", re.S)


class BenchError(RuntimeError):
    """The dance went wrong; the message says where and what the server sent."""


@dataclass(frozen=True)
class Endpoint:
    """Where the load goes: the proxy (STARTTLS first) or stunnel (TLS at once)."""

    name: str
    host: str
    port: int
    starttls: bool


def client_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """TLS client context presenting the peer's certificate chain.  The server's certificate
    is not checked: the benchmark measures the server side, not the client's trust."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def stanza(size: int, number: int = 0) -> bytes:
    """One `<message>` of exactly `size` bytes from PEER to LOCAL."""
    head = f"<message from='alice@{PEER}/bench' to='bob@{LOCAL}/bench' type='chat' id='m{number}'><body>"
    tail = "</body></message>"
    pad = size - len(head) - len(tail)
    if pad < 0:
        raise ValueError(f"stanza size {size} is below the {len(head) + len(tail)}-byte minimum")
    return (head + "x" * pad + tail).encode()


def marker(seq: int) -> bytes:
    """The end-of-burst stanza the sink answers with its byte count."""
    return f"<iq from='alice@{PEER}/bench' to='{LOCAL}' type='get' id='bench-end-{seq}'/>".encode()


class S2SStream:
    """One authenticated S2S stream through `endpoint` (see the module docstring)."""

    def __init__(self, endpoint: Endpoint, ctx: ssl.SSLContext, *, timeout: float = 30.0) -> None:
        self.endpoint = endpoint
        self.ctx = ctx
        self.timeout = timeout
        self.sock: socket.socket | ssl.SSLSocket | None = None
        self.buf = b""
        self.consumed = b""     # what the last _read_until took from the buffer
        self.cipher: tuple | None = None
        self.version: str | None = None
        self._seq = 0

    # ------------------------------------------------------------------ set-up

    def open(self) -> "S2SStream":
        """Connect and authenticate; returns when the sink's `valid` came back."""
        ep = self.endpoint
        sock = socket.create_connection((ep.host, ep.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        try:
            if ep.starttls:
                sock.sendall(HEADER)
                self._read_until(_FEATURES_END, "the proxy's stream features")
                features = self.consumed
                if b"starttls" not in features:
                    raise BenchError(f"{ep.name}: no <starttls/> offered: {features!r}")
                sock.sendall(STARTTLS)
                self._read_until(_PROCEED, "<proceed/>")
                if self.buf:
                    raise BenchError(f"{ep.name}: unexpected bytes after <proceed/>: {self.buf!r}")
            self.sock = self.ctx.wrap_socket(sock, server_hostname=LOCAL)
            self.cipher, self.version = self.sock.cipher(), self.sock.version()
            self.sock.sendall(HEADER)
            self._read_until(_FEATURES_END, "the backend's stream features")
            features = self.consumed
            if ep.starttls and b"starttls" in features:
                raise BenchError(f"{ep.name}: relayed features still offer <starttls/>: {features!r}")
            self.sock.sendall(DB_RESULT)
            self._read_until(_VALID, "<db:result type='valid'>")
        except BaseException:
            self.abort()
            raise
        return self

    # ------------------------------------------------------------------ load

    def burst(self, blob: bytes, repeats: int) -> tuple[int, float]:
        """Send `blob` `repeats` times, then the end marker; wait for the sink's count.
        Returns (bytes sent, seconds from first byte sent to the count received)."""
        assert self.sock is not None
        self._seq += 1
        end = marker(self._seq)
        sent = len(blob) * repeats + len(end)
        answer = re.compile(rb"<iq type='result' id='bench-end-%d'><count xmlns='urn:bench' bytes='(\d+)'/></iq>"
                            % self._seq)
        started = time.perf_counter()
        for _ in range(repeats):
            self.sock.sendall(blob)
        self.sock.sendall(end)
        m = self._read_until(answer, f"the sink's count for burst {self._seq}")
        elapsed = time.perf_counter() - started
        received = int(m.group(1))
        if received != sent:
            raise BenchError(f"{self.endpoint.name}: sent {sent} bytes in burst {self._seq}, "
                             f"the sink received {received}")
        return sent, elapsed

    # ------------------------------------------------------------------ ending

    def close(self) -> None:
        """End the stream politely: `</stream:stream>`, wait for the other side's, close."""
        if self.sock is None:
            return
        try:
            self.sock.sendall(CLOSE)
            self._read_until(re.compile(re.escape(CLOSE)), "</stream:stream>")
        except (OSError, BenchError):
            pass
        finally:
            self.abort()

    def abort(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    # ------------------------------------------------------------------ reading

    def _read_until(self, pattern: re.Pattern, what: str) -> re.Match:
        assert self.sock is not None
        while True:
            m = pattern.search(self.buf)
            if m is not None:
                self.consumed, self.buf = self.buf[:m.end()], self.buf[m.end():]
                return m
            failure = _FAILURE.search(self.buf)
            if failure is not None:
                raise BenchError(f"{self.endpoint.name}: waiting for {what}, got: {failure.group(0)[:600]!r}")
            try:
                data = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                raise BenchError(f"{self.endpoint.name}: no {what} within {self.timeout} s; "
                                 f"have {self.buf[-300:]!r}") from None
            if not data:
                raise BenchError(f"{self.endpoint.name}: connection closed while waiting for {what}; "
                                 f"have {self.buf[-300:]!r}")
            self.buf += data


def dance(endpoint: Endpoint, ctx: ssl.SSLContext, timeout: float = 30.0) -> float:
    """One complete short-lived stream: open, authenticate, close; returns its duration."""
    started = time.perf_counter()
    stream = S2SStream(endpoint, ctx, timeout=timeout).open()
    stream.close()
    return time.perf_counter() - started
