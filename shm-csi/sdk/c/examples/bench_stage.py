"""The Python stage of `bench` (examples/bench.rs): the chain's last
function, which reads every byte of the payload (zlib.crc32 over the
memoryview, no copy) and writes the checksum over its first 4 bytes.

Usage: python bench_stage.py <pool file>; prints its port, then serves."""

import socket
import sys
import zlib

import spright

pool = spright.Pool(sys.argv[1])
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(16)
print(listener.getsockname()[1], flush=True)


def checksum(buf: spright.Buf) -> spright.Buf:
    view = memoryview(buf)
    view[:4] = zlib.crc32(view).to_bytes(4, "little")
    return buf


spright.stage(pool, listener, None, checksum)
