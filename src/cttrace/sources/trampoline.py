"""BPF trampolines (fentry, fexit) on functions of a kernel module, which BCC 0.26 cannot attach.

A trampoline program costs less per call than a kprobe, and an fexit program
sees a function's arguments and its return value together, where a kprobe
needs a kretprobe and a map to carry the arguments between the two. The
conntrack hooks (``__nf_conntrack_confirm``, ``nf_conntrack_tcp_packet``,
``nf_ct_delete``) are functions of the nf_conntrack module. The kernel attaches
trampolines to module functions since v5.11 (a tracing program names its
target by a BTF object, the module's, and a type id in it: ``attach_btf_obj_fd``,
``attach_btf_id``), but BCC 0.26 (Debian 12) looks targets up in vmlinux's BTF
only (``libbpf_find_vmlinux_btf_id`` in ``bcc_prog_load_xattr``).

So cttrace does those two steps itself, after BCC has compiled the programs
(their instructions already carry the fds of BCC's maps):

1. the module's BTF (vmlinux's where the module is built in): its type id of the
   function, with libbpf's own BTF parser
   (``btf__load_module_btf``, ``btf__find_by_name_kind``: the libbpf1 package
   BCC depends on), and its BTF object fd, found among the kernel's BTF objects
   by name (``BPF_BTF_GET_NEXT_ID``, ``BPF_BTF_GET_FD_BY_ID``, ``BPF_OBJ_GET_INFO_BY_FD``);
2. ``BPF_PROG_LOAD`` as ``BPF_PROG_TYPE_TRACING`` with the program's instructions
   (BCC's ``dump_func``), then ``BPF_RAW_TRACEPOINT_OPEN`` with no name, which
   attaches a tracing program to its target; closing that fd detaches it.

Any failure is a :class:`~cttrace.errors.SourceError` saying which step failed;
the caller falls back to the kprobes and says why.
"""

from __future__ import annotations

import ctypes
import errno
import os
from functools import cache
from pathlib import Path

from cttrace.errors import SourceError
from cttrace.sources.bpf_syscall import (
    BPF_BTF_GET_FD_BY_ID,
    BPF_BTF_GET_NEXT_ID,
    BPF_OBJ_GET_INFO_BY_FD,
    BPF_PROG_LOAD,
    BPF_RAW_TRACEPOINT_OPEN,
    bpf,
)

#: enum bpf_prog_type / enum bpf_attach_type (include/uapi/linux/bpf.h).
BPF_PROG_TYPE_TRACING = 26
ATTACH_TYPES = {"fentry": 24, "fexit": 25}  # BPF_TRACE_FENTRY, BPF_TRACE_FEXIT
#: BTF_KIND_FUNC (include/uapi/linux/btf.h).
_BTF_KIND_FUNC = 12
_BPF_OBJ_NAME_LEN = 16
_INSN_SIZE = 8
#: The verifier's log when a load fails: its last lines say why.
_LOG_SIZE = 1 << 20
_LIBBPF = "libbpf.so.1"


class _ProgLoadAttr(ctypes.Structure):
    """union bpf_attr, BPF_PROG_LOAD part, up to attach_btf_obj_fd."""

    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * _BPF_OBJ_NAME_LEN),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
        ("prog_btf_fd", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("func_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("line_info_cnt", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("attach_btf_obj_fd", ctypes.c_uint32),
    ]


class _RawTracepointAttr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_uint64), ("prog_fd", ctypes.c_uint32)]


class _IdAttr(ctypes.Structure):
    """BPF_BTF_GET_NEXT_ID (start_id, next_id) and BPF_BTF_GET_FD_BY_ID (btf_id)."""

    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


class _BtfInfo(ctypes.Structure):
    """struct bpf_btf_info."""

    _fields_ = [("btf", ctypes.c_uint64), ("btf_size", ctypes.c_uint32),
                ("id", ctypes.c_uint32), ("name", ctypes.c_uint64),
                ("name_len", ctypes.c_uint32), ("kernel_btf", ctypes.c_uint32)]


