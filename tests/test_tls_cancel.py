"""A cancelled `TlsStream.send_all` never corrupts the stream (proxy/tls.py, issue 15 item 2).

The peer is the standard library's `ssl` module (OpenSSL, in a thread, on a real socket): it
checks every record's MAC, so one lost or duplicated ciphertext byte shows up as an SSLError.
A trio Instrument cancels the sending task after its N-th scheduling step, for N = 0, 1, 2 ...
until a send completes uncancelled, so every point where send_all can wait (handshake, the
lock, each `socket.send`, each wait for the socket to become writable) is hit.  The sender's
socket buffer is small and the peer reads slowly, so a 256 KiB send waits many times.
"""
from __future__ import annotations

import socket
import ssl
import threading
import time

import trio
import trio.testing
from OpenSSL import SSL

from proxy.tls import TlsStream, client_context, server_context
from test_tls import pki  # noqa: F401  (fixture)

TIMEOUT = 30.0
MESSAGE = 256 * 1024          # four of TlsStream's 64 KiB plaintext chunks
CHUNK = 16384                 # one TLS record: a cancelled send delivers the records OpenSSL made


class CancelAfterSteps(trio.abc.Instrument):
    """Cancel `scope` once `task` has been scheduled `steps` times (0 = before it runs)."""

    def __init__(self, task: trio.lowlevel.Task, steps: int, scope: trio.CancelScope) -> None:
        self.task, self.steps, self.scope, self.seen = task, steps, scope, 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            if self.seen >= self.steps:
                self.scope.cancel()
            self.seen += 1


def _reader(sock: socket.socket, result: dict) -> None:
    """The peer: a blocking stdlib TLS client that reads slowly until close_notify.  (The
    certificate does not matter here; every record's integrity does.)"""
    received = bytearray()
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # suppress_ragged_eofs=False: an EOF without close_notify raises instead of reading as EOF.
        with ctx.wrap_socket(sock, server_hostname="b.example", suppress_ragged_eofs=False) as tls:
            while True:
                # Slow on purpose: the sender must wait for room many times per message (the
                # await points this test cancels at), even though a send that the kernel
                # takes at once no longer yields (proxy.eager_io).
                time.sleep(0.0002)
                data = tls.recv(4096)
                if not data:               # close_notify
                    result["close_notify"] = True
                    break
                received += data
    except Exception as exc:               # a bad record MAC lands here
        result["error"] = repr(exc)
    result["received"] = bytes(received)


def _runs(data: bytes) -> list[tuple[int, int]]:
    """Run-length encoding: [(byte, count), ...]."""
    out: list[tuple[int, int]] = []
    for value in data:
        if out and out[-1][0] == value:
            out[-1] = (value, out[-1][1] + 1)
        else:
            out.append((value, 1))
    return out


