"""TLS over any trio stream, with pyOpenSSL and memory BIOs.

trio.SSLStream only wraps the stdlib `ssl` module, which on Python 3.11 cannot return the
peer's certificate chain -- and DANE-TA needs the chain as presented (DESIGN §2.2).  So the
TLS engine is an `OpenSSL.SSL.Connection` with no socket: ciphertext is moved between it
and the transport stream by `TlsStream` (bio_write what arrives, bio_read what to send).

OpenSSL makes no trust decision here.  A server asks for a client certificate but does not
require one, and both sides accept whatever chain they are shown; `peer_chain()` hands it to
the policy (`policy.decide`), which decides.
"""
from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography import x509
from OpenSSL import SSL, crypto

from . import eager_io

try:   # for TlsStream.release_idle, _drain and _collect: pyOpenSSL has no API for these
    from OpenSSL._util import ffi as _ffi, lib as _lib
    if not all(hasattr(_lib, name) for name in ("BIO_get_mem_data", "BIO_new", "BIO_read", "BIO_s_mem",
                                                 "SSL_set_bio", "SSL_read", "SSL_get_error", "SSL_ERROR_WANT_READ")):
        _ffi = None
except ImportError:   # pragma: no cover - another pyOpenSSL layout
    _ffi = _lib = None

ALPN_XMPP_SERVER = b"xmpp-server"   # XEP-0368 §3: ALPN protocol id for Direct TLS S2S

# DESIGN §3.1: TLS 1.2 is the floor (RFC 7590 §3.1 and BCP 195 / RFC 8996 retire 1.0/1.1).
TLS_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

# Bytes read from the transport (and decrypted) at a time, at most: a busy stream's reads
# then carry many records each (inbound reads the peer 256 KiB at a time, proxy/inbound.py).
_RECEIVE_SIZE = 262144
# After a read larger than this, `release_idle` gives OpenSSL a fresh incoming memory BIO: the
# old one keeps the capacity of the largest write into it (~87 KiB after a 64 KiB read) for
# the life of the connection.  Below it the capacity is small anyway (bench/README.md).
_BIG_READ = 16384
_SEND_CHUNK = 65536             # plaintext bytes per SSL_write
_CLOSE_NOTIFY_TIMEOUT = 5.0     # a peer that does not read must not hold aclose() forever
# TlsStream._drain's and _collect's buffer: one per thread, not one per stream.  Within a
# thread trio runs one task at a time and nothing awaits while the buffer is in use; across
# threads (several trio loops in one process, as the tests run them) cffi releases the GIL
# during SSL_read, so a buffer shared between threads would be written by two at once.
_DRAIN_BYTES = _RECEIVE_SIZE
_scratch = threading.local()


def _scratch_buffer():
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None:
        buffer = _scratch.buffer = _ffi.new_allocator(should_clear_after_alloc=False)("char[]", _DRAIN_BYTES)
    return buffer

# Compression off (CRIME), renegotiation off (nothing in XMPP needs it, and it is a
# DoS vector), server cipher preference; no session resumption: a resumed session carries
# no freshly presented chain, and every stream's peer must be judged on its chain.
_OPTIONS = SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_TICKET


class TlsError(trio.BrokenResourceError):
    """The TLS layer failed (handshake or record); the message says why, for the log."""


class TlsConfigError(Exception):
    """A certificate or key could not be loaded; the message names the file and problem."""


def describe_openssl_error(exc: BaseException) -> str:
    """One line from a pyOpenSSL exception: OpenSSL's reason strings, not a list of tuples."""
    if isinstance(exc, SSL.SysCallError):
        return "connection closed unexpectedly" if exc.args and exc.args[0] in (-1, 0) else str(exc)
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], list) and args[0]:
        reasons = [str(item[2]) for item in args[0] if isinstance(item, tuple) and len(item) == 3]
        if reasons:
            return "; ".join(dict.fromkeys(reasons))
    return str(exc) or type(exc).__name__


def _accept_any_certificate(conn: SSL.Connection, cert, errno: int, depth: int, ok: int) -> bool:
    # The chain is judged later by policy.decide against DANE/PKIX, never by OpenSSL.
    return True