@cache
def _libbpf() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(_LIBBPF, use_errno=True)
    except OSError as exc:
        raise SourceError(f"{_LIBBPF} is not installed (apt install libbpf1): {exc}") from exc
    lib.btf__load_vmlinux_btf.restype = ctypes.c_void_p
    lib.btf__load_vmlinux_btf.argtypes = []
    lib.btf__load_module_btf.restype = ctypes.c_void_p
    lib.btf__load_module_btf.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    lib.btf__find_by_name_kind.restype = ctypes.c_int
    lib.btf__find_by_name_kind.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]
    lib.btf__free.restype = None
    lib.btf__free.argtypes = [ctypes.c_void_p]
    return lib


def btf_function_ids(module: str, functions: list[str]) -> tuple[dict[str, int], bool]:
    """The BTF type id of each of ``functions``, and whether they are ``module``'s own
    (its split BTF, ids following vmlinux's) rather than vmlinux's (the module is built in).

    libbpf reads /sys/kernel/btf/vmlinux and /sys/kernel/btf/<module>.
    """
    lib = _libbpf()
    vmlinux = lib.btf__load_vmlinux_btf()
    if not vmlinux:
        raise SourceError(f"libbpf cannot read the kernel's BTF: {os.strerror(ctypes.get_errno())}")
    in_module = Path(f"/sys/kernel/btf/{module}").exists()
    btf = vmlinux
    try:
        if in_module:
            btf = lib.btf__load_module_btf(module.encode(), vmlinux)
            if not btf:
                raise SourceError(f"libbpf cannot read /sys/kernel/btf/{module}: "
                                  f"{os.strerror(ctypes.get_errno())}")
        ids = {}
        for function in functions:
            type_id = lib.btf__find_by_name_kind(btf, function.encode(), _BTF_KIND_FUNC)
            if type_id <= 0:
                where = f"{module}'s BTF" if in_module else "the kernel's BTF"
                raise SourceError(f"{function} is not a function of {where}")
            ids[function] = type_id
        return ids, in_module
    finally:
        if btf and btf != vmlinux:
            lib.btf__free(btf)
        lib.btf__free(vmlinux)


def btf_object_fd(module: str) -> int:
    """An fd of the kernel's BTF object named ``module`` (the caller closes it)."""
    attr = _IdAttr()
    name = ctypes.create_string_buffer(64)
    while True:
        try:
            bpf(BPF_BTF_GET_NEXT_ID, attr)
        except OSError as exc:
            if exc.errno == errno.EPERM:
                # kernel/bpf/syscall.c: bpf_obj_get_next_id() and bpf_btf_get_fd_by_id()
                # are capable(CAP_SYS_ADMIN) only; CAP_BPF does not open BTF objects by id.
                raise SourceError(f"opening {module}'s BTF object needs CAP_SYS_ADMIN "
                                  "(BPF_BTF_GET_NEXT_ID, BPF_BTF_GET_FD_BY_ID)") from exc
            raise SourceError(f"no BTF object named {module} is loaded in the kernel "
                              f"(BPF_BTF_GET_NEXT_ID: {exc.strerror})") from exc
        attr.id = attr.next_id
        try:
            fd = bpf(BPF_BTF_GET_FD_BY_ID, _IdAttr(id=attr.id))
        except OSError:
            continue  # unloaded meanwhile
        info = _BtfInfo(name=ctypes.addressof(name), name_len=ctypes.sizeof(name))
        query = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
        try:
            bpf(BPF_OBJ_GET_INFO_BY_FD, query)
        except OSError:
            os.close(fd)
            continue
        if info.kernel_btf and name.value == module.encode():
            return fd
        os.close(fd)


