"""Conntrack statistics: parsing the per-CPU file, and growth into snat-collision findings."""

from __future__ import annotations

from pathlib import Path

import pytest

from cttrace.ctstats import (
    ConntrackStatsError,
    SnatCollisionSampler,
    counter_deltas,
    parse_conntrack_stats,
    read_conntrack_stats,
)
from cttrace.findings import Severity

# The header and layout of this project's 6.18 kernel; two CPUs.
STAT_TEXT = (
    "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop "
    "early_drop icmp_error  expect_new expect_create expect_delete search_restart\n"
    "0000002a  00000001 00000000 00000000 00000003 00000000 00000000 00000000 00000010 "
    "0000000a 0000000b 00000000 00000000  00000000 00000000 00000000 00000000\n"
    "0000002a  00000002 00000000 00000000 00000000 00000000 00000000 00000000 00000020 "
    "00000006 00000006 00000001 00000000  00000000 00000000 00000000 00000000\n"
)


def stats(insert_failed: int = 0, drop: int = 0, early_drop: int = 0) -> dict[str, int]:
    return {"insert_failed": insert_failed, "drop": drop, "early_drop": early_drop, "clashres": 0}


def test_parse_sums_hex_counters_over_cpus_by_column_name() -> None:
    parsed = parse_conntrack_stats(STAT_TEXT)
    assert parsed["insert_failed"] == 0x0A + 0x06
    assert parsed["drop"] == 0x0B + 0x06
    assert parsed["early_drop"] == 1
    assert parsed["clashres"] == 3
    assert parsed["insert"] == 0x30


def test_parse_takes_entries_once_because_every_cpu_line_repeats_the_namespace_count() -> None:
    assert parse_conntrack_stats(STAT_TEXT)["entries"] == 0x2A


def test_parse_follows_the_header_when_columns_move() -> None:
    text = "drop insert_failed\n00000001 00000002\n00000001 00000002\n"
    assert parse_conntrack_stats(text) == {"drop": 2, "insert_failed": 4}


@pytest.mark.parametrize(
    "text", ["", "entries drop\n00000001\n", "entries drop\n0000zz01 00000000\n"]
)
def test_parse_rejects_what_is_not_that_file(text: str) -> None:
    with pytest.raises(ValueError):
        parse_conntrack_stats(text)


def test_read_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "nf_conntrack"
    path.write_text(STAT_TEXT)
    assert read_conntrack_stats(path=path)["insert_failed"] == 16


def test_read_without_nf_conntrack_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConntrackStatsError, match="nf_conntrack is not loaded"):
        read_conntrack_stats(path=tmp_path / "missing")


def test_read_of_a_garbled_file_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "nf_conntrack"
    path.write_text("entries drop\n1\n")
    with pytest.raises(ConntrackStatsError, match="unexpected format"):
        read_conntrack_stats(path=path)


def test_counter_deltas_refuse_a_counter_that_went_backwards() -> None:
    assert counter_deltas(stats(5, 5), stats(7, 6), ("insert_failed", "drop")) == {
        "insert_failed": 2,
        "drop": 1,
    }
    assert counter_deltas(stats(5, 5), stats(1, 6), ("insert_failed", "drop")) is None


def test_first_sample_is_only_a_baseline() -> None:
    sampler = SnatCollisionSampler(threshold=1.0)
    assert sampler.sample(stats(100, 100), now=1000.0) is None


def test_no_growth_no_finding() -> None:
    sampler = SnatCollisionSampler(threshold=1.0)
    sampler.sample(stats(3, 3), now=1000.0)
    assert sampler.sample(stats(3, 3), now=1010.0) is None


def test_slow_insert_failure_growth_is_a_warning_with_counters_and_deltas() -> None:
    sampler = SnatCollisionSampler(threshold=1.0)
    sampler.sample(stats(3, 3), now=1000.0)
    finding = sampler.sample(stats(5, 5), now=1010.0)
    assert finding is not None
    assert finding.rule == "snat-collision"
    assert finding.severity is Severity.WARNING
    assert finding.ts == 1010.0
    assert finding.orig is None and finding.target is None  # counters carry no tuple
    assert finding.details["deltas"] == {"insert_failed": 2, "drop": 2, "early_drop": 0}
    assert finding.details["counters"] == {
        "insert_failed": 5,
        "drop": 5,
        "early_drop": 0,
        "clashres": 0,
    }
    assert finding.details["interval_s"] == 10.0
    assert "insert_failed +2" in finding.summary and "--random-fully" in finding.summary


def test_growth_at_the_threshold_rate_is_critical() -> None:
    sampler = SnatCollisionSampler(threshold=1.0)
    sampler.sample(stats(0, 0), now=1000.0)
    finding = sampler.sample(stats(10, 10), now=1010.0)
    assert finding is not None and finding.severity is Severity.CRITICAL


def test_drops_without_insert_failures_point_at_a_full_table() -> None:
    sampler = SnatCollisionSampler(threshold=100.0)
    sampler.sample(stats(0, 0, 0), now=1000.0)
    finding = sampler.sample(stats(0, 4, 9), now=1002.0)
    assert finding is not None
    assert "without insert failures" in finding.summary and "full" in finding.summary


def test_a_counter_going_backwards_rebaselines_instead_of_alerting() -> None:
    sampler = SnatCollisionSampler(threshold=1.0)
    sampler.sample(stats(50, 50), now=1000.0)
    assert sampler.sample(stats(1, 1), now=1001.0) is None  # namespace recreated / wrapped
    finding = sampler.sample(stats(2, 2), now=1002.0)
    assert finding is not None
    assert finding.details["deltas"] == {"insert_failed": 1, "drop": 1, "early_drop": 0}


def test_clock_stamps_samples_taken_without_now() -> None:
    ticks = iter([1000.0, 1004.0])
    sampler = SnatCollisionSampler(threshold=10.0, clock=lambda: next(ticks))
    sampler.sample(stats(0, 0))
    finding = sampler.sample(stats(1, 1))
    assert finding is not None and finding.ts == 1004.0 and finding.details["interval_s"] == 4.0


def test_finding_json_names_the_rule_and_carries_the_counters() -> None:
    sampler = SnatCollisionSampler(threshold=1.0)
    sampler.sample(stats(0, 0), now=1000.0)
    finding = sampler.sample(stats(1, 1), now=1001.0)
    assert finding is not None
    doc = finding.to_json()
    assert doc["rule"] == "snat-collision"
    assert doc["deltas"] == {"insert_failed": 1, "drop": 1, "early_drop": 0}


def test_threshold_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SnatCollisionSampler(threshold=0)
