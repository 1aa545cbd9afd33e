import os
import pathlib

import pytest

import spright

# A pool file of 64 MiB: sixteen 4 MiB chunks (the 8 KiB header aside).
SIZE = 8192 + 16 * (4 << 20)


@pytest.fixture
def pool(tmp_path: pathlib.Path) -> spright.Pool:
    return spright.Pool(tmp_path / "spright-pool", SIZE)


@pytest.fixture
def pool_path(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "spright-pool"
    spright.Pool(path, SIZE)
    return path


def all_free(pool: spright.Pool) -> bool:
    return pool.stats().all_free()


__all__ = ["SIZE", "all_free", "os"]
