"""spright: zero-copy hops between chained serverless functions, in Python.

The functions of a chain share one memory region. A function allocates a
:class:`Buf` in the chain's :class:`Pool`, writes the payload in place
through ``memoryview(buf)`` (no copy), and hands the next function a
16-byte :class:`Descriptor` over an ordinary TCP connection (:func:`send`,
:func:`recv`; :func:`asend`, :func:`arecv` under asyncio). The receiver
turns the descriptor back into a ``Buf`` with :meth:`Pool.take`.

:func:`stage` runs a function the way SPRIGHT does: one thread asleep in
epoll until descriptors arrive, your function run to completion on each
payload, the results forwarded to the next function in one write.

The pool, descriptors and stage loop are the Rust SDK's (``spright-shm``):
a Python function can sit anywhere in a chain of Rust, C and Python ones.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Callable, Optional, Union

from ._spright import (
    MAX_PAYLOAD,
    POOL_VERSION,
    AlreadyTaken,
    Buf,
    Descriptor,
    Error,
    InvalidDescriptor,
    NotAPool,
    OutOfMemory,
    Pool,
    StaleDescriptor,
    Stats,
    TooLarge,
    VersionMismatch,
    pool_version,
    stage_fd,
)

__all__ = [
    "MAX_PAYLOAD",
    "POOL_VERSION",
    "AlreadyTaken",
    "Buf",
    "Descriptor",
    "Error",
    "InvalidDescriptor",
    "NotAPool",
    "OutOfMemory",
    "Pool",
    "StaleDescriptor",
    "Stats",
    "TooLarge",
    "VersionMismatch",
    "arecv",
    "asend",
    "pool_version",
    "read_descriptor",
    "recv",
    "send",
    "stage",
    "write_descriptor",
]

_SIZE = Descriptor.WIRE_SIZE


def send(sock: socket.socket, d: Descriptor) -> None:
    """Writes one descriptor (16 bytes) to a blocking socket."""
    sock.sendall(d.to_bytes())


def recv(sock: socket.socket) -> Optional[Descriptor]:
    """Blocks until one descriptor arrives; ``None`` when the peer closed
    the connection cleanly. A socket in spright's sockmap can wake a
    blocking ``recv`` with nothing to read (EAGAIN): that is retried."""
    b = bytearray(_SIZE)
    view = memoryview(b)
    got = 0
    while got < _SIZE:
        try:
            n = sock.recv_into(view[got:])
        except (BlockingIOError, InterruptedError):
            if sock.gettimeout() == 0.0:
                raise
            continue
        if n == 0:
            if got == 0:
                return None
            raise ConnectionResetError("the peer closed the connection mid-descriptor")
        got += n
    return Descriptor.from_bytes(bytes(b))


async def asend(sock: socket.socket, d: Descriptor) -> None:
    """:func:`send` for a non-blocking socket under asyncio."""
    await asyncio.get_running_loop().sock_sendall(sock, d.to_bytes())


async def arecv(sock: socket.socket) -> Optional[Descriptor]:
    """:func:`recv` for a non-blocking socket under asyncio."""
    loop = asyncio.get_running_loop()
    b = bytearray(_SIZE)
    view = memoryview(b)
    got = 0
    while got < _SIZE:
        n = await loop.sock_recv_into(sock, view[got:])
        if n == 0:
            if got == 0:
                return None
            raise ConnectionResetError("the peer closed the connection mid-descriptor")
        got += n
    return Descriptor.from_bytes(bytes(b))


async def read_descriptor(reader: asyncio.StreamReader) -> Optional[Descriptor]:
    """Reads one descriptor from an asyncio stream; ``None`` at a clean end."""
    try:
        return Descriptor.from_bytes(await reader.readexactly(_SIZE))
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise ConnectionResetError("the peer closed the connection mid-descriptor") from e


def write_descriptor(writer: asyncio.StreamWriter, d: Descriptor) -> None:
    """Queues one descriptor on an asyncio stream (``await writer.drain()``)."""
    writer.write(d.to_bytes())


def stage(
    pool: Pool,
    sock: Union[socket.socket, int],
    next: Optional[str],
    fn: Callable[[Buf], Buf],
) -> None:
    """Runs an event-driven stage on the listening TCP socket ``sock``.

    For every descriptor that arrives on its connections, ``fn`` gets the
    payload as a :class:`Buf` and returns the ``Buf`` to forward (the same
    one, changed in place, or a new one of the same pool). The result goes
    to ``next`` (``"host:port"``), whose answer goes back to the sender, or
    straight back to the sender when ``next`` is ``None`` (the chain's last
    stage). The loop runs with the GIL released between payloads.

    It returns only by raising: the exception ``fn`` raised (the payload it
    was given is freed first), or the listener's or epoll's ``OSError``.
    A signal (Ctrl-C) is seen when the next payload arrives.
    """
    fd = sock if isinstance(sock, int) else sock.fileno()
    stage_fd(pool, fd, next, fn)
    raise RuntimeError("the stage loop returned without an error")  # pragma: no cover
