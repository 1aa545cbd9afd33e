"""A stage of the SDK's example chain written in Python: the same function
and the same command line as `spright-shm-chain stage`
(shm-csi/sdk/src/bin/chain.rs), so the demo's chain can put it between Rust
functions (`spright-demo --sdk-langs rust,c,python,...`).

    python chain_stage.py --listen ADDR [--next ADDR] --region DIR [--work ROUNDS]

A complete, minimal function: it receives each payload's descriptor, does
the function's work on the payload where it lies in shared memory (a
writable memoryview of the pool, no copy of the payload into Python
objects) and forwards the descriptor to --next, or answers the sender when
there is no --next (the chain's last stage). The work is exactly
spright_shm::work::apply's: hash the payload ROUNDS times (64-bit FNV-1a,
each round from the last one's value), then ASCII upper-case it in place;
nothing at all with ROUNDS 0. The hash is plain Python, so it runs at
Python's speed: that is the point of a Python stage.
"""

import socket
import sys

import spright

FNV_START = 0xCBF29CE484222325
FNV_PRIME = 0x00000100000001B3
MASK = (1 << 64) - 1


def work(view: memoryview, rounds: int) -> int:
    """spright_shm::work::apply on `view` in place; returns the last hash."""
    h = FNV_START
    if rounds == 0:
        return h
    for _ in range(rounds):
        for b in view:  # the bytes in shared memory, read where they lie
            h = ((h ^ b) * FNV_PRIME) & MASK
    # bytes.upper is ASCII only (Rust's make_ascii_uppercase); the result
    # goes back over the same bytes: the payload stays where it is.
    view[:] = view.tobytes().upper()
    return h


def listen(addr: str) -> socket.socket:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen {addr}: expected HOST:PORT")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, int(port)), family=family, backlog=1024)


USAGE = "usage: chain_stage.py --listen ADDR [--next ADDR] --region DIR [--work ROUNDS]"


def args(argv: list[str]) -> dict:
    """The flags, as `spright-shm-chain stage` reads them; ValueError with
    what is wrong."""
    a = {"--listen": None, "--next": None, "--region": None, "--work": "0"}
    it = iter(argv)
    for flag in it:
        if flag not in a:
            raise ValueError(f"unknown flag {flag}")
        value = next(it, None)
        if value is None:
            raise ValueError(f"{flag} needs a value")
        a[flag] = value
    for flag in ("--listen", "--region"):
        if a[flag] is None:
            raise ValueError(f"{flag} is required")
    w = a["--work"]
    if not (w.isascii() and w.isdigit()) or int(w) > 0xFFFFFFFF:
        raise ValueError(f"--work {w}: not a number of rounds (0 to {0xFFFFFFFF})")
    a["--work"] = int(w)
    return a


def main() -> int:
    try:
        a = args(sys.argv[1:])
    except ValueError as e:
        print(f"{e}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        pool = spright.Pool(a["--region"])
        listener = listen(a["--listen"])
    except (OSError, ValueError, spright.Error) as e:
        print(f"chain_stage.py: {e}", file=sys.stderr)
        return 1
    host, port = listener.getsockname()[:2]
    print(f"listening {f'[{host}]' if ':' in host else host}:{port}", flush=True)
    rounds = a["--work"]

    def stage(buf: spright.Buf) -> spright.Buf:
        with memoryview(buf) as view:
            work(view, rounds)
        return buf

    spright.stage(pool, listener, a["--next"], stage)
    return 1


if __name__ == "__main__":
    sys.exit(main())
