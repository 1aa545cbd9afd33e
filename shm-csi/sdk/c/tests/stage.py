"""A Python stage of the cross-language chain test (tests/cross.rs): inverts
every byte of the payload back and forwards it; raises on a payload that
starts with b"!" (after inverting), holding the buffer and a view of it.

Usage: python stage.py <pool file> <next host:port>; prints its port."""

import socket
import sys

import spright

INVERT = bytes(255 - i for i in range(256))

pool = spright.Pool(sys.argv[1])
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(64)
print(listener.getsockname()[1], flush=True)


def invert(buf: spright.Buf) -> spright.Buf:
    view = memoryview(buf)
    view[:] = bytes(view).translate(INVERT)
    if view[:1] == b"!":
        raise RuntimeError("the Python stage failed mid-message")
    return buf


spright.stage(pool, listener, sys.argv[2], invert)
