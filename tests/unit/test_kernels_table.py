"""The README's "Kernels" table is what the test suite proves.

A kernel the table says the VM tier proves must be one the VM tier boots
(``KERNELS`` in tests/vm/run_vm_tier.py: tests/test_vm_tier.py runs every guest
test on each), and every kernel the VM tier boots must be in the table; so
adding or dropping a kernel in one place fails here until the other follows.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from cttrace.sources import bpf as bpf_module
from cttrace.sources.bpf import BpfSettings, BpfSource, settings_for
from cttrace.sources.probe import SEND_RESET_KPROBE, BpfFeatures
from cttrace.sources.trampoline import Trampoline
from tests.vm.run_vm_tier import KERNELS

README = Path(__file__).resolve().parents[2] / "README.md"


def kernels_table() -> dict[str, list[str]]:
    """Kernel (the backquoted name in the first column) -> the row's cells."""
    section = README.read_text().split("\n## Kernels\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    table = {}
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        name = re.match(r"`([^`]+)`", cells[0])
        assert name, row
        table[name.group(1)] = cells
    return table


def test_the_kernels_the_table_says_the_vm_tier_proves_are_the_ones_it_boots() -> None:
    table = kernels_table()
    proven_in_vm = {name for name, cells in table.items() if cells[-1].startswith("vm")}
    assert proven_in_vm == set(KERNELS)


def test_every_row_names_an_attach_mode_for_every_hook_and_a_tier() -> None:
    for name, cells in kernels_table().items():
        assert len(cells) == 5, f"{name}: {cells}"
        assert all(cells), f"{name}: an empty cell"
        assert cells[-1].split(":", 1)[0] in ("vm", "kernel", "unit"), f"{name}: {cells[-1]}"


def test_the_vm_kernels_rows_name_the_modes_the_source_attaches_with_btf(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both VM kernels have BTF (nf_conntrack's too), trampolines, the reset kprobe and both
    reset tracepoints (the VM tier's agent and storm tests assert the modes the source
    reports there): each row names, first in each cell, the mode the source then attaches
    each hook with."""
    features = BpfFeatures(release="6.x", headers_dir=None, ringbuf=True,
                           send_reset_kprobe=True, send_reset_tracepoint=True,
                           receive_reset_tracepoint=True, tracefs=None,
                           fentry_unavailable=None, module_fentry_unavailable=None)

    def load(module: str, programs: list[tuple[str, str, str, bytes]]) -> list[Trampoline]:
        return [Trampoline(program, function, kind, -1) for program, function, kind, _ in programs]

    monkeypatch.setattr(bpf_module, "load_module_trampolines", load)
    source = BpfSource()
    source._bpf = SimpleNamespace(dump_func=lambda name: b"")
    source._features = features
    source._settings = settings_for(features, BpfSettings())
    source._load_trampolines(source._settings, features)
    source._bpf = None
    hooks = source.hooks()

    def mode(function: str) -> str:
        return hooks[function][0].replace("+", " + ")

    conntrack = f"{mode('__nf_conntrack_confirm')} / {mode('nf_ct_delete')}"
    assert mode("nf_conntrack_tcp_packet") == mode("__nf_conntrack_confirm")
    for name in KERNELS:
        cells = kernels_table()[name]
        assert cells[1].startswith(conntrack), cells[1]
        assert cells[2].startswith(mode("tcp_connect")), cells[2]
        assert cells[3].startswith(f"{mode(SEND_RESET_KPROBE)} `{SEND_RESET_KPROBE}`"), cells[3]
