"""The kernel's BTF as the trampoline loader reads it, on this machine's own kernel.

Loading a trampoline needs a kernel that allows fentry (the VM tier's); what comes
before it does not: the conntrack functions' type ids, found by libbpf in the BTF the
kernel exports (nf_conntrack's own where it is a module, vmlinux's where it is built
in, as here), and a kernel BTF object's fd, found by name among the kernel's BTF objects.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cttrace.errors import SourceError
from cttrace.sources.probe import CONNTRACK_MODULE
from cttrace.sources.trampoline import btf_function_ids, btf_object_fd, prog_fdinfo

pytestmark = pytest.mark.kernel

CONNTRACK_FUNCTIONS = ["__nf_conntrack_confirm", "nf_conntrack_tcp_packet", "nf_ct_delete"]


def test_the_conntrack_functions_have_btf_type_ids() -> None:
    ids, in_module = btf_function_ids(CONNTRACK_MODULE, CONNTRACK_FUNCTIONS)
    assert sorted(ids) == sorted(CONNTRACK_FUNCTIONS)
    assert len(set(ids.values())) == 3 and min(ids.values()) > 0
    assert in_module == Path(f"/sys/kernel/btf/{CONNTRACK_MODULE}").exists()


def test_a_function_the_btf_lacks_is_named() -> None:
    with pytest.raises(SourceError, match="nf_conntrack_no_such_function is not a function of"):
        btf_function_ids(CONNTRACK_MODULE, ["nf_ct_delete", "nf_conntrack_no_such_function"])


def test_a_kernel_btf_object_is_opened_by_name() -> None:
    fd = btf_object_fd("vmlinux")
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:btf"
    finally:
        os.close(fd)
    with pytest.raises(SourceError, match="no BTF object named ctt_no_such_module"):
        btf_object_fd("ctt_no_such_module")


def test_fdinfo_numbers_are_read() -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        assert prog_fdinfo(fd)["pos"] == 0
    finally:
        os.close(fd)
