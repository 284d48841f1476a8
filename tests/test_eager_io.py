"""proxy/eager_io.py: socket reads, sends and lock acquisitions that skip trio's scheduler
pass when they complete at once, over real kernel sockets (socketpairs).

What must hold: bytes arrive exactly; a read waits only when nothing is there, and says so
first (`before_wait`, where an idle stream gives back its parser); cancellation still stops
the caller and loses no byte; errors read as trio's SocketStream reports them; and the TLS
stream built on them still yields once per read, so one busy peer cannot starve the others.
"""
from __future__ import annotations

import errno
import socket
import struct

import pytest
import trio
import trio.testing

from proxy import eager_io

TIMEOUT = 10.0


def socketpair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    return a, b


def test_a_read_with_data_there_does_not_wait_or_call_before_wait():
    async def main():
        ours, theirs = socketpair()
        theirs.sendall(b"already here")
        called = []
        with trio.fail_after(TIMEOUT):
            assert await eager_io.receive_some(ours, 100, lambda: called.append(1)) == b"already here"
        assert called == []

    trio.run(main)


def test_a_read_that_must_wait_calls_before_wait_once_then_returns_what_arrives():
    async def main():
        ours, theirs = socketpair()
        called = []
        got = []

        async def reader():
            got.append(await eager_io.receive_some(ours, 100, lambda: called.append(len(got))))

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                assert called == [0]          # before it waited, with nothing read yet
                theirs.sendall(b"later")
        assert got == [b"later"] and called == [0]

    trio.run(main)


def test_end_of_stream_reads_as_empty_bytes():
    async def main():
        ours, theirs = socketpair()
        theirs.sendall(b"last words")
        theirs.close()
        with trio.fail_after(TIMEOUT):
            assert await eager_io.receive_some(ours, 100) == b"last words"
            assert await eager_io.receive_some(ours, 100) == b""

    trio.run(main)


def test_a_reset_connection_is_broken_and_a_closed_socket_is_closed():
    async def main():
        ours, theirs = socketpair()
        tcp_listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(tcp_listener.getsockname())
        server, _ = tcp_listener.accept()
        server.setblocking(False)
        # SO_LINGER 0: close sends RST, so the next read fails with ECONNRESET.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        with trio.fail_after(TIMEOUT):
            with pytest.raises(trio.BrokenResourceError, match="socket connection broken"):
                while await eager_io.receive_some(server, 100):
                    pass
            ours.close()
            with pytest.raises(trio.ClosedResourceError):
                await eager_io.receive_some(ours, 100)
            with pytest.raises(trio.ClosedResourceError):
                await eager_io.send_all(ours, b"x")
        server.close()
        theirs.close()
        tcp_listener.close()

    trio.run(main)


def test_send_all_waits_for_a_slow_reader_and_delivers_every_byte():
    async def main():
        ours, theirs = socketpair()
        theirs.setblocking(False)
        payload = bytes(range(256)) * 40_000           # ~10 MB: far more than the socket buffers
        got = bytearray()

        async def slow_reader():
            while len(got) < len(payload):
                await trio.sleep(0)
                got.extend(await eager_io.receive_some(theirs, 7_777))

        with trio.fail_after(TIMEOUT * 3):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow_reader)
                await eager_io.send_all(ours, payload)
        assert bytes(got) == payload

    trio.run(main)


def test_a_cancelled_read_raises_and_leaves_the_bytes_for_the_next_one():
    async def main():
        ours, theirs = socketpair()
        theirs.sendall(b"kept")
        with trio.CancelScope() as scope:
            scope.cancel()
            await eager_io.receive_some(ours, 100)
            pytest.fail("a cancelled read returned")     # pragma: no cover
        assert scope.cancelled_caught
        with trio.CancelScope() as scope:
            scope.cancel()
            await eager_io.send_all(ours, b"never sent")
        assert scope.cancelled_caught
        theirs.setblocking(False)
        with pytest.raises(BlockingIOError):
            theirs.recv(100)                                # the cancelled send sent nothing
        with trio.fail_after(TIMEOUT):
            assert await eager_io.receive_some(ours, 100) == b"kept"

    trio.run(main)


def test_lock_is_taken_without_a_yield_when_free_and_handed_to_waiters_in_order():
    async def main():
        lock = eager_io.Lock()
        order = []

        async def bystander():
            order.append("bystander ran")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(bystander)
            await lock.acquire()                           # free: no yield, the bystander waits
            assert lock.locked() and order == []
        assert order == ["bystander ran"]

        async def waiter(name):
            await lock.acquire()
            order.append(name)
            lock.release()

        order.clear()
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                for name in ("w1", "w2", "w3"):
                    nursery.start_soon(waiter, name)
                    await trio.testing.wait_all_tasks_blocked()
                assert order == []                          # all wait while the lock is held
                order.append("holder")
                lock.release()
                # Handed over, not freed: a task that did not wait cannot take it first.
                assert lock.locked()
                with pytest.raises(trio.TooSlowError), trio.fail_after(0):
                    await lock.acquire()
        assert order == ["holder", "w1", "w2", "w3"]
        assert not lock.locked()
        with pytest.raises(KeyError):
            async with lock:                                # as a context: released on the way out
                assert lock.locked()
                raise KeyError("inside")
        assert not lock.locked()

    trio.run(main)