def load_program(name: str, insns: bytes, *, kind: str, btf_fd: int, btf_id: int) -> int:
    """``BPF_PROG_LOAD`` of a tracing program (``kind``: fentry or fexit) on function
    ``btf_id`` of the BTF object ``btf_fd``; its fd, or SourceError with the verifier's
    last words."""
    code = ctypes.create_string_buffer(insns, len(insns))
    license = ctypes.create_string_buffer(b"GPL")

    def attempt(log: ctypes.Array[ctypes.c_char] | None) -> int:
        attr = _ProgLoadAttr(
            prog_type=BPF_PROG_TYPE_TRACING, insn_cnt=len(insns) // _INSN_SIZE,
            insns=ctypes.addressof(code), license=ctypes.addressof(license),
            prog_name=name.encode()[:_BPF_OBJ_NAME_LEN - 1],
            expected_attach_type=ATTACH_TYPES[kind], attach_btf_id=btf_id,
            attach_btf_obj_fd=btf_fd)
        if log is not None:
            attr.log_level, attr.log_size = 1, ctypes.sizeof(log)
            attr.log_buf = ctypes.addressof(log)
        return bpf(BPF_PROG_LOAD, attr)

    try:
        return attempt(None)
    except OSError as first:
        log = ctypes.create_string_buffer(_LOG_SIZE)
        try:
            return attempt(log)  # cannot pass twice, unless the first failure was transient
        except OSError:
            words = verifier_summary(log.value.decode(errors="replace"))
            raise SourceError(f"the kernel refused {name} ({kind}): {first.strerror}"
                              + (f": {words}" if words else "")) from first


def verifier_summary(log: str, lines: int = 3) -> str:
    """The verifier log's last non-empty lines, joined: where it says what it refused."""
    tail = [line.strip() for line in log.splitlines() if line.strip()]
    return " / ".join(tail[-lines:])


def attach(prog_fd: int) -> int:
    """Attach a loaded tracing program to its target; the returned fd holds the attachment."""
    return bpf(BPF_RAW_TRACEPOINT_OPEN, _RawTracepointAttr(name=0, prog_fd=prog_fd))


class Trampoline:
    """One program on one module function: loaded once, attached and detached at will."""

    def __init__(self, program: str, function: str, kind: str, prog_fd: int) -> None:
        self.program = program
        self.function = function
        self.kind = kind
        self.prog_fd = prog_fd
        self.link_fd: int | None = None

    def attach(self) -> None:
        if self.link_fd is None:
            try:
                self.link_fd = attach(self.prog_fd)
            except OSError as exc:
                raise SourceError(f"cannot attach {self.kind} to {self.function}: "
                                  f"{exc.strerror}") from exc

    def detach(self) -> None:
        if self.link_fd is not None:
            os.close(self.link_fd)
            self.link_fd = None

    def close(self) -> None:
        self.detach()
        os.close(self.prog_fd)


def prog_fdinfo(fd: int) -> dict[str, int]:
    """The numeric fields of a BPF program fd's fdinfo (/proc/self/fdinfo/<fd>): ``run_cnt``
    and ``run_time_ns`` (with kernel.bpf_stats_enabled), ``recursion_misses``, ..."""
    try:
        text = Path(f"/proc/self/fdinfo/{fd}").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip().isdigit():
            out[key.strip()] = int(value.strip())
    return out


def load_module_trampolines(module: str, programs: list[tuple[str, str, str, bytes]]
                            ) -> list[Trampoline]:
    """Load each ``(program, function, kind, instructions)`` against ``module``'s BTF (or
    vmlinux's, where the module is built in), not attached yet; all or nothing."""
    ids, in_module = btf_function_ids(module, [function for _, function, _, _ in programs])
    btf_fd = btf_object_fd(module) if in_module else 0  # 0: vmlinux
    loaded: list[Trampoline] = []
    try:
        for program, function, kind, insns in programs:
            fd = load_program(program, insns, kind=kind, btf_fd=btf_fd, btf_id=ids[function])
            loaded.append(Trampoline(program, function, kind, fd))
    except BaseException:
        for trampoline in loaded:
            trampoline.close()
        raise
    finally:
        if btf_fd:
            os.close(btf_fd)
    return loaded
