"""``cttrace explain`` retells a finding as an ordered timeline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from cttrace.correlator import Correlator
from tests.unit.test_correlator import LEDGER_B, SCENARIO_1, recycled, run, world


def wrong_pod_line() -> bytes:
    ident = world(t_a_dies=10.0)
    recycled(ident, at=12.0)
    findings = run(Correlator(identity=ident), SCENARIO_1)
    (wp,) = [f for f in findings if str(f.rule) == "wrong-pod"]
    return orjson.dumps(wp.to_json())


def test_timeline_orders_creation_death_reassignment_reply_finding(tmp_path: Path) -> None:
    path = tmp_path / "findings.jsonl"
    path.write_bytes(b'{"kind":"status"}\n' + wrong_pod_line() + b"\n")
    res = subprocess.run([sys.executable, "-m", "cttrace", "explain", str(path), "-o", "json"],
                         capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    steps = orjson.loads(res.stdout)["steps"]
    assert [s["what"] for s in steps] == ["owner", "created", "gone", "owner", "reply", "finding"]
    assert "shop/cart-7d9f8-abcde" in steps[2]["text"]
    assert LEDGER_B.name in steps[3]["text"] and LEDGER_B.name in steps[4]["text"]
    assert steps[5]["text"].startswith("wrong-pod (critical)")


def test_tuple_selection_and_no_match_error(tmp_path: Path) -> None:
    path = tmp_path / "findings.jsonl"
    path.write_bytes(wrong_pod_line() + b"\n")
    ok = subprocess.run([sys.executable, "-m", "cttrace", "explain", str(path),
                         "--tuple", "10.244.1.9:40000"], capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0 and "first reply from 10.244.1.5:8080" in ok.stdout
    miss = subprocess.run([sys.executable, "-m", "cttrace", "explain", str(path),
                           "--tuple", "10.9.9.9:1"], capture_output=True, text=True, timeout=60)
    assert miss.returncode == 2
    assert miss.stderr.strip() == f"cttrace: error: no finding in {path} matches"



def test_a_2_and_1_capture_has_its_stderr_lines_skipped(tmp_path: Path) -> None:
    path = tmp_path / "capture.log"
    path.write_bytes(b"cttrace: bpf source unavailable; using netlink\n" + wrong_pod_line()
                     + b"\nTraceback (most recent call last):\n")
    ok = subprocess.run([sys.executable, "-m", "cttrace", "explain", str(path)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "first reply from 10.244.1.5:8080" in ok.stdout
    assert "skipped 2 lines" in ok.stderr and "line 1" in ok.stderr
