"""The bpf(2) system call, for the few commands cttrace issues without BCC.

BCC loads and attaches almost everything. What it cannot do (create a trial
map to probe a feature, load a trampoline program against a module's BTF: see
:mod:`cttrace.sources.trampoline`) goes through here: one ``syscall(__NR_bpf,
cmd, &attr, sizeof(attr))`` with ``attr`` a ctypes structure laid out as the
command's part of ``union bpf_attr`` (include/uapi/linux/bpf.h). The kernel
reads ``sizeof(attr)`` bytes and treats the rest of the union as zero, so each
caller declares only the fields it sets, in the uapi order.
"""

from __future__ import annotations

import ctypes
import os
import platform
from functools import cache

#: enum bpf_cmd (include/uapi/linux/bpf.h).
BPF_MAP_CREATE = 0
BPF_PROG_LOAD = 5
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_BTF_GET_FD_BY_ID = 19
BPF_BTF_GET_NEXT_ID = 23

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