def test_send_cancelled_at_every_await_point_keeps_the_stream_valid(pki):  # noqa: F811
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    result: dict = {}
    reader = threading.Thread(target=_reader, args=(theirs, result), daemon=True)
    reader.start()
    sent: list[tuple[int, bool]] = []       # (message byte, completed?)

    async def main():
        ours.setblocking(False)
        stream = TlsStream(trio.SocketStream(trio.socket.from_stdlib_socket(ours)),
                           server_context(pki["b"].cert, pki["b"].key), server_side=True)
        me = trio.lowlevel.current_task()
        steps = 0
        with trio.fail_after(TIMEOUT):
            while True:
                value = 1 + steps % 250
                with trio.CancelScope() as scope:
                    instrument = CancelAfterSteps(me, steps, scope)
                    trio.lowlevel.add_instrument(instrument)
                    try:
                        await stream.send_all(bytes([value]) * MESSAGE)
                    finally:
                        trio.lowlevel.remove_instrument(instrument)
                sent.append((value, not scope.cancelled_caught))
                if not scope.cancelled_caught:
                    break
                steps += 1
            # The stream still works after all those cancellations, and closes cleanly.
            await stream.send_all(b"\x00" * 10)
            await stream.aclose()
        return steps

    steps = trio.run(main)
    reader.join(TIMEOUT)
    assert "error" not in result, result.get("error")
    assert result.get("close_notify"), "the peer did not receive close_notify"
    assert steps > 10, f"only {steps} await points were exercised"
    # What arrived is, in order, every message whole (a cancelled send_all had encrypted all
    # it was given, and the rest of its records went out with the next send; or, cancelled
    # during the handshake, it sent nothing), then the last bytes: nothing lost in the
    # middle, nothing cut off, nothing duplicated.
    runs = _runs(result["received"])
    assert runs[-1] == (0, 10)
    runs = runs[:-1]
    expected = iter(sent)
    for value, count in runs:
        for want, completed in expected:
            if want == value:
                break
            # Only a send cancelled before it encrypted anything (during the handshake) may
            # have sent nothing at all.
            assert not completed, f"message {want} completed but never arrived"
        else:
            raise AssertionError(f"bytes {value} arrived out of order")
        assert count == MESSAGE, (value, count)
    assert sent[-1][1] and runs[-1] == (sent[-1][0], MESSAGE)
    # Cancelled after the handshake (all but the first few), every message still arrived.
    assert len(runs) >= len(sent) - 5 and len(runs) > 10, (len(runs), len(sent))


def test_send_cancelled_on_a_stream_transport_breaks_it_without_corrupting(pki):  # noqa: F811
    """Over a transport other than a socket, trio's send_all may have sent part of its data
    when cancelled: the TlsStream is then unusable (raises), but every byte that did go out
    decrypts at the peer."""

    async def main():
        outcomes = []
        for steps in range(12):
            ours, theirs = trio.testing.memory_stream_pair()
            peer = SSL.Connection(client_context(), None)
            peer.set_connect_state()

            async def peer_side(stream=theirs, conn=peer):
                # The peer: pyOpenSSL over memory BIOs, reading everything as it arrives.
                plain = bytearray()
                while True:
                    try:
                        conn.do_handshake()
                    except SSL.WantReadError:
                        pass
                    try:
                        while out := conn.bio_read(65536):
                            await stream.send_all(out)
                    except SSL.WantReadError:
                        pass
                    data = await stream.receive_some(65536)
                    if not data:
                        return plain
                    conn.bio_write(data)
                    while True:
                        try:
                            plain += conn.recv(65536)
                        except (SSL.WantReadError, SSL.ZeroReturnError):
                            break

            stream = TlsStream(ours, server_context(pki["b"].cert, pki["b"].key), server_side=True)
            result = {}
            async with trio.open_nursery() as nursery:
                async def run_peer():
                    result["plain"] = await peer_side()
                nursery.start_soon(run_peer)
                await stream.do_handshake()
                with trio.CancelScope() as scope:
                    instrument = CancelAfterSteps(trio.lowlevel.current_task(), steps, scope)
                    trio.lowlevel.add_instrument(instrument)
                    try:
                        await stream.send_all(b"x" * MESSAGE)
                    finally:
                        trio.lowlevel.remove_instrument(instrument)
                try:
                    await stream.send_all(b"y" * 100)
                    usable = True
                except trio.BrokenResourceError:
                    usable = False
                await stream.aclose()
            plain = bytes(result["plain"])   # decrypted without any SSL.Error
            if usable:
                assert plain.endswith(b"y" * 100) and set(plain[:-100]) <= {ord("x")}
            else:
                assert set(plain) <= {ord("x")} and len(plain) % CHUNK == 0
            outcomes.append(usable)
        return outcomes

    async def bounded():
        with trio.fail_after(TIMEOUT):
            return await main()

    outcomes = trio.run(bounded)
    assert True in outcomes and False in outcomes, outcomes
