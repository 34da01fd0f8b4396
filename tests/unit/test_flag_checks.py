"""Flags a user gets wrong stop the command at once: one line naming the flag, exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_jsonl_and_cli import cttrace


@pytest.mark.parametrize(("args", "says"), [
    (["watch", "--duration", "-1"], "--duration -1: give a number of seconds greater than 0"),
    (["watch", "--duration", "0"], "--duration 0: give a number of seconds greater than 0"),
    (["watch", "--ip", "999.1.1.1"], "--ip '999.1.1.1' is not an IPv4 or IPv6 address"),
    (["agent", "--node", ""], "--node must not be empty"),
    (["agent", "--node", "  "], "--node must not be empty"),
    (["watch", "--ready-file", "/nonexistent-dir/ready"],
     "--ready-file /nonexistent-dir/ready: directory /nonexistent-dir does not exist"),
    (["agent", "--ready-file", "/nonexistent-dir/ready"],
     "--ready-file /nonexistent-dir/ready: directory /nonexistent-dir does not exist"),
    (["agent", "--ready-file", "/tmp"], "--ready-file /tmp is a directory"),
    (["agent", "--listen", "nowhere"], "--listen 'nowhere': expected HOST:PORT"),
    (["agent", "--alertmanager-url", "ftp://am"], "--alertmanager-url 'ftp://am': expected"),
])
def test_a_bad_flag_is_one_line_and_exit_code_2(args: list[str], says: str) -> None:
    res = cttrace(*args)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cttrace: error: {says}"), res.stderr
    assert "Traceback" not in res.stderr


def test_good_values_are_kept_in_canonical_form() -> None:
    from cttrace import flag_checks

    assert flag_checks.ip_addresses(["10.0.0.1", " fd00::0:1 "]) == ["10.0.0.1", "fd00::1"]
    assert flag_checks.node_name(" node-1 ") == "node-1"
    assert flag_checks.duration(0.5) == 0.5 and flag_checks.duration(None) is None


def test_a_ready_file_in_an_existing_directory_is_accepted(tmp_path: Path) -> None:
    from cttrace import flag_checks

    assert flag_checks.ready_file(tmp_path / "ready") == tmp_path / "ready"
