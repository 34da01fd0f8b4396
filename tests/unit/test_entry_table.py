"""The correlator's entry table: what a full table evicts, and that it stays bounded."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from cttrace.entry_table import EntryTable

FINISHED = frozenset({7})  # a stand-in TIME_WAIT


@dataclass(slots=True)
class E:
    orig_tuple: tuple[str, int, str, int]
    created: float | None = 1.0
    replied: float | None = None
    state: int | None = 1


def e(port: int, **kw: object) -> E:
    return E(("10.0.0.1", port, "10.96.0.10", 80), **kw)  # type: ignore[arg-type]


def test_eviction_order_is_finished_or_answered_then_unobserved_then_unreplied() -> None:
    table: EntryTable[E] = EntryTable(3, FINISHED)
    waiting, unobserved, answered, finished = (
        e(1), e(2, created=None), e(3, replied=2.0), e(4, state=7))
    for entry in (waiting, unobserved, answered):
        assert table.add(entry) is None
    assert table.add(finished) is unobserved  # the oldest that cannot fire a first-reply rule
    assert table.add(e(5)) is answered
    assert table.add(e(6)) is finished
    assert table.add(e(7)) is waiting  # nothing else left: the oldest unreplied
    assert table.evicted == {"finished": 1, "answered": 1, "unobserved": 1, "unreplied": 1}


def test_an_entry_answered_while_waiting_is_counted_as_answered() -> None:
    table: EntryTable[E] = EntryTable(2, FINISHED)
    first, second = e(1), e(2)
    table.add(first)
    table.add(second)
    table.add(e(3))  # both unreplied: first goes
    second.replied = 5.0
    assert table.add(e(4)) is second
    assert table.evicted["answered"] == 1 and table.evicted["unreplied"] == 1


def test_removed_entries_do_not_pile_up_in_the_queues() -> None:
    table: EntryTable[E] = EntryTable(1_000_000, FINISHED)
    for port in range(50_000):
        entry = e(port)
        table.add(entry)
        table.remove(entry)
    assert len(table) == 0
    assert len(table._by_age) + len(table._waiting) <= 4096 + 1


def test_remove_leaves_a_newer_entry_at_the_same_tuple() -> None:
    table: EntryTable[E] = EntryTable(10, FINISHED)
    old, new = e(1), e(1)
    table.add(old)
    table.add(new)
    table.remove(old)
    assert table.get(new.orig_tuple) is new


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        EntryTable(0, FINISHED)
