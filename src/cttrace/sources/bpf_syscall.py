"""The bpf(2) system call, for the few commands cttrace issues without BCC.

BCC loads and attaches almost everything. What it cannot do (create a trial
map to probe a feature, load a trampoline program against a module's BTF: see
:mod:`cttrace.sources.trampoline`, update a map element only if it still exists)
goes through here: one ``syscall(__NR_bpf,
cmd, &attr, sizeof(attr))`` with ``attr`` a ctypes structure laid out as the
command's part of ``union bpf_attr`` (include/uapi/linux/bpf.h). The kernel
reads ``sizeof(attr)`` bytes and treats the rest of the union as zero, so each
caller declares only the fields it sets, in the uapi order.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from functools import cache

#: enum bpf_cmd (include/uapi/linux/bpf.h).
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_PROG_LOAD = 5
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_BTF_GET_FD_BY_ID = 19
BPF_BTF_GET_NEXT_ID = 23

#: BPF_MAP_UPDATE_ELEM's flags: replace the element only if the map holds its key.
BPF_EXIST = 2

#: __NR_bpf per architecture (arch/x86/entry/syscalls/syscall_64.tbl, asm-generic/unistd.h).
_NR_BPF = {"x86_64": 321, "aarch64": 280}


def syscall_number() -> int | None:
    """__NR_bpf on this machine; None on an architecture cttrace does not know."""
    return _NR_BPF.get(platform.machine())


@cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def bpf(cmd: int, attr: ctypes.Structure | ctypes.Array) -> int:  # type: ignore[type-arg]
    """``bpf(cmd, &attr, sizeof(attr))``: its result (an fd for the commands that make
    one), or OSError with the kernel's errno."""
    nr = syscall_number()
    if nr is None:
        raise OSError(0, f"bpf(2)'s number is not known on {platform.machine()}")
    result = _libc().syscall(nr, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


class MapElemAttr(ctypes.Structure):
    """union bpf_attr for BPF_MAP_*_ELEM: map_fd, then key, value and flags (64 bits each,
    the pointers as __aligned_u64)."""

    _fields_ = (
        ("map_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    )


def elem_attr(map_fd: int, key: ctypes._CData, value: ctypes._CData,
              flags: int = 0) -> MapElemAttr:
    """The attr of a BPF_MAP_*_ELEM command on ``key`` and ``value`` (ctypes objects the
    kernel reads from, or writes into)."""
    return MapElemAttr(map_fd=map_fd, key=ctypes.addressof(key),
                       value=ctypes.addressof(value), flags=flags)


def update_existing(map_fd: int, key: ctypes._CData, value: ctypes._CData) -> bool:
    """Replace ``key``'s value in the map if the map still holds ``key`` (BPF_EXIST);
    False when it does not (ENOENT: the kernel deleted it meanwhile), so that a program's
    delete is never undone by a write-back of what was read before it."""
    try:
        bpf(BPF_MAP_UPDATE_ELEM, elem_attr(map_fd, key, value, BPF_EXIST))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True
