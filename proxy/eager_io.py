"""Socket reads, writes, connects and closes, and a lock, that do not yield when they can complete at once.

trio makes every one of these a checkpoint: a `recv` that finds data, a `send` the kernel
takes whole, a `Lock` nobody holds all still yield, and each yield is a full pass of the
scheduler (an `epoll_wait`, the run queue, the task's resumption: several microseconds of
Python).  The relay made six such passes per read of the peer (lock, recv, checkpoint, lock,
send, and the wait itself), about a tenth of its CPU per stanza (issue 13, `bench/`).

These helpers do the operation first and wait only when the kernel says it would block, as
asyncio's selector loop does.  They check for cancellation before acting (no yield unless
cancelled), so a cancelled task still stops at them.  Fairness between streams is kept by
the one checkpoint per read that `TlsStream.receive_some` and trio's own `receive_some` still
make: a peer whose data never stops cannot starve the others.

Errors read as trio's `SocketStream` reports them: `ClosedResourceError` for a socket closed
by us, `BrokenResourceError` (with the OS's words) for a connection that broke.
"""
from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable

import trio


def stdlib_socket(stream: object) -> socket.socket | None:
    """The kernel socket under a `trio.SocketStream`, or None.

    None for any other stream (tests' memory streams, WebSocket adapters) and for a trio
    whose socket wrapper has no `_sock`: callers then use the stream's own methods, which
    behave the same, a scheduler pass slower."""
    if not isinstance(stream, trio.SocketStream):
        return None
    sock = getattr(stream.socket, "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _broken(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    # trio.SocketStream's translation (trio/_highlevel_socket.py): EBADF means we closed it.
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


async def receive_some(sock: socket.socket, max_bytes: int,
                       before_wait: Callable[[], object] | None = None, *, fair: bool = False) -> bytes:
    """Up to `max_bytes` from `sock` (b"" at EOF), waiting only if none are there yet.

    `before_wait` runs each time the read is about to wait: the moment a stream becomes
    idle, when the caller can give back what only a busy stream needs (parser, buffers).
    `fair`: yield at least once, as trio's own receive_some does, so a sender whose data
    never stops cannot starve the other tasks.  A read that waited has yielded already; one
    that found data yields after reading it (shielded: the data is read, it must be
    returned).  Yielding again after a wait was a scheduler pass for nothing: several per
    stream set-up (issue 13)."""
    await trio.lowlevel.checkpoint_if_cancelled()
    waited = False
    while True:
        try:
            data = sock.recv(max_bytes)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise _broken(exc) from exc
        else:
            if fair and not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        if before_wait is not None:
            before_wait()
        await trio.lowlevel.wait_readable(sock)
        waited = True


async def send_some(sock: socket.socket, data: bytes | bytearray | memoryview) -> int:
    """Send a non-empty `data`, as much as the kernel takes (at least one byte); how much."""
    await trio.lowlevel.checkpoint_if_cancelled()
    while True:
        try:
            return sock.send(data)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise _broken(exc) from exc
        await trio.lowlevel.wait_writable(sock)


async def connect(sock: socket.socket, address: tuple) -> None:
    """Connect the non-blocking `sock` to a numeric `address`; OSError (with the OS's words)
    if it fails.  Cancelled while waiting, the socket is in no known state: close it."""
    await trio.lowlevel.checkpoint_if_cancelled()
    err = sock.connect_ex(address)
    if err in (errno.EINPROGRESS, errno.EAGAIN):
        # connect(2): writable once the attempt ended; SO_ERROR says how.
        await trio.lowlevel.wait_writable(sock)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


async def aclose(stream: trio.abc.AsyncResource) -> None:
    """Close `stream`: a `trio.SocketStream` at once (what its `aclose` does, without the
    yield after it: three per stream's end, issue 13), anything else by its own `aclose`."""
    if isinstance(stream, trio.SocketStream):
        stream.socket.close()
    else:
        await stream.aclose()


async def send_all(sock: socket.socket, data: bytes | bytearray | memoryview) -> None:
    """Send all of `data`.  Cancelled part-way, some of it may have gone (trio's contract for
    `send_all` too)."""
    view = memoryview(data)
    if not view:
        await trio.lowlevel.checkpoint_if_cancelled()
        return
    while view:
        view = view[await send_some(sock, view):]


class Lock:
    """A lock between the tasks of one trio run, taken without a yield when it is free.

    `trio.Lock` yields on every acquire, and costs ~0.3 KiB even when nobody ever waits (its
    ParkingLot and that lot's OrderedDict are made up front); a TLS stream has three (issue
    13: CPU per relayed read, memory per idle stream).  This one makes a ParkingLot only
    while tasks wait.  On release the lock passes straight to the longest waiter (FIFO, as
    trio.Lock does), so a task that did not wait cannot take it in between.  No owner is
    tracked: like `threading.Lock`, releasing it from a task that does not hold it is the
    caller's bug."""

    __slots__ = ("_held", "_lot")

    def __init__(self) -> None:
        self._held = False
        self._lot: trio.lowlevel.ParkingLot | None = None

    def locked(self) -> bool:
        return self._held

    async def acquire(self) -> None:
        """Take the lock; wait (FIFO) while another task holds it.  A cancelled task stops
        here without it, whether it had to wait or not."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._held:
            self._held = True
            return
        if self._lot is None:
            self._lot = trio.lowlevel.ParkingLot()
        # Woken only by release(), which leaves the lock held for us; a cancelled wait
        # leaves the lot (ParkingLot's abort) and the lock as it was.
        await self._lot.park()

    def release(self) -> None:
        if not self._held:
            raise RuntimeError("release of a lock that is not held")
        lot = self._lot
        if lot:
            lot.unpark()          # the first waiter holds it now
            if not lot:
                self._lot = None
        else:
            self._held = False
            self._lot = None

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()