def test_lock_cancelled_before_or_while_waiting_is_not_taken():
    async def main():
        lock = eager_io.Lock()
        with trio.CancelScope() as scope:
            scope.cancel()
            await lock.acquire()
        assert scope.cancelled_caught and not lock.locked()

        await lock.acquire()
        got, scopes = [], []

        async def gives_up():
            with trio.CancelScope() as waiting:
                scopes.append(waiting)
                await lock.acquire()
                got.append("gave-up waiter")

        async def waits():
            await lock.acquire()
            got.append("waiter")
            lock.release()

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(gives_up)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(waits)
                await trio.testing.wait_all_tasks_blocked()
                scopes[0].cancel()                          # the first waiter leaves the queue
                await trio.testing.wait_all_tasks_blocked()
                lock.release()                              # ... so the second one gets it
        assert got == ["waiter"] and not lock.locked()
        with pytest.raises(RuntimeError):
            lock.release()

    trio.run(main)


def test_stdlib_socket_only_under_a_trio_socket_stream():
    async def main():
        a, b = trio.socket.socketpair()
        stream = trio.SocketStream(a)
        assert isinstance(eager_io.stdlib_socket(stream), socket.socket)
        assert eager_io.stdlib_socket(stream).fileno() == a.fileno()
        left, _right = trio.testing.memory_stream_pair()
        assert eager_io.stdlib_socket(left) is None
        await stream.aclose()
        b.close()

    trio.run(main)


def test_connect_reaches_a_listener_and_says_why_it_cannot():
    async def main():
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        sock = socket.socket()
        sock.setblocking(False)
        with trio.fail_after(TIMEOUT):
            await eager_io.connect(sock, ("127.0.0.1", port))
        accepted, _ = listener.accept()
        assert accepted.getpeername() == sock.getsockname()
        for s in (accepted, sock, listener):
            s.close()
        refused = socket.socket()                        # the port has no listener any more
        refused.setblocking(False)
        with pytest.raises(OSError) as info, trio.fail_after(TIMEOUT):
            await eager_io.connect(refused, ("127.0.0.1", port))
        refused.close()
        assert info.value.errno == errno.ECONNREFUSED and info.value.strerror == "Connection refused"

    trio.run(main)


class Steps(trio.abc.Instrument):
    """Counts the scheduler's resumptions of one task: each is a yield of that task.  (Not
    trio.testing.assert_no_checkpoints: that counts checkpoint_if_cancelled too, which every
    eager call makes without yielding.)"""

    def __init__(self, task):
        self.task, self.count = task, 0

    def before_task_step(self, task):
        self.count += task is self.task


async def count_yields(read) -> tuple[object, int]:
    """`await read()` in this task; what it returned and how often this task yielded."""
    steps = Steps(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(steps)
    try:
        return await read(), steps.count
    finally:
        trio.lowlevel.remove_instrument(steps)


def test_a_fair_read_yields_once_even_when_data_is_there():
    async def main():
        ours, theirs = socketpair()
        theirs.sendall(b"one" * 10)
        steps = Steps(trio.lowlevel.current_task())
        trio.lowlevel.add_instrument(steps)
        assert await eager_io.receive_some(ours, 3) == b"one"              # no yield
        assert steps.count == 0
        assert await eager_io.receive_some(ours, 3, fair=True) == b"one"   # one yield
        assert steps.count == 1
        trio.lowlevel.remove_instrument(steps)
        with trio.CancelScope() as scope:                  # cancelled, it reads nothing
            scope.cancel()
            await eager_io.receive_some(ours, 3, fair=True)
        assert scope.cancelled_caught
        assert await eager_io.receive_some(ours, 100) == b"one" * 8
        ours.close()
        theirs.close()

    trio.run(main)


def test_a_fair_read_that_waited_does_not_yield_again():
    """Its wait was its yield: another after the data came was a scheduler pass for nothing
    (several per stream set-up, issue 13)."""
    async def main():
        ours, theirs = socketpair()
        result = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: collect_into(result, count_yields(lambda: eager_io.receive_some(ours, 100, fair=True))))
            await trio.testing.wait_all_tasks_blocked()
            theirs.sendall(b"two")
        assert result == [(b"two", 1)]
        ours.close()
        theirs.close()

    trio.run(main)


async def collect_into(results: list, awaitable) -> None:
    results.append(await awaitable)
