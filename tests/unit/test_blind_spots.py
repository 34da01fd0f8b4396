"""What makes tracing blind is said: a traced namespace that is gone, a full conntrack table."""

from __future__ import annotations

from pathlib import Path

from cttrace.blind_spots import TableFullCheck, TracedNamespace, blind_spot_checks


def test_a_deleted_or_replaced_namespace_is_gone(tmp_path: Path) -> None:
    ns = tmp_path / "ctl-node"  # a path stands for the namespace file (its inode is the id)
    ns.write_text("")
    traced = TracedNamespace(str(ns))
    assert traced.gone() is None
    ns.unlink()
    assert "was deleted" in (traced.gone() or "")
    keep = tmp_path / "keep"  # hold the old inode so the new file cannot reuse it
    keep.write_text("")
    ns.write_text("")
    if ns.stat().st_ino != keep.stat().st_ino:
        assert "replaced by another one" in (traced.gone() or "")


def test_our_own_namespace_is_never_gone() -> None:
    assert TracedNamespace(None).gone() is None


def test_gone_is_said_once_and_stops_a_watch(tmp_path: Path) -> None:
    ns = tmp_path / "ctl-node"
    ns.write_text("")
    lines: list[dict[str, object]] = []
    stopped: list[bool] = []
    namespace_check, _ = blind_spot_checks(TracedNamespace(str(ns)), lines.append,
                                           on_gone=lambda: stopped.append(True))
    assert namespace_check.check(1.0) == [] and lines == []
    ns.unlink()
    namespace_check.check(2.0)
    namespace_check.check(3.0)
    assert [x["reason"] for x in lines] == ["netns-gone"] and stopped == [True]


def test_early_drops_at_a_full_table_become_a_warning_line() -> None:
    early = iter([10, 10, 47_866])
    lines: list[dict[str, object]] = []
    check = TableFullCheck(lambda: {"early_drop": next(early)}, lambda: {"max": 262144},
                           lines.append)
    check.check(1.0)  # the baseline
    check.check(2.0)  # no growth
    assert lines == []
    check.check(3.0)
    assert len(lines) == 1
    line = lines[0]
    assert (line["kind"], line["reason"], line["early_drop"]) == (
        "warning", "conntrack-table-full", 47_856)
    assert "nf_conntrack_max 262144" in str(line["msg"])


def test_a_pipe_whose_reader_left_is_seen() -> None:
    import os

    from cttrace.watch import stdout_reader_left

    read_end, write_end = os.pipe()
    try:
        assert not stdout_reader_left(write_end)
        os.close(read_end)
        assert stdout_reader_left(write_end)
    finally:
        os.close(write_end)
