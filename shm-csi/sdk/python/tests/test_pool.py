import pathlib
import struct

import pytest

import spright
from conftest import SIZE, all_free


def test_write_in_place_send_take(pool: spright.Pool) -> None:
    b = pool.alloc(100)
    assert (len(b), b.capacity, b.owned) == (100, 256, True)
    mv = memoryview(b)
    assert not mv.readonly and mv.nbytes == 100
    mv[:] = b"x" * 100
    mv.release()
    d = b.into_descriptor()
    assert not b.owned and len(b) == 0
    assert d == spright.Descriptor.from_bytes(d.to_bytes())
    assert len(d.to_bytes()) == spright.Descriptor.WIRE_SIZE == 16

    # Another mapping of the same file (as another process would have).
    other = spright.Pool(pool.path)
    got = other.take(d)
    assert bytes(got) == b"x" * 100
    got.release()
    assert all_free(pool)


def test_views_are_zero_copy(pool: spright.Pool) -> None:
    b = pool.alloc(8)
    one, two = memoryview(b), memoryview(b)
    one[0:4] = b"abcd"
    assert bytes(two[0:4]) == b"abcd", "both views see the same memory"
    one.release()
    two.release()
    b.release()


def test_a_live_view_pins_the_buffer(pool: spright.Pool) -> None:
    b = pool.alloc(10)
    mv = memoryview(b)
    with pytest.raises(BufferError):
        b.into_descriptor()
    with pytest.raises(BufferError):
        b.release()
    with pytest.raises(BufferError):
        b.set_len(5)
    mv.release()
    b.set_len(60)
    assert len(b) == 60 and b.capacity == 64
    with pytest.raises(ValueError, match="capacity 64"):
        b.set_len(65)
    b.release()
    with pytest.raises(ValueError, match="sent or released"):
        memoryview(b)
    with pytest.raises(ValueError, match="sent or released"):
        b.into_descriptor()
    assert all_free(pool)


def test_with_and_garbage_collection_free_buffers(pool: spright.Pool) -> None:
    with pool.alloc(5) as b:
        memoryview(b)[:] = b"hello"
    assert not b.owned
    pool.alloc(1000)  # dropped at once
    assert all_free(pool)


def test_descriptor_errors(pool: spright.Pool) -> None:
    d = pool.alloc(64).into_descriptor()
    D = spright.Descriptor
    with pytest.raises(spright.InvalidDescriptor, match="outside"):
        pool.take(D(1 << 40, d.len, d.generation))
    with pytest.raises(spright.InvalidDescriptor, match="not the start"):
        pool.take(D(d.offset + 8, d.len, d.generation))
    with pytest.raises(spright.InvalidDescriptor, match="exceeds"):
        pool.take(D(d.offset, 65, d.generation))
    with pytest.raises(spright.StaleDescriptor, match="stale"):
        pool.take(D(d.offset, d.len, d.generation + 3))
    b = pool.take(d)
    with pytest.raises(spright.AlreadyTaken):
        pool.take(d)
    b.release()
    with pytest.raises(spright.StaleDescriptor):
        pool.take(d)
    with pytest.raises(ValueError, match="16 bytes"):
        D.from_bytes(b"short")
    assert issubclass(spright.StaleDescriptor, spright.Error)
    assert all_free(pool)


def test_size_errors(tmp_path: pathlib.Path) -> None:
    one_chunk = spright.Pool(tmp_path / "one", 8192 + (4 << 20))
    with pytest.raises(spright.TooLarge):
        one_chunk.alloc(spright.MAX_PAYLOAD + 1)
    held = [one_chunk.alloc(spright.MAX_PAYLOAD) for _ in range(3)]
    with pytest.raises(spright.OutOfMemory):
        one_chunk.alloc(spright.MAX_PAYLOAD)
    del held
    one_chunk.alloc(spright.MAX_PAYLOAD).release()
    with pytest.raises(spright.TooLarge, match="too small"):
        spright.Pool(tmp_path / "tiny", 4096)


def test_foreign_files_and_versions(tmp_path: pathlib.Path, pool_path: pathlib.Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a pool")
    with pytest.raises(spright.NotAPool):
        spright.Pool(junk)
    with pytest.raises(FileNotFoundError):
        spright.Pool(tmp_path / "no" / "such" / "pool", SIZE)

    other = spright.POOL_VERSION + 6
    with open(pool_path, "r+b") as f:
        f.seek(8)
        f.write(struct.pack("<I", other))
    with pytest.raises(spright.VersionMismatch) as e:
        spright.Pool(pool_path)
    assert f"version {other}," in str(e.value)
    assert f"reads version {spright.POOL_VERSION}" in str(e.value)
    assert spright.pool_version() == spright.POOL_VERSION


def test_the_readme_example_compiles() -> None:
    example = pathlib.Path(__file__).parent.parent / "examples" / "shout.py"
    compile(example.read_text(), str(example), "exec")
