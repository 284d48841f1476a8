"""Inbound S2S (DESIGN §3.1), the trio shell: one `InboundConnection` per accepted peer.

It owns the sockets (peer, backend), the deadlines and the verdict look-ups, and drives the
sans-IO protocol in `proxy.inbound_session` (`InboundSession`): every rule of the stream lives
there; this module only performs the actions it returns.  `handle_inbound` is the entry point.
"""
from __future__ import annotations

import functools
import ipaddress
import logging
import math
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from policy.verdict import Verdict
from proxy import eager_io
from proxy.admission import UnauthenticatedSlot
from proxy.config import parse_hostport
from proxy.dialback_keys import DialbackKeys
from proxy.fdlimit import out_of_resources
from proxy.inbound_session import (
    CLOSE_GRACE, Action, Authenticated, CheckDialback, Close,
    ConnectBackend, InboundSession, Note, PeerDone, PeerGrace, SendToBackend, SendToPeer, StartTls,
)
from proxy.keepalive import enable_keepalive
from proxy.logsetup import format_peer, log_decision
from proxy.streamerrors import StreamError
from proxy.tls import ServerCertificates, TlsError, TlsStream, UnreadableCertificate
from proxy.xmlstream import DEFAULT_MAX_STANZA_BYTES

log = logging.getLogger("xmpp_dane_proxy.inbound")

# ================================================================================ the trio shell

EvidenceFor = Callable[[str, object], Awaitable[object]]   # (domain, Policy) -> Evidence

_RECEIVE_SIZE = 65536       # one read of the backend (or of the peer's first, plaintext bytes)
# One read of the peer's TLS stream: the relay's cost per read (a scheduler pass, the session's
# Python, a send to the backend) is spread over up to 256 KiB of stanzas rather than 64
# (issue 13; bench/: ~−10 % CPU per stanza).  Bounded: TLS decrypts at most this per read.
_PEER_READ = 262144
# How long a last write (stream error, `</stream:stream>`, close_notify) may take before the
# socket is closed anyway: a peer that stopped reading must not hold the slot.
_CLOSE_TIMEOUT = 5.0


@dataclass
class InboundSettings:
    """What one inbound connection needs; the server swaps in a new one on reload."""

    certificates: ServerCertificates
    backend: str                               # "host:port" / "[v6]:port" / "unix:/path"
    policies: object                           # policy.policyfile.PolicySet
    trust: object | None                       # policy.pkix.TrustStore
    evidence_for: EvidenceFor
    local_domains: frozenset[str] = field(default_factory=frozenset)
    max_stanza_bytes: int = DEFAULT_MAX_STANZA_BYTES
    handshake_timeout: float = 30.0           # accept -> first pair confirmed by the backend
    idle_timeout: float = 0.0                 # after that, without a byte from the peer; 0 = off
    proxy_protocol: bool = False
    metrics: object | None = None              # proxy.metrics.Metrics (duck-typed, optional)
    # For `inbound.websocket_listen` (proxy.websocket): the same identities, ALPN http/1.1.
    websocket_certificates: ServerCertificates | None = None
    # proxy.posh_fetch.PoshFetcher for policies using POSH (RFC 7711); by default the one
    # `proxy.server.dns_evidence` attached to its evidence function (same resolver, same cache).
    posh: object | None = None
    reverify: object | None = None             # proxy.reverify.Reverifier (DESIGN §3.4)
    # DESIGN §3.3: offer SASL EXTERNAL (config inbound.sasl_external); the keys the proxy
    # mints for dialback on a peer's behalf, shared with the outbound side that answers them.
    sasl_external: bool = False
    dialback_keys: DialbackKeys = field(default_factory=DialbackKeys)

    def __post_init__(self) -> None:
        if not self.local_domains:
            self.local_domains = frozenset(self.certificates.names)
        if self.posh is None:
            self.posh = getattr(self.evidence_for, "posh", None)


def _log(level: int, event: str, **fields: object) -> None:
    """One structured line (proxy/logsetup.py renders `extra["fields"]` as logfmt or JSON)."""
    log.log(level, event, extra={"fields": {"event": event, "direction": "inbound", **fields}})


