"""How much of a handshake ratio is the TLS library, not the proxy's code.

The proxy's TLS is pyOpenSSL over the OpenSSL that `cryptography` bundles (4.x here); stunnel
links the system OpenSSL (3.0.x on Debian 12), which is known to be slower at handshakes.
This measures, in one process and without sockets, the server side of the same TLS 1.3
handshake (same certificate chain, client certificate requested and presented) in both
libraries:

- `proxy-tls`: the proxy's own server context (`proxy.tls.server_context`: OpenSSL accepts any
  client chain, the proxy judges it later) over memory BIOs, as `proxy.tls.TlsStream` does;
- `system-openssl`: the standard library's `ssl` (the system OpenSSL, as stunnel uses it)
  configured like the stunnel benchmark: client certificate requested, chain verified against
  the test root, no tickets.

The client is the standard library's `ssl` in both cases and is not timed: only the
server's handshake calls are.  Also measured: the C heap each established server connection
keeps in each library (after the handshake with a client certificate and one data record),
the TLS library's share of the memory per idle stream.  Run alone: `python3 bench/tls_calibration.py CERTDIR` (a
directory with local.pem/.key, peer.pem/.key and root.pem, as `bench/run.py --keep` leaves;
an optional second argument is the number of rounds).  Prints one JSON object.
"""
from __future__ import annotations

import ctypes
import gc
import json
import ssl
import statistics
import sys
import time
from pathlib import Path

from OpenSSL import SSL

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from proxy.tls import server_context  # noqa: E402


def _client_ctx(peer_cert: Path, peer_key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(peer_cert), str(peer_key))
    return ctx


def _system_server_ctx(cert: Path, key: Path, root: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    ctx.verify_mode = ssl.CERT_OPTIONAL           # stunnel: verifyChain = yes, requireCert = no
    ctx.load_verify_locations(str(root))
    ctx.options |= ssl.OP_NO_TICKET
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _handshake_pyopenssl(server_ctx: SSL.Context, client_ctx: ssl.SSLContext) -> tuple[float, object]:
    """One handshake; the seconds spent in the server's calls, and the server's connection."""
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname="local")
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    spent = 0.0
    client_done = server_done = False
    for _ in range(20):
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
        data = c_out.read()
        t = time.perf_counter()
        if data:
            server.bio_write(data)
        if not server_done:
            try:
                server.do_handshake()
                server_done = True
            except SSL.WantReadError:
                pass
        out = []
        while True:
            try:
                out.append(server.bio_read(65536))
            except SSL.WantReadError:
                break
        spent += time.perf_counter() - t
        if out:
            c_in.write(b"".join(out))
        if client_done and server_done and not out and not data:
            break
    if not (client_done and server_done) or server.get_peer_certificate() is None:
        raise RuntimeError("calibration handshake (proxy TLS) did not complete with a client certificate")
    client.write(b"<presence/>")                 # one record of data, read as a stream would
    server.bio_write(c_out.read())
    if server.recv(1024) != b"<presence/>":
        raise RuntimeError("calibration data record (proxy TLS) did not arrive")
    return spent, server


def _handshake_stdlib(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[float, object]:
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname="local")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    spent = 0.0
    client_done = server_done = False
    for _ in range(20):
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
        data = c_out.read()
        t = time.perf_counter()
        if data:
            s_in.write(data)
        if not server_done:
            try:
                server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
        out = s_out.read()
        spent += time.perf_counter() - t
        if out:
            c_in.write(out)
        if client_done and server_done and not out and not data:
            break
    if not (client_done and server_done) or server.getpeercert() is None:
        raise RuntimeError("calibration handshake (system OpenSSL) did not complete with a client certificate")
    client.write(b"<presence/>")
    s_in.write(c_out.read())
    if server.read(1024) != b"<presence/>":
        raise RuntimeError("calibration data record (system OpenSSL) did not arrive")
    return spent, server


def calibrate(certdir: Path, rounds: int = 300) -> dict:
    """Server-side µs per handshake in each library (median of `rounds`)."""
    client = _client_ctx(certdir / "peer.pem", certdir / "peer.key")
    proxy_ctx = server_context(certdir / "local.pem", certdir / "local.key")
    system_ctx = _system_server_ctx(certdir / "local.pem", certdir / "local.key", certdir / "root.pem")
    for _ in range(20):      # warm both
        _handshake_pyopenssl(proxy_ctx, client)
        _handshake_stdlib(system_ctx, client)
    proxy_times, system_times = [], []
    for _ in range(rounds):  # interleaved, so drift hits both alike
        proxy_times.append(_handshake_pyopenssl(proxy_ctx, client)[0])
        system_times.append(_handshake_stdlib(system_ctx, client)[0])
    return {
        "rounds": rounds,
        "proxy_tls_us": 1e6 * statistics.median(proxy_times),
        "system_openssl_us": 1e6 * statistics.median(system_times),
        "proxy_tls_library": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
        "system_openssl_library": ssl.OPENSSL_VERSION,
        "proxy_tls_kib_per_connection": _heap_per_connection(lambda: _handshake_pyopenssl(proxy_ctx, client)[1]),
        "system_openssl_kib_per_connection": _heap_per_connection(lambda: _handshake_stdlib(system_ctx, client)[1]),
    }


def _heap_bytes() -> int:
    """C heap in use (glibc mallinfo2): where both OpenSSLs allocate; Python's small objects
    live in pymalloc's arenas and are not counted."""
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
            "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    gc.collect()
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def _heap_per_connection(open_one, count: int = 300) -> float:
    """KiB of C heap each established server connection holds (handshake done, client
    certificate kept, one data record read): the TLS library's share of the memory per idle
    stream, which no code above it can give back."""
    warm = [open_one() for _ in range(20)]        # lazily built tables, free lists
    before = _heap_bytes()
    kept = [open_one() for _ in range(count)]
    used = _heap_bytes() - before
    del kept, warm
    return used / count / 1024


if __name__ == "__main__":
    print(json.dumps(calibrate(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 300)))
