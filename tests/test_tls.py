"""TLS over trio with pyOpenSSL memory BIOs (proxy/tls.py), against real `openssl s_client`/`s_server`.

Also home of `OpenSSLProcess`, a trio wrapper for openssl command-line peers that the inbound
tests import.
"""
from __future__ import annotations

import re
import subprocess
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization

from pki import TestCA, self_signed
from test_eager_io import collect_into, count_yields
from proxy.tls import (
    ServerCertificates, TlsConfigError, TlsError, TlsStream, client_context, server_context,
)

TIMEOUT = 15.0


# ------------------------------------------------------------------------------ helpers

class OpenSSLProcess:
    """A running `openssl` command with stdout+stderr collected; always killed on exit."""

    def __init__(self, proc: trio.Process, argv: list[str]) -> None:
        self.proc = proc
        self.argv = argv
        self.output = b""
        self._changed = trio.Event()
        self.eof = False

    @classmethod
    @asynccontextmanager
    async def run(cls, *argv: str):
        argv = ["openssl", *map(str, argv)]
        proc = await trio.lowlevel.open_process(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        me = cls(proc, argv)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(me._collect)
                try:
                    yield me
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            if proc.returncode is None:
                proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()

    async def _collect(self) -> None:
        while True:
            chunk = await self.proc.stdout.receive_some(65536)
            if not chunk:
                self.eof = True
                self._changed.set()
                return
            self.output += chunk
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, pattern: bytes, timeout: float = TIMEOUT) -> re.Match:
        """Wait until the output matches `pattern` (a regex); fail with the output if not."""
        with trio.move_on_after(timeout):
            while True:
                m = re.search(pattern, self.output)
                if m:
                    return m
                if self.eof:
                    break
                await self._changed.wait()
        raise AssertionError(f"{pattern!r} not seen in output of {' '.join(self.argv)}:\n"
                             + self.output.decode(errors="replace"))

    async def send(self, data: bytes) -> None:
        await self.proc.stdin.send_all(data)

    async def close_stdin(self) -> None:
        await self.proc.stdin.aclose()

    async def exit_code(self, timeout: float = TIMEOUT) -> int:
        with trio.fail_after(timeout):
            return await self.proc.wait()


@dataclass
class Identity:
    """A certificate written to disk: `cert` = full chain PEM, `leaf`/`rest` split for openssl."""

    issued: object
    cert: Path
    key: Path
    leaf: Path
    rest: Path


def write_identity(issued, directory: Path, name: str) -> Identity:
    cert, key = issued.write(directory, name)
    leaf, rest = directory / f"{name}-leaf.pem", directory / f"{name}-rest.pem"
    leaf.write_bytes(issued.chain[0].public_bytes(serialization.Encoding.PEM))
    rest.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in issued.chain[1:]))
    return Identity(issued, cert, key, leaf, rest)


def client_cert_args(ident: Identity) -> list[str]:
    args = ["-cert", ident.leaf, "-key", ident.key]
    if len(ident.issued.chain) > 1:
        args += ["-cert_chain", ident.rest]
    return args