def proxy_protocol_v2(src, dst) -> bytes:
    """A PROXY protocol v2 header (haproxy's spec, §2.2) carrying the peer's address.

    `src`/`dst` are socket addresses (host, port, ...); anything that is not TCP over IPv4 or
    IPv6 is sent as the LOCAL command (no address), which the spec allows.
    """
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    try:
        s_ip, d_ip = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
        if s_ip.version != d_ip.version:
            s_ip = ipaddress.IPv6Address(f"::ffff:{s_ip}") if s_ip.version == 4 else s_ip
            d_ip = ipaddress.IPv6Address(f"::ffff:{d_ip}") if d_ip.version == 4 else d_ip
        family = 0x11 if s_ip.version == 4 else 0x21     # TCP over IPv4 / IPv6
        body = s_ip.packed + d_ip.packed + struct.pack("!HH", src[1], dst[1])
        return signature + bytes([0x21, family]) + struct.pack("!H", len(body)) + body
    except (TypeError, ValueError, IndexError):
        return signature + bytes([0x20, 0x00]) + b"\x00\x00"


@functools.lru_cache(maxsize=16)   # the same one or two backends for every stream
def _backend_address(backend: str) -> tuple[str, int, int | None]:
    """host, port and IP version of `host:port` (None: a name to resolve)."""
    host, port = parse_hostport(backend)
    try:
        return host, port, ipaddress.ip_address(host).version
    except ValueError:
        return host, port, None