def _base_context(min_version: str) -> SSL.Context:
    if min_version not in TLS_VERSIONS:
        raise ValueError(f"tls min version {min_version!r} is not one of {', '.join(TLS_VERSIONS)}")
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(TLS_VERSIONS[min_version])
    ctx.set_options(_OPTIONS)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_verify(SSL.VERIFY_PEER, _accept_any_certificate)
    # S2S streams are mostly idle: give the ~34 KiB of record buffers back between records.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    return ctx


def _load_identity(ctx: SSL.Context, cert_file: str | Path, key_file: str | Path) -> None:
    # OpenSSL's own error for a missing or unreadable file is "; system lib": say it plainly.
    for path in (cert_file, key_file):
        try:
            Path(path).open("rb").close()
        except OSError as exc:
            raise TlsConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        ctx.use_certificate_chain_file(str(cert_file))
    except SSL.Error as exc:
        raise TlsConfigError(f"{cert_file}: cannot load certificate chain: {describe_openssl_error(exc)}") from None
    mismatch = f"{key_file}: private key does not match the certificate in {cert_file}"
    try:
        ctx.use_privatekey_file(str(key_file))
    except SSL.Error as exc:
        reason = describe_openssl_error(exc)
        if "mismatch" in reason:
            raise TlsConfigError(mismatch) from None
        raise TlsConfigError(f"{key_file}: cannot load private key: {reason}") from None
    try:
        ctx.check_privatekey()
    except SSL.Error:
        raise TlsConfigError(mismatch) from None


def server_context(
    cert_file: str | Path,
    key_file: str | Path,
    *,
    min_version: str = "1.2",
    alpn: Iterable[bytes] = (ALPN_XMPP_SERVER,),
) -> SSL.Context:
    """A server context: this certificate, client certificate requested but not required."""
    ctx = _base_context(min_version)
    _load_identity(ctx, cert_file, key_file)
    protocols = list(alpn)

    def select_alpn(conn: SSL.Connection, offered: list[bytes]):
        # XEP-0368: Direct TLS peers offer "xmpp-server".  A client offering only other
        # protocols gets no ALPN rather than a failed handshake; the XMPP layer decides.
        for proto in protocols:
            if proto in offered:
                return proto
        return SSL.NO_OVERLAPPING_PROTOCOLS

    if protocols:
        ctx.set_alpn_select_callback(select_alpn)
    return ctx


def client_context(
    *,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
    min_version: str = "1.2",
    alpn: Iterable[bytes] = (),
) -> SSL.Context:
    """A client context, optionally presenting a certificate; the server's chain is accepted
    as-is at this layer (read it with `TlsStream.peer_chain()` and let the policy judge)."""
    ctx = _base_context(min_version)
    if cert_file is not None:
        _load_identity(ctx, cert_file, key_file if key_file is not None else cert_file)
    protocols = list(alpn)
    if protocols:
        ctx.set_alpn_protos(protocols)
    return ctx


class ServerCertificates:
    """One server context per local domain; the certificate is chosen by SNI or by `to`.

    `context_for(name)` gives the context to start a handshake with (the stream's `to` for
    STARTTLS; None -> the first domain, for Direct TLS before SNI is known).  If the client
    sends SNI naming another configured domain, the handshake switches to that domain's
    certificate (an SNI naming no configured domain keeps the initial one).
    """

    def __init__(self, identities: Mapping[str, tuple[str | Path, str | Path]], *, min_version: str = "1.2",
                 alpn: Iterable[bytes] = (ALPN_XMPP_SERVER,)) -> None:
        if not identities:
            raise TlsConfigError("no [[domain]] configured: the proxy has no certificate to present")
        self._contexts: dict[str, SSL.Context] = {}
        alpn = tuple(alpn)
        for name, (cert, key) in identities.items():
            ctx = server_context(cert, key, min_version=min_version, alpn=alpn)
            ctx.set_tlsext_servername_callback(self._on_server_name)
            self._contexts[name.lower().rstrip(".")] = ctx
        self._default = next(iter(self._contexts))

    @classmethod
    def from_domains(cls, domains: Iterable, *, min_version: str = "1.2",
                     alpn: Iterable[bytes] = (ALPN_XMPP_SERVER,)) -> "ServerCertificates":
        """From `Config.domains` (objects with `.name`, `.cert`, `.key`).  `alpn`: the
        protocols this listener serves (e.g. `http/1.1` for XEP-0468 WebSocket)."""
        return cls({d.name: (d.cert, d.key) for d in domains}, min_version=min_version, alpn=alpn)

    @property
    def names(self) -> list[str]:
        return list(self._contexts)

    def context_for(self, name: str | None) -> SSL.Context:
        if name is not None:
            ctx = self._contexts.get(name.lower().rstrip("."))
            if ctx is not None:
                return ctx
        return self._contexts[self._default]

    def _on_server_name(self, conn: SSL.Connection) -> None:
        raw = conn.get_servername()
        if not raw:
            return
        ctx = self._contexts.get(raw.decode("ascii", "replace").lower().rstrip("."))
        if ctx is not None and ctx is not conn.get_context():
            conn.set_context(ctx)


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """What the handshake established, for the verdict and the log.

    The peer's chain is parsed on each use of `chain`: a stream keeps it for later domain
    pairs and re-verification, mostly idle, and a parsed certificate costs ~0.8 KiB of heap
    beyond its DER (issue 13, memory per idle stream); a verdict parses it once.  From a
    `TlsStream` the DER itself is not kept either: it is read from OpenSSL's own copy
    (`PeerChainDer`)."""

    version: str                      # "1.2" / "1.3"
    protocol: str                     # OpenSSL's name, e.g. "TLSv1.3"
    cipher: str | None
    alpn: str | None
    server_name: str | None
    chain_der: Sequence[bytes]        # the peer's chain as presented, leaf first, DER

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """The peer's chain, parsed; `UnreadableCertificate` if `cryptography` cannot read
        one that OpenSSL took (e.g. an X.509 version other than 1-3)."""
        return tuple(_parse_chain(self.chain_der))


