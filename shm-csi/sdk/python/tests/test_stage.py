import pathlib
import socket
import subprocess
import sys
import textwrap
import threading
from typing import Optional

import pytest

import spright
from conftest import all_free


def listen() -> tuple[socket.socket, str]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, "127.0.0.1:%d" % s.getsockname()[1]


class Stop(Exception):
    pass


def run(pool: spright.Pool, sock: socket.socket, nxt: Optional[str], fn, errors: list) -> threading.Thread:
    def target() -> None:
        try:
            spright.stage(pool, sock, nxt, fn)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


def round_trip(pool: spright.Pool, c: socket.socket, data: bytes) -> Optional[bytes]:
    b = pool.alloc(len(data))
    memoryview(b)[:] = data
    spright.send(c, b.into_descriptor())
    d = spright.recv(c)
    if d is None:
        return None
    with pool.take(d) as t:
        return bytes(t)


def upper(b: spright.Buf) -> spright.Buf:
    mv = memoryview(b)
    if mv[:1] == b"!":
        raise Stop("asked to stop")
    mv[:] = bytes(mv).upper()
    return b


def reverse_into_new(pool: spright.Pool):
    def fn(b: spright.Buf) -> spright.Buf:
        data = bytes(b)
        if data[:1] == b"#":
            raise Stop("asked to stop")
        out = pool.alloc(len(data))
        memoryview(out)[:] = data[::-1]
        return out  # the input is freed when its object goes

    return fn


def test_a_chain_of_two_python_stages(pool: spright.Pool) -> None:
    s2, a2 = listen()
    s1, a1 = listen()
    errors: list = []
    t2 = run(pool, s2, None, reverse_into_new(pool), errors)
    t1 = run(pool, s1, a2, upper, errors)
    with socket.create_connection(s1.getsockname()) as c:
        for n in [1, 64, 1000, 65536, 1 << 20]:
            data = bytes(i % 26 + 97 for i in range(n))
            assert round_trip(pool, c, data) == data.upper()[::-1]
        # The last stage raises: the first closes the connections waiting on it.
        assert round_trip(pool, c, b"#stop") is None
    t2.join(5)
    assert not t2.is_alive() and isinstance(errors[0], Stop)
    with socket.create_connection(s1.getsockname()) as c:
        assert round_trip(pool, c, b"!stop") is None
    t1.join(5)
    assert not t1.is_alive() and isinstance(errors[1], Stop)
    assert all_free(pool)
    s1.close()
    s2.close()


def test_a_bad_return_value_stops_the_stage(pool: spright.Pool) -> None:
    s, _ = listen()
    errors: list = []
    t = run(pool, s, None, lambda b: b"not a Buf", errors)
    with socket.create_connection(s.getsockname()) as c:
        assert round_trip(pool, c, b"x") is None
    t.join(5)
    assert isinstance(errors[0], TypeError)
    assert all_free(pool)
    s.close()


def test_a_stage_process_that_raises_leaks_nothing(pool: spright.Pool, tmp_path: pathlib.Path) -> None:
    """The stage raises in the middle of a message, holding the buffer and a
    view of it in its frame: once its process is gone, the pool is empty."""
    script = tmp_path / "stage.py"
    script.write_text(
        textwrap.dedent(
            """
            import socket, sys
            import spright
            pool = spright.Pool(sys.argv[1])
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen()
            print(s.getsockname()[1], flush=True)
            def fn(b):
                view = memoryview(b)
                if view[:1] == b"!":
                    raise RuntimeError("failed mid-message")
                return b
            spright.stage(pool, s, None, fn)
            """
        )
    )
    p = subprocess.Popen(
        [sys.executable, str(script), str(pool.path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert p.stdout is not None
        port = int(p.stdout.readline())
        with socket.create_connection(("127.0.0.1", port)) as c:
            assert round_trip(pool, c, b"fine") == b"fine"
            assert round_trip(pool, c, b"!boom") is None
        _, err = p.communicate(timeout=10)
        assert p.returncode == 1
        assert b"failed mid-message" in err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert all_free(pool), pool.stats()
