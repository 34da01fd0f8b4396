"""Following an identity file as it grows, is truncated or replaced."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from cttrace.errors import IdentityError
from cttrace.identity.follow import IdentityFileFollower, LineError, load_file
from cttrace.identity.index import IdentityIndex


def pod_line(uid: str, ip: str, etype: str = "ADDED") -> bytes:
    obj: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"uid": uid, "name": f"pod-{uid}", "namespace": "shop"},
        "spec": {"containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIPs": [{"ip": ip}]},
    }
    return orjson.dumps({"type": etype, "object": obj}) + b"\n"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.index = IdentityIndex()
        self.clock = FakeClock()
        self.errors: list[tuple[int, str]] = []
        self.follower = IdentityFileFollower(
            path, self.index, clock=self.clock,
            on_error=lambda n, msg: self.errors.append((n, msg)))

    def append(self, data: bytes) -> None:
        with open(self.path, "ab") as f:
            f.write(data)

    def owner(self, ip: str, t: float) -> str | None:
        ref = self.index.owner_at(ip, t)
        return ref.uid if ref is not None else None


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path / "identity.jsonl")
    yield harness
    harness.follower.close()


def test_waits_for_the_file_and_is_in_sync_after_reading_it_once(h: Harness) -> None:
    assert h.follower.poll() == 0
    assert not h.index.in_sync  # no file yet: no picture at all
    h.append(pod_line("a", "10.0.0.5") + pod_line("b", "10.0.0.6"))
    assert h.follower.poll() == 2
    assert h.index.in_sync
    assert h.owner("10.0.0.6", 1000.0) == "b"


def test_empty_file_is_a_complete_empty_picture(h: Harness) -> None:
    h.path.touch()
    assert h.follower.poll() == 0
    assert h.index.in_sync


def test_lines_are_stamped_when_read(h: Harness) -> None:
    h.append(pod_line("a", "10.0.0.5"))
    h.follower.poll()
    h.clock.now = 1010.0
    h.append(pod_line("a", "10.0.0.5", "DELETED") + pod_line("b", "10.0.0.5"))
    assert h.follower.poll() == 2
    assert [(o.pod.uid, o.since, o.until) for o in h.index.ownerships("10.0.0.5")] == [
        ("a", 1000.0, 1010.0), ("b", 1010.0, None)]


def test_incomplete_last_line_waits_for_its_newline(h: Harness) -> None:
    line = pod_line("a", "10.0.0.5")
    h.append(line[:40])
    assert h.follower.poll() == 0
    assert h.errors == []
    h.clock.now = 1005.0
    h.append(line[40:])
    assert h.follower.poll() == 1
    assert h.owner("10.0.0.5", 1005.0) == "a"
    assert h.owner("10.0.0.5", 1004.0) is None  # learned when the line was complete


def test_bad_lines_are_reported_with_their_number_and_skipped(h: Harness) -> None:
    h.append(pod_line("a", "10.0.0.5")
             + b"{not json\n"
             + b"\n"  # blank lines are not events, nor errors
             + b'{"type": "ADDED", "object": {"kind": "Pod", "metadata": {"name": "x"}}}\n'
             + pod_line("b", "10.0.0.6"))
    assert h.follower.poll() == 2
    assert [n for n, _ in h.errors] == [2, 4]
    assert h.errors[0][1].startswith("not JSON: ")
    assert "object.metadata.uid is missing" in h.errors[1][1]
    assert h.owner("10.0.0.6", 1000.0) == "b"
    h.append(b"[]\n")
    h.follower.poll()
    assert h.errors[-1][0] == 6


def test_truncation_starts_over(h: Harness) -> None:
    h.append(pod_line("a", "10.0.0.5") + pod_line("b", "10.0.0.6"))
    h.follower.poll()
    h.path.write_bytes(b"garbage\n")  # truncated and rewritten, shorter than before
    h.clock.now = 1020.0
    h.follower.poll()
    assert h.errors[-1][0] == 1  # line numbers restart with the file


def test_replaced_file_is_drained_then_read_from_the_start(h: Harness) -> None:
    h.append(pod_line("a", "10.0.0.5"))
    h.follower.poll()
    h.append(pod_line("b", "10.0.0.6"))  # written just before the rotation
    rotated = h.path.with_suffix(".1")
    os.rename(h.path, rotated)
    h.path.write_bytes(pod_line("c", "10.0.0.7"))
    assert h.follower.poll() == 2
    assert h.owner("10.0.0.6", 1000.0) == "b"
    assert h.owner("10.0.0.7", 1000.0) == "c"
    h.append(pod_line("d", "10.0.0.8"))
    assert h.follower.poll() == 1


def test_removed_file_keeps_following_what_is_open(h: Harness) -> None:
    h.append(pod_line("a", "10.0.0.5"))
    h.follower.poll()
    with open(h.path, "ab") as f:
        os.unlink(h.path)
        f.write(pod_line("b", "10.0.0.6"))
    assert h.follower.poll() == 1
    assert h.owner("10.0.0.6", 1000.0) == "b"


def test_directory_is_a_clear_error(tmp_path: Path) -> None:
    follower = IdentityFileFollower(tmp_path, IdentityIndex())
    with pytest.raises(IdentityError, match="is a directory"):
        follower.poll()


def test_load_file_reads_everything_once(tmp_path: Path) -> None:
    path = tmp_path / "pods.jsonl"
    # The last line has no newline: the file is complete, so it counts.
    path.write_bytes(pod_line("a", "10.0.0.5") + b"nope\n" + pod_line("b", "10.0.0.6")[:-1])
    index = IdentityIndex()
    errors = load_file(path, index, clock=FakeClock(5.0))
    assert errors == [LineError(2, errors[0].message)]
    assert index.in_sync
    assert index.owner_at("10.0.0.6", 5.0) is not None


def test_load_file_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="does not exist"):
        load_file(tmp_path / "nope.jsonl", IdentityIndex())


def test_watch_says_once_that_it_waits_for_a_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cttrace.assemble import build_identity

    later = tmp_path / "later.jsonl"
    build_identity(later)
    err = capsys.readouterr().err
    assert err == (f"cttrace: identity file {later} does not exist yet: waiting for it; "
                   "until then findings carry no names\n")
    later.write_text("")
    build_identity(later)
    assert capsys.readouterr().err == ""