class PeerChainDer(Sequence[bytes]):
    """A TLS stream's peer chain as DER (leaf first), read from OpenSSL on each use.

    OpenSSL keeps the certificates the peer presented for the connection's life; a copy of
    their DER beside them was ~0.9 KiB per stream, idle streams included (issue 13).  Only
    whether there is one at all is kept (it is asked on every set-up)."""

    __slots__ = ("_stream", "_present")

    def __init__(self, stream: "TlsStream", present: bool) -> None:
        self._stream = stream
        self._present = present

    def __bool__(self) -> bool:
        return self._present

    def __len__(self) -> int:
        return len(self._stream.peer_chain_der()) if self._present else 0

    def __getitem__(self, index):  # type: ignore[override]
        return self._stream.peer_chain_der()[index]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._stream.peer_chain_der() if self._present else ())


def _interned(text: str | None) -> str | None:
    return None if text is None else sys.intern(text)


class UnreadableCertificate(ValueError):
    """A certificate in the peer's chain cannot be parsed; the message says which and why."""


def _parse_chain(chain_der: Iterable[bytes]) -> list[x509.Certificate]:
    chain = []
    for depth, der in enumerate(chain_der):
        try:
            chain.append(x509.load_der_x509_certificate(der))
        except (ValueError, x509.InvalidVersion) as exc:
            raise UnreadableCertificate(f"the certificate at depth {depth} cannot be read: {exc}") from None
    return chain


