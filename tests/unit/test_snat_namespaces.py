"""snat-collision in every namespace the bpf source traces, not only the one cttrace runs in.

The bpf programs count, by network namespace, the NATed TCP entries whose confirm failed
(an insert clash: the packet dropped). ``cttrace watch``/``agent`` read the statistics
file of the namespace they trace themselves, and report the other namespaces' failures
from those counts: one finding per namespace, named, from zero (the counts start when
the programs are loaded), never twice for the namespace whose file is read.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cttrace import ctstats
from cttrace.assemble import snat_check
from cttrace.ctstats import NamespaceCollisions
from cttrace.findings import Severity
from cttrace.netns import netns_inode, netns_name_of
from cttrace.sources.bpf import BpfSource

OWN, LAB, POD = 4026531840, 4026532301, 4026532302
NAMES = {LAB: "ctl-ab12-node"}


def collisions(counts: dict[int, int], start: float = 1000.0) -> NamespaceCollisions:
    return NamespaceCollisions(lambda: counts, skip=OWN, start=start, name_of=NAMES.get)


def test_first_failures_of_a_namespace_are_reported_from_zero_not_taken_as_a_baseline() -> None:
    counts: dict[int, int] = {}
    check = collisions(counts)
    assert check.sample(1005.0) == []
    counts[LAB] = 16  # a burst clashed between two samples
    (finding,) = check.sample(1010.0)
    assert finding.rule == "snat-collision"
    assert finding.severity is Severity.CRITICAL  # 16 in 5 s
    assert finding.details["deltas"] == {"insert_failed": 16, "drop": 16}
    assert finding.details["counters"] == {"insert_failed": 16, "drop": 16}
    assert finding.details["interval_s"] == 5.0
    assert finding.summary.startswith(
        "network namespace ctl-ab12-node: conntrack insert_failed +16")
    assert "--random-fully" in finding.summary
    doc = finding.to_json()
    assert (doc["netns"], doc["netns_ino"], doc["source"]) == ("ctl-ab12-node", LAB, "bpf")
    assert doc["orig"] == {"src": "", "sport": 0, "dst": "", "dport": 0}
    # No growth, no finding; growth again, a finding for the growth only.
    assert check.sample(1015.0) == []
    counts[LAB] = 17
    (again,) = check.sample(1025.0)
    assert again.details["deltas"] == {"insert_failed": 1, "drop": 1}
    assert again.severity is Severity.WARNING  # 1 in 10 s


def test_the_namespace_whose_statistics_are_read_is_never_reported_from_the_counts() -> None:
    counts = {OWN: 50}
    check = collisions(counts)
    assert check.sample(1005.0) == []
    counts[OWN] = 90
    assert check.sample(1010.0) == []


def test_each_namespace_gets_its_own_finding_unnamed_ones_by_inode() -> None:
    counts = {LAB: 4, POD: 2}
    by_netns = {f.details["netns_ino"]: f for f in collisions(counts).sample(1004.0)}
    assert by_netns.keys() == {LAB, POD}
    assert by_netns[POD].details["netns"] is None
    assert by_netns[POD].summary.startswith(f"network namespace inode {POD}: ")
    assert by_netns[POD].details["deltas"] == {"insert_failed": 2, "drop": 2}


def test_a_namespace_evicted_from_the_kernel_map_starts_over_from_zero() -> None:
    counts = {LAB: 30}
    check = collisions(counts)
    assert len(check.sample(1005.0)) == 1
    del counts[LAB]  # LRU eviction: forgotten here too
    assert check.sample(1010.0) == []
    counts[LAB] = 2  # counted again from zero in the kernel
    (finding,) = check.sample(1015.0)
    assert finding.details["deltas"] == {"insert_failed": 2, "drop": 2}


class CountingBpfSource(BpfSource):
    """A bpf source whose kernel counts are given (nothing is compiled or loaded)."""

    def __init__(self, counts: dict[int, int]) -> None:
        super().__init__()
        self.counts = counts

    def insert_failures(self) -> dict[int, int]:
        return dict(self.counts)


@pytest.fixture
def own_stats(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """The traced namespace's statistics file, as the check reads it."""
    values = {"insert_failed": 0, "drop": 0, "early_drop": 0, "clashres": 0}
    monkeypatch.setattr(ctstats, "read_conntrack_stats", lambda netns=None: dict(values))
    yield values


def test_snat_check_with_the_bpf_source_reports_other_namespaces_and_its_own(
    own_stats: dict[str, int],
) -> None:
    own = netns_inode(None)
    source = CountingBpfSource({})
    check = snat_check(None, source).check
    assert check(1e12) == []  # the file's first sample: a baseline
    source.counts.update({own: 7, LAB: 5})
    own_stats.update(insert_failed=7, drop=7)
    found = check(1e12 + 5)
    assert [f.details["netns_ino"] for f in found] == [own, LAB]
    mine, lab = found
    # The own namespace from its file (all four counters), the lab's from the counts.
    assert mine.details["deltas"] == {"insert_failed": 7, "drop": 7, "early_drop": 0}
    assert mine.details["netns"] is None and "source" not in mine.details
    assert lab.details["deltas"] == {"insert_failed": 5, "drop": 5}
    assert lab.details["source"] == "bpf"


def test_snat_check_with_another_source_reads_only_the_file(own_stats: dict[str, int]) -> None:
    check = snat_check(None, None).check
    assert check(1e12) == []
    own_stats.update(insert_failed=3, drop=3)
    (finding,) = check(1e12 + 5)
    assert finding.details["netns_ino"] == netns_inode(None)


class FakeTable:
    """``bpf["ctt_insert_failed"]`` as BCC returns it: ctypes keys and values."""

    def items(self) -> list[tuple[ctypes.c_uint32, ctypes.c_uint64]]:
        return [(ctypes.c_uint32(LAB), ctypes.c_uint64(16)),
                (ctypes.c_uint32(POD), ctypes.c_uint64(1))]


class FakeBpf:
    def __getitem__(self, name: str) -> FakeTable:
        assert name == "ctt_insert_failed"
        return FakeTable()


def test_bpf_source_reads_the_kernel_counts_by_namespace() -> None:
    source = BpfSource()
    assert source.insert_failures() == {}  # not open: nothing counted
    source._bpf = FakeBpf()
    try:
        assert source.insert_failures() == {LAB: 16, POD: 1}
    finally:
        source._bpf = None


def test_netns_inode_and_name() -> None:
    assert netns_inode(None) == os.stat("/proc/thread-self/ns/net").st_ino


def test_a_namespace_without_an_ip_netns_name_has_none(tmp_path: Path) -> None:
    (tmp_path / "not-a-namespace").write_text("")  # a plain file, on another filesystem
    inode = (tmp_path / "not-a-namespace").stat().st_ino
    assert netns_name_of(inode, str(tmp_path)) is None
    assert netns_name_of(netns_inode(None), str(tmp_path)) is None
