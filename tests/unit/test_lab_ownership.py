"""The lab removes only namespaces it marked when it created them (cttrace.lab.ownership)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cttrace.lab import ownership
from cttrace.netns import NetnsError

#: What `stat /run/netns/<name>` says now, for each fake namespace.
INODES: dict[str, int] = {}


@pytest.fixture(autouse=True)
def fake_namespaces(monkeypatch: pytest.MonkeyPatch) -> None:
    INODES.clear()

    def netns_inode(name: str) -> int:
        if name not in INODES:
            raise NetnsError(f"no network namespace {name}")
        return INODES[name]

    monkeypatch.setattr(ownership, "netns_inode", netns_inode)


def test_a_namespace_the_lab_created_is_owned(tmp_path: Path) -> None:
    INODES["ctl-ab12-node"] = 4026532001
    ownership.claim("ctl-ab12-node", tmp_path)
    assert (tmp_path / "ab12" / "netns" / "ctl-ab12-node").read_text() == "4026532001\n"
    assert ownership.owned("ctl-ab12-node", tmp_path)


def test_a_namespace_that_only_looks_like_the_labs_is_not(tmp_path: Path) -> None:
    INODES.update({"ctl-ab12-node": 4026532001, "ctl-ab12-web": 4026532002})
    ownership.claim("ctl-ab12-node", tmp_path)
    assert not ownership.owned("ctl-ab12-web", tmp_path)  # same prefix, never marked
    assert not ownership.owned("other-ns", tmp_path)  # not even a lab name


def test_a_namespace_recreated_under_a_marked_name_is_not(tmp_path: Path) -> None:
    INODES["ctl-ab12-node"] = 4026532001
    ownership.claim("ctl-ab12-node", tmp_path)
    INODES["ctl-ab12-node"] = 4026532077  # deleted by someone, re-created by someone else
    assert not ownership.owned("ctl-ab12-node", tmp_path)
    del INODES["ctl-ab12-node"]
    assert not ownership.owned("ctl-ab12-node", tmp_path)  # gone


def test_only_lab_names_can_be_claimed(tmp_path: Path) -> None:
    INODES["blue"] = 4026532003
    with pytest.raises(ValueError, match="not a lab namespace name"):
        ownership.claim("blue", tmp_path)
