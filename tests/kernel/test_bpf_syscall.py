"""Map element commands cttrace issues itself, on this machine's own kernel.

Userspace marks a kept entry reported by writing it back to ``ctt_tracked``; the write
must not bring back an entry a program deleted since it was read. Any hash map shows
whether BPF_EXIST does that; creating and updating one needs no kprobes.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator

import pytest

from cttrace.sources.bpf_syscall import (
    BPF_MAP_CREATE,
    BPF_MAP_LOOKUP_ELEM,
    BPF_MAP_UPDATE_ELEM,
    bpf,
    elem_attr,
    update_existing,
)

pytestmark = pytest.mark.kernel

BPF_MAP_TYPE_HASH = 1


@pytest.fixture
def hash_map() -> Iterator[int]:
    """A four-element hash map, 8-byte keys and values, closed after the test."""
    attr = (ctypes.c_uint32 * 8)(BPF_MAP_TYPE_HASH, 8, 8, 4)  # type, key, value, max_entries
    fd = bpf(BPF_MAP_CREATE, attr)
    yield fd
    os.close(fd)


def lookup(fd: int, key: int) -> int | None:
    out = ctypes.c_uint64()
    try:
        bpf(BPF_MAP_LOOKUP_ELEM, elem_attr(fd, ctypes.c_uint64(key), out))
    except FileNotFoundError:
        return None
    return out.value


def test_a_write_back_replaces_an_element_the_map_holds(hash_map: int) -> None:
    bpf(BPF_MAP_UPDATE_ELEM, elem_attr(hash_map, ctypes.c_uint64(7), ctypes.c_uint64(1)))
    assert update_existing(hash_map, ctypes.c_uint64(7), ctypes.c_uint64(2)) is True
    assert lookup(hash_map, 7) == 2


def test_a_write_back_of_a_deleted_element_does_not_bring_it_back(hash_map: int) -> None:
    assert update_existing(hash_map, ctypes.c_uint64(7), ctypes.c_uint64(2)) is False
    assert lookup(hash_map, 7) is None


def test_a_failure_other_than_absence_is_raised() -> None:
    with pytest.raises(OSError):
        update_existing(-1, ctypes.c_uint64(7), ctypes.c_uint64(2))  # EBADF