@asynccontextmanager
async def one_listener():
    """A TCP listener on 127.0.0.1, port chosen by the kernel."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        yield listeners[0], listeners[0].socket.getsockname()[1]
    finally:
        for listener in listeners:
            await listener.aclose()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("tlspki")
    ca = TestCA()
    inter = ca.intermediate()
    return {
        "dir": d,
        "ca": ca,
        "b": write_identity(inter.issue(dns=["b.example"]), d, "b"),
        "c": write_identity(inter.issue(dns=["c.example"], key_type="rsa"), d, "c"),
        "a": write_identity(inter.issue(dns=["a.example"]), d, "a"),
        "selfsigned": write_identity(self_signed(["s.example"]), d, "s"),
    }


def subjects(chain) -> list[str]:
    return [c.subject.rfc4514_string() for c in chain]


# ------------------------------------------------------------------------------ server side vs s_client

def test_server_side_with_s_client_presenting_a_chain(pki):
    async def main():
        certs = ServerCertificates({"b.example": (pki["b"].cert, pki["b"].key)})
        async with one_listener() as (listener, port):
            async with OpenSSLProcess.run(
                "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "b.example",
                "-alpn", "xmpp-server", "-brief", *client_cert_args(pki["a"]),
            ) as client:
                with trio.fail_after(TIMEOUT):
                    transport = await listener.accept()
                    tls = TlsStream(transport, certs.context_for("b.example"), server_side=True)
                    await tls.do_handshake()
                    info = tls.info()
                    await tls.send_all(b"hello from the proxy\n")
                    await client.wait_for(rb"hello from the proxy")
                    await client.send(b"hello from s_client\n")
                    got = b""
                    while b"\n" not in got:
                        got += await tls.receive_some()
                    await tls.aclose()
        assert got == b"hello from s_client\n"
        # The server side of OpenSSL omits the leaf from the peer chain; TlsStream puts it back.
        # (Read after the close: from OpenSSL's copy, which lasts as long as the stream.)
        assert subjects(info.chain) == ["CN=a.example", "CN=Test Intermediate CA"]
        assert info.chain[0] == pki["a"].issued.cert
        assert info.chain_der and len(info.chain_der) == 2
        assert list(info.chain_der) == [c.public_bytes(serialization.Encoding.DER) for c in info.chain]
        assert (info.version, info.protocol, info.alpn, info.server_name) == ("1.3", "TLSv1.3", "xmpp-server", "b.example")
        assert re.search(rb"Peer certificate: CN\s*=\s*b\.example", client.output)

    trio.run(main)


def test_server_side_client_certificate_is_optional(pki):
    async def main():
        certs = ServerCertificates({"b.example": (pki["b"].cert, pki["b"].key)})
        async with one_listener() as (listener, port):
            async with OpenSSLProcess.run("s_client", "-connect", f"127.0.0.1:{port}", "-brief", "-tls1_2"):
                with trio.fail_after(TIMEOUT):
                    tls = TlsStream(await listener.accept(), certs.context_for(None), server_side=True)
                    await tls.do_handshake()
                    assert tls.peer_chain() == []
                    info = tls.info()
                    assert not info.chain_der and list(info.chain_der) == [] and info.chain == ()
                    assert tls.version == "1.2" and tls.alpn is None and tls.server_name is None
                    await tls.aclose()

    trio.run(main)


def test_server_side_accepts_any_client_chain_the_policy_decides(pki):
    """A self-signed client certificate (as DANE-EE peers use) must not fail the handshake."""
    async def main():
        certs = ServerCertificates({"b.example": (pki["b"].cert, pki["b"].key)})
        async with one_listener() as (listener, port):
            async with OpenSSLProcess.run("s_client", "-connect", f"127.0.0.1:{port}", "-brief",
                                          *client_cert_args(pki["selfsigned"])):
                with trio.fail_after(TIMEOUT):
                    tls = TlsStream(await listener.accept(), certs.context_for(None), server_side=True)
                    await tls.do_handshake()
                    assert tls.peer_chain() == [pki["selfsigned"].issued.cert]
                    await tls.aclose()

    trio.run(main)


@pytest.mark.parametrize("sni,expected", [("c.example", "c.example"), ("b.example", "b.example"),
                                          ("unknown.example", "b.example"), (None, "b.example")])
def test_sni_selects_the_certificate(pki, sni, expected):
    async def main():
        certs = ServerCertificates({"b.example": (pki["b"].cert, pki["b"].key),
                                    "c.example": (pki["c"].cert, pki["c"].key)})
        args = ["-servername", sni] if sni else ["-noservername"]
        async with one_listener() as (listener, port):
            async with OpenSSLProcess.run("s_client", "-connect", f"127.0.0.1:{port}", "-brief", *args) as client:
                with trio.fail_after(TIMEOUT):
                    # Start with the default (first) domain, as for Direct TLS.
                    tls = TlsStream(await listener.accept(), certs.context_for(None), server_side=True)
                    await tls.do_handshake()
                    await client.wait_for(rb"Peer certificate: CN\s*=\s*" + re.escape(expected.encode()) + rb"\b")
                    await tls.aclose()

    trio.run(main)


def test_tls_1_1_is_refused(pki):
    async def main():
        certs = ServerCertificates({"b.example": (pki["b"].cert, pki["b"].key)})
        async with one_listener() as (listener, port):
            async with OpenSSLProcess.run("s_client", "-connect", f"127.0.0.1:{port}", "-brief",
                                          "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0") as client:
                with trio.fail_after(TIMEOUT):
                    tls = TlsStream(await listener.accept(), certs.context_for(None), server_side=True)
                    with pytest.raises(TlsError) as err:
                        await tls.do_handshake()
                    await tls.aclose()
                    assert await client.exit_code() != 0
        assert "unsupported protocol" in str(err.value)
        # OpenSSL sent a protocol_version alert, which s_client reports.
        assert re.search(rb"alert protocol version|unsupported protocol|no protocols available", client.output), client.output

    trio.run(main)


@pytest.mark.parametrize("garbage,reason,alert", [
    # An HTTP request: OpenSSL recognises it and fails without an alert.
    (b"GET / HTTP/1.1\r\nHost: b.example\r\n\r\n", "http request", False),
    # Claims to be a TLS handshake record, but the ClientHello inside is truncated nonsense.
    (b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00", "", True),
    # Not TLS at all.
    (b"\x00" * 64, "", False),
])
def test_garbage_instead_of_client_hello_fails_with_a_reason(pki, garbage, reason, alert):
    async def main():
        a, b = trio.testing.memory_stream_pair()
        tls = TlsStream(a, server_context(pki["b"].cert, pki["b"].key), server_side=True)
        await b.send_all(garbage)
        with trio.fail_after(TIMEOUT):
            with pytest.raises(TlsError) as err:
                await tls.do_handshake()
        assert str(err.value).startswith("TLS handshake failed: ") and reason in str(err.value)
        await tls.aclose()
        sent_back = b""
        with trio.fail_after(TIMEOUT):
            while chunk := await b.receive_some():
                sent_back += chunk
        if alert:
            assert sent_back[:1] == b"\x15", sent_back  # a TLS alert record told the peer why
        with pytest.raises(trio.ClosedResourceError):
            await tls.send_all(b"x")

    trio.run(main)


def test_prefix_bytes_read_before_tls_are_used(pki):
    """Direct TLS detection reads the first bytes of the ClientHello; they are fed in first."""
    async def main():
        certs = ServerCertificates({"b.example": (pki["b"].cert, pki["b"].key)})
        async with one_listener() as (listener, port):
            async with OpenSSLProcess.run("s_client", "-connect", f"127.0.0.1:{port}", "-brief",
                                          "-servername", "b.example", "-alpn", "xmpp-server") as client:
                with trio.fail_after(TIMEOUT):
                    transport = await listener.accept()
                    first = await transport.receive_some(1)
                    assert first == b"\x16"
                    tls = TlsStream(transport, certs.context_for(None), server_side=True, prefix=first)
                    await tls.do_handshake()
                    assert tls.alpn == "xmpp-server"
                    await tls.send_all(b"direct tls works\n")
                    await client.wait_for(rb"direct tls works")
                    await tls.aclose()

    trio.run(main)


def test_peer_closing_during_handshake_is_reported(pki):
    async def main():
        a, b = trio.testing.memory_stream_pair()
        tls = TlsStream(a, server_context(pki["b"].cert, pki["b"].key), server_side=True, prefix=b"\x16\x03\x01")
        await b.aclose()
        with pytest.raises(TlsError, match="closed the connection during the TLS handshake"):
            with trio.fail_after(TIMEOUT):
                await tls.do_handshake()

    trio.run(main)


# ------------------------------------------------------------------------------ client side vs s_server

def test_client_side_with_s_server_requiring_a_client_certificate(pki):
    async def main():
        b = pki["b"]
        async with OpenSSLProcess.run(
            "s_server", "-accept", "127.0.0.1:0", "-cert", b.leaf, "-key", b.key, "-cert_chain", b.rest,
            "-Verify", "2", "-alpn", "xmpp-server", "-rev", "-naccept", "1",
        ) as server:
            port = int((await server.wait_for(rb"ACCEPT 127\.0\.0\.1:(\d+)")).group(1))
            ctx = client_context(cert_file=pki["a"].cert, key_file=pki["a"].key, alpn=[b"xmpp-server"])
            with trio.fail_after(TIMEOUT):
                tls = TlsStream(await trio.open_tcp_stream("127.0.0.1", port), ctx,
                                server_side=False, server_hostname="b.example")
                await tls.do_handshake()
                await tls.send_all(b"stressed\n")
                got = b""
                while b"\n" not in got:
                    got += await tls.receive_some()
                chain = tls.peer_chain()
                await tls.aclose()
                assert await server.exit_code() == 0
        assert got == b"desserts\n"   # s_server -rev answers reversed: it read our data
        assert subjects(chain) == ["CN=b.example", "CN=Test Intermediate CA"]
        assert tls.alpn == "xmpp-server" and tls.server_name == "b.example"
        # s_server received our client certificate (it prints the verify chain it built).
        assert re.search(rb"depth=0 CN\s*=\s*a\.example", server.output), server.output

    trio.run(main)


def test_client_side_refuses_a_tls_1_1_server_when_minimum_is_1_3(pki):
    async def main():
        b = pki["b"]
        async with OpenSSLProcess.run("s_server", "-accept", "127.0.0.1:0", "-cert", b.leaf, "-key", b.key,
                                      "-tls1_2", "-naccept", "1") as server:
            port = int((await server.wait_for(rb"ACCEPT 127\.0\.0\.1:(\d+)")).group(1))
            tls = TlsStream(await trio.open_tcp_stream("127.0.0.1", port), client_context(min_version="1.3"),
                            server_side=False, server_hostname="b.example")
            with pytest.raises(TlsError, match="TLS handshake failed"):
                with trio.fail_after(TIMEOUT):
                    await tls.do_handshake()
            await tls.aclose()

    trio.run(main)


# ------------------------------------------------------------------------------ both sides ours

@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_concurrent_bulk_transfer_both_ways_and_close_notify(pki, version):
    async def main():
        a, b = trio.testing.memory_stream_pair()
        server_ctx = server_context(pki["b"].cert, pki["b"].key)
        client_ctx = client_context(cert_file=pki["a"].cert, key_file=pki["a"].key)
        if version == "1.2":
            from OpenSSL import SSL
            client_ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
        server = TlsStream(a, server_ctx, server_side=True)
        client = TlsStream(b, client_ctx, server_side=False, server_hostname="b.example")
        payload_up = bytes(range(256)) * 4000       # ~1 MB each way
        payload_down = bytes(reversed(range(256))) * 4000
        received = {}

        async def pump(sender, receiver, payload, key):
            async def send():
                await sender.send_all(payload)

            async def recv():
                buf = bytearray()
                while len(buf) < len(payload):
                    buf += await receiver.receive_some()
                received[key] = bytes(buf)

            async with trio.open_nursery() as n:
                n.start_soon(send)
                n.start_soon(recv)

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as n:
                n.start_soon(server.do_handshake)
                n.start_soon(client.do_handshake)
            assert server.version == client.version == version
            async with trio.open_nursery() as n:
                n.start_soon(pump, client, server, payload_up, "up")
                n.start_soon(pump, server, client, payload_down, "down")
            await client.aclose()
            assert await server.receive_some() == b""   # close_notify arrived
        assert received == {"up": payload_up, "down": payload_down}
        assert subjects(server.peer_chain())[0] == "CN=a.example"

    trio.run(main)


def test_a_fresh_incoming_bio_after_large_reads_loses_nothing(pki):
    """Issue 13 (memory per idle stream): once after the handshake, and after each large read
    once OpenSSL has taken all of it, `release_idle` replaces empty memory BIOs; bytes keep
    flowing both ways, byte exact, whether they were replaced or (part of a record still
    waiting) not."""
    from proxy import tls as tls_module

    async def main():
        sa, sb = trio.socket.socketpair()
        server = TlsStream(trio.SocketStream(sa), server_context(pki["b"].cert, pki["b"].key), server_side=True)
        client = TlsStream(trio.SocketStream(sb), client_context(), server_side=False)
        replaced, kept = 0, 0
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as n:
                n.start_soon(server.do_handshake)
                n.start_soon(client.do_handshake)
            # Once after the handshake: both BIOs (the certificate flights' capacity) and the
            # outgoing buffer; then nothing until a large read.
            into, out = server._conn._into_ssl, server._conn._from_ssl
            assert server.release_idle() is True
            assert server._conn._into_ssl != into and server._conn._from_ssl != out
            assert server.release_idle() is False
            await server.send_all(b"after the swap")
            assert await client.receive_some() == b"after the swap"
            for round_ in range(30):
                payload = bytes([round_]) * (40_000 + 997 * round_)
                got = bytearray()
                async with trio.open_nursery() as n:
                    n.start_soon(client.send_all, payload)
                    while len(got) < len(payload):
                        got += await server.receive_some(8192 if round_ % 3 == 0 else None)
                        before = server._conn._into_ssl
                        if server.release_idle():
                            replaced += 1
                            assert server._conn._into_ssl != before
                        else:
                            kept += 1
                assert bytes(got) == payload, round_
                await server.send_all(b"ack %d" % round_)
                assert await client.receive_some() == b"ack %d" % round_
            await client.aclose()
            assert await server.receive_some() == b""      # close_notify still arrives
        assert replaced > 0 and kept > 0, (replaced, kept)

    if tls_module._ffi is None:
        pytest.skip("this pyOpenSSL has no _into_ssl / BIO_get_mem_data")
    trio.run(main)


def test_a_writer_stalled_on_a_slow_peer_does_not_block_the_reader(pki):
    """Relaying both ways at once: our send to a peer that does not read must not stop us
    from reading what that peer sends (or both sides could stall)."""
    async def main():
        sa, sb = trio.socket.socketpair()
        server = TlsStream(trio.SocketStream(sa), server_context(pki["b"].cert, pki["b"].key), server_side=True)
        client = TlsStream(trio.SocketStream(sb), client_context(), server_side=False)
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as n:
                n.start_soon(server.do_handshake)
                n.start_soon(client.do_handshake)
            async with trio.open_nursery() as n:
                n.start_soon(server.send_all, b"x" * 20_000_000)     # the client never reads this
                await trio.testing.wait_all_tasks_blocked()
                for i in range(100):
                    await client.send_all(b"ping %d\n" % i)
                    assert await server.receive_some() == b"ping %d\n" % i
                n.cancel_scope.cancel()

    trio.run(main)


def test_eof_without_close_notify_reads_as_eof(pki):
    async def main():
        a, b = trio.testing.memory_stream_pair()
        server = TlsStream(a, server_context(pki["b"].cert, pki["b"].key), server_side=True)
        client = TlsStream(b, client_context(), server_side=False)
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as n:
                n.start_soon(server.do_handshake)
                n.start_soon(client.do_handshake)
            await client.send_all(b"last words")
            await b.aclose()      # the transport goes away, no close_notify
            data = b""
            while True:
                chunk = await server.receive_some()
                if not chunk:
                    break
                data += chunk
        assert data == b"last words"

    trio.run(main)


def test_concurrent_senders_are_refused(pki):
    async def main():
        sa, sb = trio.socket.socketpair()
        server = TlsStream(trio.SocketStream(sa), server_context(pki["b"].cert, pki["b"].key), server_side=True)
        client = TlsStream(trio.SocketStream(sb), client_context(), server_side=False)
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as n:
                n.start_soon(server.do_handshake)
                n.start_soon(client.do_handshake)
            async with trio.open_nursery() as n:
                n.start_soon(client.send_all, b"x" * 20_000_000)   # blocks: nobody reads
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError):
                    await client.send_all(b"y")
                n.cancel_scope.cancel()

    trio.run(main)


async def _socket_pair_streams(pki):
    sa, sb = trio.socket.socketpair()
    server = TlsStream(trio.SocketStream(sa), server_context(pki["b"].cert, pki["b"].key), server_side=True)
    client = TlsStream(trio.SocketStream(sb), client_context(), server_side=False)
    async with trio.open_nursery() as n:
        n.start_soon(server.do_handshake)
        n.start_soon(client.do_handshake)
    return server, client


def _records(client: TlsStream, count: int, *, corrupt_last: bool = False) -> tuple[bytes, bytes]:
    """`count` TLS records of 100 bytes each, as a peer writing one record per stanza sends
    them: (their plaintext, their ciphertext, the last record's tag flipped if asked)."""
    plain = b"".join(b"%03d" % i + b"r" * 97 for i in range(count))
    for i in range(count):
        assert client._conn.send(plain[i * 100:(i + 1) * 100]) == 100
    cipher = bytearray()
    while True:
        try:
            cipher += client._conn.bio_read(1 << 20)
        except Exception:
            break
    if corrupt_last:
        cipher[-1] ^= 0x01
    return plain, bytes(cipher)


async def _records_then_close_notify(pki, count: int) -> tuple[TlsStream, TlsStream, bytes]:
    """A connected pair whose client has sent `count` records, then its close_notify, all
    before the server reads: (server, client, the records' plaintext)."""
    server, client = await _socket_pair_streams(pki)
    plain, cipher = _records(client, count)
    await client.transport.send_all(cipher)
    await client.aclose()
    return server, client, plain


def _choose_read_path(monkeypatch, direct: bool) -> None:
    """TlsStream reads records straight through SSL_read (direct) or through pyOpenSSL's
    recv (what it falls back to without pyOpenSSL's bindings)."""
    from proxy import tls as tls_module
    if not direct:
        monkeypatch.setattr(tls_module, "_ffi", None)
    elif tls_module._ffi is None:
        pytest.skip("this pyOpenSSL exposes no SSL_read")


@pytest.mark.parametrize("direct", [True, False], ids=["SSL_read-loop", "pyOpenSSL-recv"])
def test_many_records_in_one_read_then_close_notify(pki, monkeypatch, direct):
    """One socket read holding 300 records comes out whole and in order, then EOF; the
    direct SSL_read loop (issue 13) and pyOpenSSL's recv give the same bytes."""
    _choose_read_path(monkeypatch, direct)

    async def main():
        with trio.fail_after(TIMEOUT):
            server, _client, plain = await _records_then_close_notify(pki, 300)
            got = bytearray()
            while chunk := await server.receive_some():
                got += chunk
        assert bytes(got) == plain

    trio.run(main)


def test_a_stream_read_to_its_close_notify_is_freed_without_the_cyclic_gc(pki):
    """Records and the close_notify after them in one read: the close is met while decrypting
    the records and raised by the next read.  Holding that exception in a local of the frame
    its traceback holds was a reference cycle, which kept every such stream (its OpenSSL
    objects, its socket) until the cyclic GC ran (issue 13)."""
    import gc

    def streams() -> int:
        return sum(isinstance(o, TlsStream) for o in gc.get_objects())

    async def main():
        with trio.fail_after(TIMEOUT):
            server, client, plain = await _records_then_close_notify(pki, 5)
            assert await server.receive_some() == plain     # the records, then ...
            assert server._read_error is not None            # ... the close, met in the same read
            assert await server.receive_some() == b""
            assert streams() == 2
            del server, client
            return streams()

    gc.collect()
    gc.disable()
    try:
        assert trio.run(main) == 0
    finally:
        gc.enable()


@pytest.mark.parametrize("direct", [True, False], ids=["SSL_read-loop", "pyOpenSSL-recv"])
def test_records_before_a_forged_one_arrive_and_the_forgery_fails_the_stream(pki, monkeypatch, direct):
    """A record that fails its MAC: every byte before it is delivered, nothing of it or after
    it, and the next read fails naming OpenSSL's reason, both ways of reading."""
    _choose_read_path(monkeypatch, direct)

    async def main():
        with trio.fail_after(TIMEOUT):
            server, client = await _socket_pair_streams(pki)
            plain, cipher = _records(client, 60, corrupt_last=True)
            await client.transport.send_all(cipher)
            got = bytearray()
            with pytest.raises(TlsError, match="(?i)TLS read failed: .*(bad record mac|decrypt)"):
                while True:
                    got += await server.receive_some()
        assert bytes(got) == plain[:-100]

    trio.run(main)


def test_streams_in_two_threads_read_at_once_lose_nothing(pki):
    """Several trio loops in one process (the tests' proxy and their clients, an embedder):
    each thread's reads decrypt into a buffer of its own.  One shared buffer, written by two
    SSL_reads at once (cffi releases the GIL), mixed the streams' bytes."""
    import threading

    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def one_loop(index: int) -> None:
        async def main():
            with trio.fail_after(TIMEOUT * 2):
                server, client = await _socket_pair_streams(pki)
                plain = bytearray()
                for round_ in range(40):
                    chunk, cipher = _records(client, 200)
                    plain += chunk
                    await client.transport.send_all(cipher)
                    got = bytearray()
                    while len(got) < len(chunk):
                        got += await server.receive_some()
                    results.setdefault(index, b"")
                    results[index] += bytes(got)
                return bytes(plain)
        try:
            expected = trio.run(main)
            assert results[index] == expected, f"thread {index}: bytes differ"
        except BaseException as exc:   # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=one_loop, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 3)
    assert not errors, errors
    assert sorted(results) == [0, 1, 2]


def test_a_tls_read_yields_once_even_with_data_waiting_and_says_when_it_waits(pki):
    """Fairness (proxy.eager_io): with bytes already there, a read still lets other tasks run
    (once); `before_wait` runs only when the read has nothing and must wait (an idle stream),
    and that wait is then its one yield (two or three were scheduler passes for nothing,
    several per stream set-up: issue 13)."""
    async def main():
        with trio.fail_after(TIMEOUT):
            server, client = await _socket_pair_streams(pki)
            waits = []
            server.before_wait = lambda: waits.append(1)
            await client.send_all(b"first")
            await trio.testing.wait_all_tasks_blocked()
            assert await count_yields(server.receive_some) == (b"first", 1)
            assert waits == []
            await client.send_all(b"twice")
            await client.send_all(b"more")
            await trio.testing.wait_all_tasks_blocked()
            assert await count_yields(lambda: server.receive_some(5)) == (b"twice", 1)
            assert await count_yields(server.receive_some) == (b"more", 1)   # from OpenSSL's buffer
            result = []
            async with trio.open_nursery() as n:
                n.start_soon(lambda: collect_into(result, count_yields(server.receive_some)))
                await trio.testing.wait_all_tasks_blocked()
                assert waits == [1]
                await client.send_all(b"second")
            assert result == [(b"second", 1)]

    trio.run(main)


# ------------------------------------------------------------------------------ configuration errors

def test_configuration_errors_name_the_file(pki, tmp_path):
    with pytest.raises(TlsConfigError, match="does not match"):
        server_context(pki["b"].cert, pki["a"].key)
    missing = tmp_path / "missing.pem"
    with pytest.raises(TlsConfigError, match="missing.pem"):
        server_context(missing, pki["b"].key)
    with pytest.raises(TlsConfigError, match="no \\[\\[domain\\]\\]"):
        ServerCertificates({})
    with pytest.raises(ValueError):
        client_context(min_version="1.1")
