"""kretprobes get their own maxactive only where BCC can write tracefs' kprobe_events."""

from __future__ import annotations

from pathlib import Path

import pytest

from cttrace.sources import kprobe_events
from cttrace.sources.kprobe_events import usable_maxactive


def test_a_writable_kprobe_events_keeps_the_wanted_maxactive(tmp_path: Path) -> None:
    events = tmp_path / "kprobe_events"
    events.touch()
    assert usable_maxactive(256, [str(tmp_path / "absent"), str(events)]) == 256
    assert usable_maxactive(0, [str(events)]) == 0


def test_read_only_or_missing_tracefs_means_the_kernels_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = tmp_path / "kprobe_events"
    events.touch()
    assert usable_maxactive(256, [str(tmp_path / "absent")]) == 0
    # What access(2) says on a read-only mount (EROFS), whoever asks.
    monkeypatch.setattr(kprobe_events.os, "access", lambda path, mode: False)
    assert usable_maxactive(256, [str(events)]) == 0
