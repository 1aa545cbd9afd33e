import asyncio
import socket

import pytest

import spright
from conftest import all_free


def test_blocking_send_recv(pool: spright.Pool) -> None:
    a, b = socket.socketpair()
    with a, b:
        buf = pool.alloc(5)
        memoryview(buf)[:] = b"hello"
        d = buf.into_descriptor()
        spright.send(a, d)
        got = spright.recv(b)
        assert got == d
        with pool.take(got) as t:
            assert bytes(t) == b"hello"
        a.sendall(b"12345")
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionResetError):
            spright.recv(b)
        assert spright.recv(b) is None
    assert all_free(pool)


def test_asyncio_sockets_and_streams(pool: spright.Pool) -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        with a, b:
            buf = pool.alloc(3)
            memoryview(buf)[:] = b"abc"
            d = buf.into_descriptor()
            await spright.asend(a, d)
            got = await spright.arecv(b)
            assert got == d
            with pool.take(got) as t:
                assert bytes(t) == b"abc"
            a.shutdown(socket.SHUT_WR)
            assert await spright.arecv(b) is None

        # asyncio streams: an echo server that upper-cases in place.
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while (d := await spright.read_descriptor(r)) is not None:
                t = pool.take(d)
                mv = memoryview(t)
                mv[:] = bytes(mv).upper()
                mv.release()
                spright.write_descriptor(w, t.into_descriptor())
                await w.drain()
            w.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        r, w = await asyncio.open_connection("127.0.0.1", port)
        for word in [b"one", b"two", b"three"]:
            buf = pool.alloc(len(word))
            memoryview(buf)[:] = word
            spright.write_descriptor(w, buf.into_descriptor())
        await w.drain()
        for word in [b"ONE", b"TWO", b"THREE"]:
            d = await spright.read_descriptor(r)
            assert d is not None
            with pool.take(d) as t:
                assert bytes(t) == word
        w.close()
        await w.wait_closed()
        server.close()
        await server.wait_closed()

    asyncio.run(main())
    assert all_free(pool)
