"""On this machine's own kernel the bpf source cannot run (no kprobes, docs/DESIGN.md):
``--source auto`` falls back to netlink and says exactly why, and ``--source bpf`` refuses
with one clear line and a non-zero exit, never a traceback. Both run ``cttrace watch`` as a
separate process, as a user does.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator

import orjson
import pytest

from cttrace.errors import SourceError
from cttrace.sources.probe import check_bpf

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def reason() -> str:
    """Why the bpf source cannot run here, as the feature probes say it."""
    try:
        check_bpf()
    except SourceError as err:
        return str(err)
    message = ("this kernel can run the bpf source (the VM tier covers it); the fallback "
               "is tested on a kernel that cannot")
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"ctl{secrets.token_hex(3)}fb"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def watch(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "cttrace", "watch", *args],
                          capture_output=True, timeout=120, stdin=subprocess.DEVNULL)


def test_source_bpf_fails_with_one_clear_line(reason: str, netns: str) -> None:
    done = watch("--source", "bpf", "--netns", netns, "--output", "json", "--duration", "1")
    err = done.stderr.decode()
    assert done.returncode != 0
    assert err.splitlines() == [f"cttrace: error: {reason}"]
    assert "Traceback" not in err
    assert done.stdout == b""


def test_source_auto_falls_back_to_netlink_saying_why(reason: str, netns: str) -> None:
    done = watch("--source", "auto", "--netns", netns, "--output", "json", "--duration", "1")
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert f"cttrace: bpf source unavailable: {reason}; using netlink" in err.splitlines()
    assert "Traceback" not in err
    lines = [orjson.loads(line) for line in done.stdout.splitlines()]
    first = lines[0]
    assert (first["kind"], first["source"], first["netns"]) == ("source", "netlink", netns)
    assert first["fallback"] == f"bpf source unavailable: {reason}; using netlink"
    assert lines[-1]["kind"] == "summary"
