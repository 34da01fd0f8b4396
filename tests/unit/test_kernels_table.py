"""The README's "Kernels" table is what the test suite proves.

A kernel the table says the VM tier proves must be one the VM tier boots
(``KERNELS`` in tests/vm/run_vm_tier.py: tests/test_vm_tier.py runs every guest
test on each), and every kernel the VM tier boots must be in the table; so
adding or dropping a kernel in one place fails here until the other follows.
"""

from __future__ import annotations

import re
from pathlib import Path

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