async def open_backend(backend: str) -> trio.abc.Stream:
    """Connect to the backend's plaintext S2S port (`host:port` or `unix:/path`)."""
    if backend.startswith("unix:"):
        return await trio.open_unix_socket(backend[5:])
    host, port, version = _backend_address(backend)
    if version is None:
        return await trio.open_tcp_stream(host, port)
    # A numeric address (the usual backend): one plain connect, without open_tcp_stream's
    # getaddrinfo and happy-eyeballs nursery on every stream set-up (bench/: ~5 % of one),
    # nor trio's address checks (~1 %).
    sock = socket.socket(socket.AF_INET6 if version == 6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await eager_io.connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


class InboundConnection:
    """The trio shell around one `InboundSession`: reads, performs actions, closes."""

    # Slots, not a dict per connection (issue 13, memory per idle stream).
    __slots__ = (
        "settings", "admission", "raw", "_raw_sock", "peer_stream", "backend", "_backend_sock", "_sockaddrs", "peer",
        "metrics", "started", "session", "_peer_lock", "_backend_lock", "_close_done", "_close_waiter", "_nursery",
        "_handshake_scope", "_idle_scope", "close_reason",
        "close_condition", "outcome", "verdicts", "_peer_activity", "_watched",
    )

    def __init__(self, transport: trio.SocketStream, settings: InboundSettings, *,
                 admission: "UnauthenticatedSlot | None" = None) -> None:
        self.settings = settings
        # Held until the first pair is authenticated (limits.max_unauthenticated).
        self.admission = admission
        self.raw = transport
        self._raw_sock = eager_io.stdlib_socket(transport)   # for the plaintext phase's reads and sends
        self.peer_stream: trio.abc.Stream = transport
        self.backend: trio.abc.Stream | None = None
        self._backend_sock: socket.socket | None = None   # under `backend`, for eager sends
        try:
            self._sockaddrs = (transport.socket.getpeername(), transport.socket.getsockname())
            self.peer = format_peer(self._sockaddrs[0])
        except (AttributeError, OSError):
            self.peer, self._sockaddrs = "-", None
        self.metrics = settings.metrics
        self.started = trio.current_time()
        self.session = InboundSession(
            settings.local_domains, max_stanza_bytes=settings.max_stanza_bytes,
            describe_backend=sys.intern(f"backend {settings.backend}"),   # one copy, not one per stream
            sasl_external=settings.sasl_external, dialback_keys=settings.dialback_keys)
        self._peer_lock = eager_io.Lock()
        self._backend_lock = eager_io.Lock()
        # The Close action was performed; _run's wait for it, made only when it waits (an
        # Event per idle stream is 0.2 KiB, issue 13).
        self._close_done = False
        self._close_waiter: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._handshake_scope: trio.CancelScope | None = None
        self._idle_scope: trio.CancelScope | None = None
        self.close_reason = ""
        self.close_condition: str | None = None
        # Settled when the connection ends (`_settle`): the session's ending, system-shutdown
        # when cancelled from outside, internal-error only when an exception escaped.
        self.outcome = "internal-error"
        # (domain, Verdict) in order, one per domain: a stream's few pairs are looked up here
        # (_check) rather than in a dict beside it.
        self.verdicts: list[tuple[str, Verdict]] = []
        # Set (and replaced) whenever the peer sends bytes, once _grace watches (None before:
        # no Event per stream, none set per read, until then).
        self._peer_activity: trio.Event | None = None
        self._watched: list[object] = []   # proxy.reverify handles of accepted domains

    async def run(self) -> None:
        """Serve the connection to its end.  Never leaves a socket open; an unexpected
        exception is counted as `internal-error` and re-raised for the server to log."""
        if self.metrics is not None:
            self.metrics.connection_opened("inbound")
        try:
            await self._run()
        finally:
            if self.admission is not None:
                self.admission.release()
            if self.metrics is not None:
                self.metrics.connection_closed("inbound", self.outcome)

    async def _run(self) -> None:
        escaped: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                with trio.move_on_after(self.settings.handshake_timeout) as scope:
                    self._handshake_scope = scope
                    await self._read_peer()
                if scope.cancelled_caught and not self.session.closed:
                    with trio.move_on_after(_CLOSE_TIMEOUT):
                        await self._perform(self.session.timed_out(self.settings.handshake_timeout))
                if not self._close_done:
                    # The peer ended its stream, or the session closed in another task that is
                    # still sending the last bytes (the final </stream:stream>): let it finish
                    # and give the backend time to end its own stream.  The nursery's own
                    # deadline bounds the wait (it ends the nursery either way: no scope of
                    # its own, ~10 µs per stream, issue 13).
                    self._close_waiter = trio.Event()
                    nursery.cancel_scope.deadline = trio.current_time() + CLOSE_GRACE
                    await self._close_waiter.wait()
                nursery.cancel_scope.cancel()
            if self._close_waiter is not None and not self.session.closed:   # the grace ran out
                self.close_reason = "the backend did not close its stream in time"
                self.outcome = "ok"
        except BaseException as exc:
            if not _is_cancellation(exc):
                escaped = exc
            elif not self.session.closed:
                # Cancelled from outside (the proxy stops and the drain time is over): the peer
                # gets system-shutdown (if our stream to it is open), the backend its closing tag.
                with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
                    await self._perform(self.session.stopped())
            raise
        finally:
            for handle in self._watched:
                self.settings.reverify.unwatch(handle)  # type: ignore[union-attr]
            self._watched.clear()   # each handle's callbacks name this connection: a cycle
            await self._close_all()
            if isinstance(self.peer_stream, TlsStream):
                # The stream's hook is our bound method: a reference cycle that would keep the
                # connection, its OpenSSL objects and its parser until the cyclic GC ran (each
                # set-up left ~50 objects for it: ~3 % of a set-up's CPU went to that GC, bench/).
                self.peer_stream.before_wait = None
            self._settle(escaped)
            extra = {}
            if self.session.returned or self.session.undeliverable:
                extra = {"returned": self.session.returned, "undeliverable": self.session.undeliverable}
            _log(logging.INFO, "stream-closed", peer=self.peer, domain=self.session.peer_domain,
                 outcome=self.outcome, condition=self.close_condition, reason=self.close_reason, **extra)

    def _settle(self, escaped: BaseException | None) -> None:
        """How the connection ended, for the log line and the metrics."""
        if escaped is not None:
            self.outcome = "internal-error"
            self.close_reason = f"internal error: {type(escaped).__name__}: {escaped}"
        elif self.close_reason:
            return      # set by the Close action, or by the close grace above
        elif self.session.ending is not None:
            # The session decided; the shell may not have performed its Close (e.g. the
            # connection was cancelled while the last bytes were being sent).
            ending = self.session.ending
            self.close_reason, self.close_condition, self.outcome = ending.reason, ending.condition, ending.outcome
        else:
            self.outcome, self.close_reason = "system-shutdown", "cancelled: the proxy stopped"

    # ------------------------------------------------------------------ reading

    async def _read_peer(self) -> None:
        idle = self.settings.idle_timeout
        while self.session.reading_peer:
            size = _PEER_READ if isinstance(self.peer_stream, TlsStream) else _RECEIVE_SIZE
            try:
                # limits.idle_timeout (0 = off) once a pair is authenticated; before that the
                # handshake deadline around this loop bounds every read.  Off: no scope per read.
                if idle > 0:
                    with trio.CancelScope() as wait:
                        self._idle_scope = wait
                        if self.session.authenticated:
                            wait.deadline = trio.current_time() + idle
                        data = await self._receive_peer(size)
                    if wait.cancelled_caught:
                        await self._perform(self.session.idle_timed_out(idle))
                        continue
                else:
                    data = await self._receive_peer(size)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                await self._perform(self.session.peer_eof(str(exc)))
                return
            except StreamError as exc:   # a framing transport (proxy.websocket) judged the peer
                await self._perform(self.session.peer_error(exc.condition, exc.text))
                continue
            if data and self._peer_activity is not None:
                self._peer_activity.set()
                self._peer_activity = trio.Event()
            if self.metrics is not None and data and self.session.negotiated:
                self.metrics.relayed("inbound", "peer", len(data))
            await self._perform(self.session.peer_data(data) if data else self.session.peer_eof())
            del data   # not kept through the next wait (issue 13, memory per idle stream)
            if not isinstance(self.peer_stream, TlsStream):
                self.session.release_idle()

    @property
    def _plaintext_sock(self) -> socket.socket | None:
        """The peer's socket while the stream is plaintext (stream header, STARTTLS): read
        and written directly, as TlsStream does after it; trio's SocketStream costs ~5 % of
        a stream set-up in its wrappers (bench/)."""
        return self._raw_sock if self.peer_stream is self.raw else None

    def _receive_peer(self, size: int) -> Awaitable[bytes]:
        sock = self._plaintext_sock
        if sock is not None:
            return eager_io.receive_some(sock, size, fair=True)
        return self.peer_stream.receive_some(size)

    def _peer_idle(self) -> None:
        """The peer's TLS stream is about to wait for data: give back what only a busy stream
        needs (issue 13, memory per idle stream)."""
        self.session.release_idle()
        if isinstance(self.peer_stream, TlsStream):
            self.peer_stream.release_idle()

    async def _read_backend(self) -> None:
        # A backend that accepts the connection but never answers must not hold the peer:
        # its stream header is due within handshake_timeout of accepting the peer.  The
        # deadline bounds the waits for the backend's bytes until the header is there, and
        # never a send (one cut short would cut a stanza); a task of its own per stream cost
        # ~2 % of a set-up (bench/).
        timeout = self.settings.handshake_timeout
        header_due: float | None = self.started + timeout
        while not self.session.closed:
            try:
                if header_due is not None and not self.session.backend_answered:
                    with trio.CancelScope(deadline=header_due) as wait:
                        data = await self._receive_backend()
                    if wait.cancelled_caught:
                        header_due = None
                        await self._perform(self.session.backend_silent(timeout))
                        continue
                else:
                    data = await self._receive_backend()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                await self._perform(self.session.backend_eof(str(exc)))
                return
            if self.metrics is not None and data:
                self.metrics.relayed("inbound", "backend", len(data))
            await self._perform(self.session.backend_data(data) if data else self.session.backend_eof())
            if not data:
                return
            del data   # not kept through the next wait
            self.session.release_idle()

    def _receive_backend(self) -> Awaitable[bytes]:
        """The backend's next bytes (b"" at its EOF); a cancelled wait has read nothing.
        Returned for the caller to await: no frame of its own while an idle stream waits."""
        assert self.backend is not None
        if self._backend_sock is None:
            return self.backend.receive_some(_RECEIVE_SIZE)
        # Straight from the kernel socket: an idle stream's waiting read holds three frames
        # fewer than through trio's SocketStream (issue 13, memory per idle stream).
        return eager_io.receive_some(self._backend_sock, _RECEIVE_SIZE, fair=True)

    # ------------------------------------------------------------------ performing actions

    async def _perform(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendToPeer):
                await self._send_peer(action.data)
            elif isinstance(action, SendToBackend):
                await self._send_backend(action.data)
            elif isinstance(action, StartTls):
                await self._start_tls(action)
            elif isinstance(action, ConnectBackend):
                await self._connect_backend()
            elif isinstance(action, CheckDialback):
                await self._check(action)
            elif isinstance(action, Authenticated):
                # DESIGN §3.1 Deadlines: the handshake ends with the first confirmed pair.
                if self._handshake_scope is not None:
                    self._handshake_scope.deadline = math.inf
                if self.admission is not None:
                    self.admission.release()
                if self.settings.idle_timeout > 0 and self._idle_scope is not None:
                    # The read already waiting started before; from now on it is bounded.
                    self._idle_scope.deadline = trio.current_time() + self.settings.idle_timeout
            elif isinstance(action, Note):
                _log(logging.WARNING if action.warning else logging.INFO, action.event, peer=self.peer,
                     domain=self.session.peer_domain, reason=action.reason)
            elif isinstance(action, PeerDone):
                pass  # _read_peer stops: session.reading_peer is now false
            elif isinstance(action, PeerGrace):
                assert self._nursery is not None
                self._nursery.start_soon(self._grace, action)
            elif isinstance(action, Close):
                if not self.close_reason:
                    self.close_reason, self.close_condition = action.reason, action.condition
                    self.outcome = action.outcome
                self._close_done = True
                if self._close_waiter is not None:
                    self._close_waiter.set()
                if self._nursery is not None:
                    self._nursery.cancel_scope.cancel()

    async def _send_peer(self, data: bytes) -> None:
        try:
            await self._peer_lock.acquire()
            try:
                sock = self._plaintext_sock
                if sock is not None:
                    await eager_io.send_all(sock, data)
                else:
                    await self.peer_stream.send_all(data)
            finally:
                self._peer_lock.release()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await self._perform(self.session.peer_broken(str(exc) or type(exc).__name__))

    async def _send_backend(self, data: bytes) -> None:
        if self.backend is None:
            return
        try:
            await self._backend_lock.acquire()
            try:
                if self._backend_sock is not None:
                    await eager_io.send_all(self._backend_sock, data)
                else:
                    await self.backend.send_all(data)
            finally:
                self._backend_lock.release()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await self._perform(self.session.backend_send_failed(data, str(exc) or type(exc).__name__))

    async def _grace(self, action: PeerGrace) -> None:
        """`PeerGrace`: wait until the peer is quiet for `action.quiet` s (or `limit` is up)."""
        if self._peer_activity is None:
            self._peer_activity = trio.Event()
        with trio.move_on_after(action.limit):
            if action.quiet is None:
                await trio.sleep_forever()
            while True:
                with trio.move_on_after(action.quiet) as quiet:
                    await self._peer_activity.wait()   # replaced by each read, never None here
                if quiet.cancelled_caught:
                    break
        await self._perform(self.session.grace_over())

    async def _start_tls(self, action: StartTls) -> None:
        prefix = action.prefix
        if not prefix:
            # Read the first bytes ourselves: whether they look like TLS decides whether a
            # failed handshake still gets a (plaintext) stream error.
            try:
                prefix = await self._receive_peer(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                prefix = b""
                reason = str(exc)
            else:
                reason = ""
            if not prefix:
                await self._perform(self.session.tls_failed(
                    f"peer closed the connection instead of starting TLS{': ' + reason if reason else ''}"))
                return
        ctx = self.settings.certificates.context_for(action.server_name)
        tls = TlsStream(self.raw, ctx, server_side=True, prefix=prefix)
        # What a stream needs only while busy is released when a read waits, not after each
        # read: a busy stream keeps its parser (a new one per read cost ~13 µs, bench/).
        tls.before_wait = self._peer_idle
        try:
            await tls.do_handshake()
        except TlsError as exc:
            await self._perform(self.session.tls_failed(str(exc), peer_spoke_tls=prefix[0] == 0x16))
            return
        self.peer_stream = tls
        info = tls.info()
        _log(logging.DEBUG, "tls", peer=self.peer, version=info.protocol, cipher=info.cipher,
             sni=info.server_name, alpn=info.alpn, direct_tls=action.direct, client_cert=bool(info.chain_der))
        await self._perform(self.session.tls_established(info))

    async def _connect_backend(self) -> None:
        try:
            stream = await open_backend(self.settings.backend)
        except (OSError, ValueError) as exc:
            detail = _os_error_text(exc)
            if out_of_resources(exc):
                # EMFILE & co: the backend is fine, the proxy is out of descriptors.
                await self._perform(self.session.backend_failed(
                    f"the proxy cannot open a connection to its backend: {detail}", "resource-constraint"))
                return
            await self._perform(self.session.backend_failed(f"backend {self.settings.backend} unreachable: {detail}"))
            return
        self.backend = stream
        self._backend_sock = eager_io.stdlib_socket(stream)
        enable_keepalive(stream)
        if self.settings.proxy_protocol:
            src, dst = self._sockaddrs or (None, None)
            await self._send_backend(proxy_protocol_v2(src, dst))
        assert self._nursery is not None
        self._nursery.start_soon(self._read_backend)
        await self._perform(self.session.backend_connected())

    async def _check(self, action: CheckDialback) -> None:
        verdict = next((v for domain, v in self.verdicts if domain == action.sender), None)
        if verdict is None:
            verdict = await self._evaluate(action.sender)
            self.verdicts.append((action.sender, verdict))
            log_decision("inbound", self.peer, action.sender, verdict.log_fields())
            if self.metrics is not None:
                if len(self.verdicts) == 1:   # accept -> first verdict (DESIGN §6 histogram)
                    self.metrics.handshake("inbound", trio.current_time() - self.started)
                self.metrics.verdict("inbound", verdict)
            if verdict.accepted and self.settings.reverify is not None:
                from proxy.reverify import watch_inbound
                self._watched.append(watch_inbound(self, action.sender, verdict))
        await self._perform(self.session.verdict(action.sender, action.target, verdict.accepted, verdict.reason,
                                                 verdict.prooftype))

    async def _evaluate(self, domain: str):
        """The verdict for `domain` asserted by this peer; never raises (fails closed)."""
        from policy.verdict import reject
        from proxy.posh_fetch import decide_with_posh

        tls = self.session.tls
        try:
            policy = self.settings.policies.for_domain(domain)
        except Exception as exc:  # a broken policy must reject, not crash the stream
            return reject(f"no usable policy for {domain}: {exc}")
        if tls is not None and _version_tuple(tls.version) < _version_tuple(policy.tls_min_version):
            return reject(f"TLS {tls.version} negotiated but policy requires TLS >= {policy.tls_min_version}",
                          policy_source=policy.source)
        try:
            evidence = await self.settings.evidence_for(domain, policy)
        except Exception as exc:
            return reject(f"DNS evidence for {domain} could not be gathered ({type(exc).__name__}: {exc}); failing closed",
                          policy_source=policy.source)
        try:
            chain = list(tls.chain) if tls is not None else []
        except UnreadableCertificate as exc:   # fail closed, and say which certificate
            return reject(f"the peer's chain: {exc}", policy_source=policy.source)
        try:
            verdict, _posh = await decide_with_posh(chain, evidence, policy, trust=self.settings.trust,
                                                    fetcher=self.settings.posh)
            return verdict
        except Exception as exc:
            log.exception("decide() failed for %s", domain)
            return reject(f"internal error while deciding: {type(exc).__name__}: {exc}", policy_source=policy.source)

    async def _close_all(self) -> None:
        # Shielded from the cancellation that may be ending the connection, bounded by its own
        # deadline (one scope for both: each costs ~9 µs, issue 13).
        with trio.CancelScope(shield=True, deadline=trio.current_time() + _CLOSE_TIMEOUT):
            if self.backend is not None:
                await eager_io.aclose(self.backend)
            await eager_io.aclose(self.peer_stream)
            if self.peer_stream is not self.raw:
                await eager_io.aclose(self.raw)   # a SocketStream: closed at once, even past the deadline

    async def shutdown(self) -> None:
        """Tell the peer the proxy is stopping (system-shutdown) and close."""
        await self._perform(self.session.shutdown())


def _is_cancellation(exc: BaseException) -> bool:
    """trio.Cancelled, or a nursery's group of nothing but (trio >= 0.25 groups them)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_cancellation(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


def _os_error_text(exc: BaseException) -> str:
    """The operating system's words for why a connect failed (trio.open_tcp_stream wraps the
    errors of its attempts in "all attempts to connect ... failed")."""
    seen, todo = 0, [exc]
    while todo and seen < 32:
        e = todo.pop(0)
        seen += 1
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        if e.__cause__ is not None:
            todo.append(e.__cause__)
    return str(exc)


def _version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        return (0,)


async def handle_inbound(transport: trio.SocketStream, settings: InboundSettings) -> InboundConnection:
    """Serve one accepted inbound connection to its end; return it (for its verdicts)."""
    conn = InboundConnection(transport, settings)
    await conn.run()
    return conn


__all__ = ["InboundConnection", "InboundSettings", "handle_inbound", "open_backend", "proxy_protocol_v2"]
