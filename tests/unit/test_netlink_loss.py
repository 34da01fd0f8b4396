"""The netlink source counts messages lost, not overflows: the socket's drop counter says
how many events an ENOBUFS stood for."""

from __future__ import annotations

import pytest

from cttrace.sources.netlink import NetlinkSource


def test_an_overflow_counts_the_messages_the_kernel_dropped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    src = NetlinkSource()
    drops = iter([147_000, 147_000, 295_372, 295_400])
    monkeypatch.setattr(src, "_drops", lambda: next(drops))
    assert src._missed_since_last() == 147_000  # the first ENOBUFS: everything so far
    assert src._missed_since_last() == 1  # ENOBUFS says at least one, even if not yet counted
    assert src._missed_since_last() == 295_372 - 147_001
    # Drops after the last ENOBUFS read show in sk_drops: lost is never below it.
    src._stats.lost = 295_372
    stats = src.stats()
    assert stats.lost == 295_400 and stats.extra["dropped_messages"] == 295_400


def test_without_the_drop_counter_an_overflow_counts_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    src = NetlinkSource()
    monkeypatch.setattr(src, "_drops", lambda: None)
    assert src._missed_since_last() == 1
    assert src.stats().lost == 0