class TlsStream(trio.abc.Stream):
    """A trio Stream speaking TLS over `transport`, with pyOpenSSL over memory BIOs.

    `prefix` is ciphertext already read from the transport before TLS started (e.g. the
    first bytes of a ClientHello read to tell Direct TLS from XML); it is fed in first.
    Call `do_handshake()` first (send_all/receive_some also do it on demand).  One task may
    send while another receives.  EOF from the transport without close_notify reads as EOF:
    XMPP frames its own end (`</stream:stream>`), so truncation cannot forge anything.
    """

    __slots__ = (   # not a dict per stream (issue 13, memory per idle stream)
        "transport", "server_side", "_sock", "before_wait", "_conn", "_outgoing", "_send_lock",
        "_handshake_lock", "_handshake_done", "_eof", "_closed", "_broken", "_transport_broken", "_sending",
        "_receiving", "_big_read", "_handshake_buffers", "_read_error",
    )

    def __init__(
        self,
        transport: trio.abc.Stream,
        context: SSL.Context,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        prefix: bytes = b"",
    ) -> None:
        self.transport = transport
        self.server_side = server_side
        # The kernel socket under a SocketStream: reads and sends on it skip trio's scheduler
        # pass when they complete at once (proxy.eager_io).  None: the transport's methods.
        self._sock = eager_io.stdlib_socket(transport)
        # Called when a read is about to wait for the peer: the stream just became idle.
        self.before_wait: Callable[[], object] | None = None
        conn = SSL.Connection(context, None)
        if server_side:
            conn.set_accept_state()
        else:
            conn.set_connect_state()
            if server_hostname:
                conn.set_tlsext_host_name(server_hostname.encode("idna"))
        if prefix:
            conn.bio_write(prefix)
        self._conn = conn
        self._outgoing = bytearray()
        self._send_lock = eager_io.Lock()
        # Only one task runs the handshake; dropped once it is done (do_handshake).  Reads need
        # no lock: after the handshake only receive_some reads (one task at a time, `_receiving`).
        self._handshake_lock: eager_io.Lock | None = eager_io.Lock()
        self._handshake_done = False
        self._eof = False
        self._closed = False
        self._broken: str | None = None
        self._transport_broken: str | None = None   # the transport failed mid-send
        self._sending = False
        self._receiving = False
        self._big_read = False       # a large ciphertext write grew the incoming BIO
        self._handshake_buffers = True   # the BIOs still have the handshake flights' capacity
        self._read_error: SSL.Error | None = None   # met by _drain after bytes it returned

    # ------------------------------------------------------------------ moving ciphertext
    #
    # Whatever OpenSSL writes into its memory BIO is moved, synchronously and so in order, to
    # `_outgoing`; whoever holds `_send_lock` sends `_outgoing` until it is empty.  A reader
    # whose SSL_read produced output (a TLS 1.3 KeyUpdate answer) therefore never has to wait
    # behind a writer stalled on a slow peer: the writer sends those bytes too.
    #
    # Cancellation safety: OpenSSL counts a record as sent the moment it is in the BIO, so a
    # record that never reaches the peer makes every later one fail its MAC check.  Bytes
    # therefore leave `_outgoing` only once the transport has taken them.  Over a socket
    # (`trio.SocketStream`, TCP or Unix) each `socket.send` either takes some bytes or is
    # cancelled having taken none, so a cancelled flush leaves exactly the unsent rest for the
    # next flush (the next send_all, or aclose's close_notify).  Over any other transport a
    # cancelled `send_all` may have sent part of its data (trio's contract), so the stream is
    # marked broken instead: later calls raise, and nothing corrupt is ever sent (trio's
    # SSLStream makes the same choice).

    def _collect(self) -> None:
        if _ffi is not None:
            # Ask the memory BIO how much it holds first: pyOpenSSL's bio_read allocates
            # 64 KiB and raises WantReadError when it is empty, as it is after most reads.
            bio = self._conn._from_ssl
            while (pending := _lib.BIO_get_mem_data(bio, _ffi.NULL)) > 0:
                buffer = _scratch_buffer()
                got = _lib.BIO_read(bio, buffer, min(pending, _DRAIN_BYTES))
                if got <= 0:
                    break
                self._outgoing += _ffi.buffer(buffer, got)
            return
        while True:
            try:
                self._outgoing += self._conn.bio_read(_RECEIVE_SIZE)
            except SSL.WantReadError:
                return

    async def _flush(self, *, wait: bool = True) -> None:
        """Send everything OpenSSL produced.  With `wait=False`, return at once if another
        task is already sending (it will send these bytes as well)."""
        self._collect()
        lock = self._send_lock
        if not self._outgoing or (not wait and lock.locked()):
            await trio.lowlevel.checkpoint()
            return
        waited = lock.locked()    # free, it is taken without a yield: nothing new to collect
        await lock.acquire()
        if waited:
            self._collect()       # what was produced while this task waited
        try:
            await self._send_outgoing()
        finally:
            lock.release()

    async def _send_outgoing(self) -> None:
        """Hand `_outgoing` to the transport (caller holds `_send_lock`)."""
        sock = self._sock
        while self._outgoing:
            if self._transport_broken is not None:
                raise trio.BrokenResourceError(self._transport_broken)
            if sock is None:
                data = bytes(self._outgoing)
                # A cancellation before the transport was called loses nothing.
                await trio.lowlevel.checkpoint_if_cancelled()
                try:
                    await self.transport.send_all(data)
                except BaseException as exc:
                    # How much of `data` went out is unknown: no record after this one could
                    # be read by the peer.  ClosedResourceError: we closed it ourselves.
                    if not isinstance(exc, trio.ClosedResourceError):
                        self._transport_broken = self._broken = (
                            "a send to the transport was interrupted; the TLS stream is unusable")
                    raise
                del self._outgoing[:len(data)]
                continue
            try:
                # A copy: the bytearray must stay resizable while a reader appends to it.
                sent = await eager_io.send_some(sock, bytes(self._outgoing))
            except trio.BrokenResourceError as exc:
                self._transport_broken = f"transport send failed: {getattr(exc.__cause__, 'strerror', None) or exc}"
                raise trio.BrokenResourceError(self._transport_broken) from exc
            del self._outgoing[:sent]

    async def _refill(self, *, fair: bool = False) -> None:
        # Called by the handshake (under its lock) or by receive_some after it: never by two
        # tasks at once.  `fair`: yield at least once (eager_io.receive_some), the one yield
        # of a read that needed the transport.
        if self._sock is not None:
            data = await eager_io.receive_some(self._sock, _RECEIVE_SIZE, self.before_wait, fair=fair)
        else:
            data = await self.transport.receive_some(_RECEIVE_SIZE)
        if data:
            self._conn.bio_write(data)
            if len(data) > _BIG_READ:
                self._big_read = True
        else:
            self._eof = True
            self._conn.bio_shutdown()

    def _fail(self, what: str, exc: BaseException | None = None) -> TlsError:
        reason = what if exc is None else f"{what}: {describe_openssl_error(exc)}"
        self._broken = reason
        return TlsError(reason)

    # ------------------------------------------------------------------ handshake

    async def do_handshake(self) -> None:
        """Run the TLS handshake to completion; raises TlsError (after sending OpenSSL's
        alert, if it made one) when it fails."""
        if self._handshake_done:
            return
        lock = self._handshake_lock
        assert lock is not None   # dropped only once the handshake is done
        async with lock:
            while not self._handshake_done:
                self._check_usable()
                try:
                    self._conn.do_handshake()
                except SSL.WantReadError:
                    await self._flush()
                    if self._eof:
                        raise self._fail("the peer closed the connection during the TLS handshake") from None
                    await self._refill()
                    continue
                except SSL.Error as exc:
                    try:
                        await self._flush()  # the alert tells the peer why
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    if self._eof and isinstance(exc, SSL.SysCallError):
                        raise self._fail("the peer closed the connection during the TLS handshake") from None
                    raise self._fail("TLS handshake failed", exc) from None
                await self._flush()
                self._handshake_done = True
                self._handshake_lock = None   # a Lock is ~0.3 KiB per stream (issue 13)

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("TLS stream was closed")
        if self._broken is not None:
            raise TlsError(self._broken)

    # ------------------------------------------------------------------ trio.abc.Stream

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this TLS stream")
        self._sending = True
        try:
            self._check_usable()
            await self.do_handshake()
            # All of `data` is encrypted before the first wait: if this call is cancelled,
            # what it was given still goes out whole with the next flush (the next send_all
            # or aclose), never a cut-off stanza followed by something else.  The ciphertext
            # held is bounded by what one call is given (an element, at most a read's worth).
            view = memoryview(data)
            while view:
                try:
                    written = self._conn.send(view[:_SEND_CHUNK])
                except SSL.Error as exc:
                    raise self._fail("TLS write failed", exc) from None
                view = view[written:]
                if view:
                    self._collect()   # the memory BIO holds one chunk's records at most
            if data:
                await self._flush()   # collects the last chunk's
            else:
                await trio.lowlevel.checkpoint()
        finally:
            self._sending = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this TLS stream")
        self._receiving = True
        try:
            self._check_usable()
            await self.do_handshake()
            size = max_bytes or _RECEIVE_SIZE
            refilled = False
            while True:
                try:
                    # Everything OpenSSL can decrypt now (`_drain`); an error it met after
                    # earlier bytes is raised here, with its reason; nothing at all means
                    # reading the transport.
                    data = b"" if self._read_error is not None else self._drain(b"", size)
                    if not data and self._read_error is not None:
                        error, self._read_error = self._read_error, None
                        try:
                            raise error
                        finally:
                            # Its traceback holds this frame: a local naming it is a
                            # reference cycle that would keep the stream (its OpenSSL
                            # objects, its socket) until the cyclic GC ran.
                            del error
                    if not data and _ffi is None:
                        data = self._drain(self._conn.recv(size), size)
                except SSL.WantReadError:
                    data = b""
                except SSL.ZeroReturnError:     # close_notify
                    await trio.lowlevel.checkpoint()
                    return b""
                except SSL.SysCallError as exc:
                    if self._eof:
                        await trio.lowlevel.checkpoint()
                        return b""
                    raise self._fail("TLS read failed", exc) from None
                except SSL.Error as exc:
                    raise self._fail("TLS read failed", exc) from None
                if not data:
                    # Wait outside the except clause: a waiting read must not keep an exception
                    # alive, with its traceback's frames and their buffers (memory per idle
                    # stream: pyOpenSSL's 64 KiB receive buffer was kept so).
                    # TLS 1.3 post-handshake messages (KeyUpdate) may need an answer.
                    self._collect()
                    if self._outgoing:
                        await self._flush(wait=False)
                    if self._eof:
                        await trio.lowlevel.checkpoint()
                        return b""
                    await self._refill(fair=True)
                    refilled = True
                    continue
                self._collect()
                if self._outgoing:
                    await self._flush(wait=False)
                # One yield per read (the socket calls above make none when they complete at
                # once, proxy.eager_io): a peer whose data never stops cannot starve the other
                # streams.  A read that went to the transport yielded there (its wait, or
                # its yield after finding data); one served from OpenSSL's buffer yields here,
                # where it cannot raise Cancelled: the data is already read.  (Two or three
                # yields per read that waited were several scheduler passes per set-up.)
                if not refilled:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return data
        finally:
            self._receiving = False

    def _drain(self, data: bytes, size: int) -> bytes:
        """Append what OpenSSL can decrypt from bytes already received, up to `size`.

        One socket read often holds several TLS records (16 KiB each at most); returning them
        together makes one trip through the relay per read instead of one per record
        (bench/: −15 % CPU per 1 KiB stanza).  An error after some bytes is raised by the
        next call, with OpenSSL's reason.
        """
        if _ffi is not None and size - len(data) <= _DRAIN_BYTES:
            # Straight to SSL_read, into one buffer: a read can hold many records (dozens
            # from a peer that writes one per stanza), and pyOpenSSL's recv costs ~1 µs of
            # Python and a fresh buffer of the requested size on each (issue 13).  The buffer
            # is the thread's: nothing awaits between filling it and copying it out.
            ssl, buf, want, got = self._conn._ssl, _scratch_buffer(), size - len(data), 0
            while got < want:
                n = _lib.SSL_read(ssl, buf + got, want - got)
                if n <= 0:
                    break
                got += n
            else:
                return data + _ffi.buffer(buf, got)[:]
            if _lib.SSL_get_error(ssl, n) == _lib.SSL_ERROR_WANT_READ:
                return data + _ffi.buffer(buf, got)[:] if got else data
            # Anything else (close_notify, an alert, a bad record): pyOpenSSL's recv below
            # reads OpenSSL's error queue, as it would have without this loop.
            data += _ffi.buffer(buf, got)[:]
        chunks = [data]
        total = len(data)
        while total < size:
            try:
                more = self._conn.recv(size - total)
            except SSL.WantReadError:
                break
            except SSL.Error as exc:
                # Kept for the next call: OpenSSL's reason is in this exception only (its
                # error queue is read once), and the operator's log needs it.
                self._read_error = self._read_error or exc
                break
            if not more:
                break
            chunks.append(more)
            total += len(more)
        return data if len(chunks) == 1 else b"".join(chunks)

    def release_idle(self) -> bool:
        """Give back buffer capacity an idle stream does not need (issue 13, memory per idle
        stream); whether anything was given back.

        A memory BIO keeps the capacity of the largest write into it: the incoming one after
        a large read (~142 KiB instead of ~36 KiB per connection after 64 KiB bursts), both
        after the handshake's certificate flights (~5 KiB, bench/README.md).  An empty BIO is
        replaced by a fresh one, the incoming one after each large read, both once after the
        handshake.  Nothing is lost: only empty BIOs are replaced (and `_outgoing` only when
        empty, so no send is in flight), and OpenSSL's record state is in the connection,
        not in the BIOs.  Uses pyOpenSSL's `_into_ssl`/`_from_ssl` (no API for this);
        without them, does nothing."""
        if not (self._big_read or self._handshake_buffers) or not self._handshake_done \
                or self._eof or self._closed or self._broken:
            return False
        conn = self._conn
        ssl_ptr = getattr(conn, "_ssl", None)
        if getattr(conn, "_into_ssl", None) is None or getattr(conn, "_from_ssl", None) is None \
                or ssl_ptr is None or _ffi is None:
            return False
        released = False
        if _lib.BIO_get_mem_data(conn._into_ssl, _ffi.NULL) == 0:   # else part of a record waits
            fresh = _lib.BIO_new(_lib.BIO_s_mem())
            if fresh != _ffi.NULL:
                # SSL_set_bio with only the read BIO changed: OpenSSL frees the old one and
                # owns this one (SSL_set_bio(3), "only the rbio changed").
                _lib.SSL_set_bio(ssl_ptr, fresh, conn._from_ssl)
                conn._into_ssl = fresh
                self._big_read = False
                released = True
        if self._handshake_buffers and released and not self._outgoing \
                and _lib.BIO_get_mem_data(conn._from_ssl, _ffi.NULL) == 0:
            fresh = _lib.BIO_new(_lib.BIO_s_mem())
            if fresh != _ffi.NULL:
                _lib.SSL_set_bio(ssl_ptr, conn._into_ssl, fresh)   # only the wbio changed
                conn._from_ssl = fresh
                self._outgoing = bytearray()
                self._handshake_buffers = False
        return released

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Send close_notify (bounded wait) and close the transport."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            if self._handshake_done and self._broken is None:
                try:
                    self._conn.shutdown()
                except SSL.Error:
                    pass
                else:
                    self._collect()
                    if self._sock is not None and not self._send_lock.locked():
                        # Usually the kernel takes the close_notify at once: then no deadline
                        # (a cancel scope, ~9 µs per stream's end, issue 13) is needed.
                        try:
                            del self._outgoing[:self._sock.send(self._outgoing)]
                        except OSError:   # would block (wait below), or the peer is gone
                            pass
                    if self._outgoing:
                        with trio.move_on_after(_CLOSE_NOTIFY_TIMEOUT):
                            await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await eager_io.aclose(self.transport)

    # ------------------------------------------------------------------ what was negotiated

    def peer_chain(self) -> list[x509.Certificate]:
        """The peer's certificate chain as presented, leaf first ([] if it sent none).

        OpenSSL's server side leaves the client's leaf out of SSL_get_peer_cert_chain (the
        client side includes it); both are normalised to leaf first here.
        """
        return _parse_chain(self.peer_chain_der())

    def peer_chain_der(self) -> list[bytes]:
        """`peer_chain()` as DER, unparsed."""
        leaf = self._conn.get_peer_certificate()
        chain = [crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
                 for cert in self._conn.get_peer_cert_chain() or ()]
        if leaf is None:
            return chain
        leaf_der = crypto.dump_certificate(crypto.FILETYPE_ASN1, leaf)
        if chain and chain[0] == leaf_der:
            return chain
        return [leaf_der, *chain]

    @property
    def alpn(self) -> str | None:
        proto = self._conn.get_alpn_proto_negotiated()
        return proto.decode("ascii", "replace") if proto else None

    @property
    def server_name(self) -> str | None:
        """SNI: sent by us (client side) or received (server side)."""
        name = self._conn.get_servername()
        return name.decode("ascii", "replace") if name else None

    @property
    def protocol(self) -> str | None:
        """OpenSSL's protocol name, e.g. "TLSv1.3" (None before the handshake)."""
        return self._conn.get_protocol_version_name() if self._handshake_done else None

    @property
    def version(self) -> str | None:
        """"1.2" or "1.3" (None before the handshake)."""
        proto = self.protocol
        return proto.removeprefix("TLSv") if proto else None

    @property
    def cipher(self) -> str | None:
        return self._conn.get_cipher_name()

    def info(self) -> TlsInfo:
        """Everything the handshake established (call after `do_handshake`)."""
        # Interned: every stream keeps these, and they are the same few strings on all of
        # them (issue 13, memory per idle stream).
        return TlsInfo(
            version=sys.intern(self.version or ""),
            protocol=sys.intern(self.protocol or ""),
            cipher=_interned(self.cipher),
            alpn=_interned(self.alpn),
            server_name=_interned(self.server_name),
            chain_der=PeerChainDer(self, self._conn.get_peer_certificate() is not None
                                   or bool(self._conn.get_peer_cert_chain())),
        )
