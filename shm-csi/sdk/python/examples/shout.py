"""A complete Python function of a spright chain: receives each payload,
upper-cases it in place (in shared memory) and forwards it to $NEXT
(host:port), or answers it when $NEXT is unset (the last function)."""

import os
import socket

import spright

pool = spright.Pool("/var/run/spright-shm")  # the chain's mounted region
listener = socket.create_server(("0.0.0.0", 8080))


def shout(buf: spright.Buf) -> spright.Buf:
    view = memoryview(buf)  # writable, no copy
    view[:] = bytes(view).upper()
    return buf  # or a new buffer: pool.alloc(n)


spright.stage(pool, listener, os.environ.get("NEXT"), shout)
