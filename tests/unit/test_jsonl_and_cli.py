"""The JSON-lines contract users pipe into jq, the filters, and the CLI's error edge."""

from __future__ import annotations

import io
import subprocess
import sys

import orjson
import pytest

from cttrace.events import CtEvent, CtKind, CtStatus, Flow, TcpState
from cttrace.filters import Filter
from cttrace.findings import Finding, Severity
from cttrace.identity.model import PodRef, ServiceRef
from cttrace.sinks.jsonl import JsonLinesSink

ORIG = Flow("10.244.1.9", 40000, "10.96.0.10", 80)


def finding(rule: str = "wrong-pod") -> Finding:
    return Finding(
        rule=rule, severity=Severity.CRITICAL, ts=1_800_000_000.25, orig=ORIG,
        target=("10.244.1.5", 8080), summary="x", entry_id=7, created_ts=1_800_000_000.0,
        replied_ts=1_800_000_000.2, client=PodRef("u1", "shop", "frontend"),
        service=ServiceRef("shop", "cart"), old_owner=PodRef("u2", "shop", "cart-a"),
        new_owner=PodRef("u3", "billing", "ledger-b"),
    )


def lines(buf: io.BytesIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in buf.getvalue().splitlines()]


def test_finding_line_carries_the_contract_keys() -> None:
    buf = io.BytesIO()
    JsonLinesSink(buf).finding(finding())
    (obj,) = lines(buf)
    assert obj["kind"] == "finding" and obj["rule"] == "wrong-pod"
    assert obj["severity"] == "critical"
    assert obj["orig"] == {"src": "10.244.1.9", "sport": 40000, "dst": "10.96.0.10", "dport": 80}
    assert obj["target"] == {"ip": "10.244.1.5", "port": 8080}
    assert obj["unreplied_s"] == 0.2
    assert obj["ts"] == "2027-01-15T08:00:00.250000Z"
    assert obj["client"] == {"namespace": "shop", "name": "frontend", "uid": "u1"}
    assert obj["service"] == {"namespace": "shop", "name": "cart"}
    assert obj["old_owner"] == {"namespace": "shop", "name": "cart-a", "uid": "u2"}
    assert obj["new_owner"] == {"namespace": "billing", "name": "ledger-b", "uid": "u3"}


def test_filters_select_findings() -> None:
    f = finding()
    assert Filter.build(rules=["wrong-pod"]).finding(f)
    assert not Filter.build(rules=["late-establish"]).finding(f)
    assert Filter.build(namespaces=["billing"]).finding(f)
    assert not Filter.build(namespaces=["kube-system"]).finding(f)
    assert Filter.build(services=["cart"]).finding(f)
    assert Filter.build(services=["shop/cart"]).finding(f)
    assert not Filter.build(services=["ledger"]).finding(f)
    assert Filter.build(ips=["10.244.1.5"]).finding(f)
    assert not Filter.build(ips=["10.0.0.1"]).finding(f)


def test_flow_lines_only_when_asked() -> None:
    ev = CtEvent(CtKind.NEW, 1_800_000_000.0, 7, ORIG, Flow("10.244.1.5", 8080, ORIG.src, 40000),
                 int(TcpState.SYN_SENT), int(CtStatus.DST_NAT | CtStatus.CONFIRMED))
    quiet, loud = io.BytesIO(), io.BytesIO()
    JsonLinesSink(quiet).event(ev)
    JsonLinesSink(loud, flows=True).event(ev)
    assert quiet.getvalue() == b""
    (obj,) = lines(loud)
    assert obj["kind"] == "flow" and obj["event"] == "new" and obj["state"] == "SYN_SENT"
    assert obj["status"] == ["CONFIRMED", "DNAT"]
    assert obj["target"] == {"ip": "10.244.1.5", "port": 8080}


def cttrace(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cttrace", *args], capture_output=True,
                          text=True, timeout=60)


def test_help_teaches() -> None:
    res = cttrace("watch", "--help")
    assert res.returncode == 0
    for word in ("--identity-file", "--netns", "--source", "--rule", "--late-after"):
        assert word in res.stdout


def test_unknown_rule_is_one_line_not_a_traceback() -> None:
    res = cttrace("watch", "--rule", "wrong-pods", "-o", "json")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "cttrace: error: unknown rule 'wrong-pods': choose from dead-endpoint, inherited-entry, "
        "late-establish, snat-collision, unnated-reply, wrong-pod"
    ]


def test_rule_settings_flags_reach_the_correlator_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    from typer.testing import CliRunner

    import cttrace.watch
    from cttrace.cli import app
    from cttrace.correlator import Settings
    from cttrace.rules import IDENTITY_GRACE
    from cttrace.rules.dead_endpoint import DEAD_AFTER
    from cttrace.rules.late_establish import LATE_AFTER

    seen: list[cttrace.watch.WatchOptions] = []

    def fake_run_watch(opts: cttrace.watch.WatchOptions, stop: threading.Event) -> None:
        seen.append(opts)

    monkeypatch.setattr(cttrace.watch, "run_watch", fake_run_watch)
    res = CliRunner().invoke(app, ["watch", "--late-after", "2.5", "--dead-after", "7",
                                   "--source", "netlink", "-o", "json"])
    assert res.exit_code == 0, res.output
    settings = Settings.of(seen[0].rule_settings)
    assert (settings[LATE_AFTER], settings[DEAD_AFTER]) == (2.5, 7.0)
    assert settings[IDENTITY_GRACE] == IDENTITY_GRACE.default == 5.0
    assert seen[0].source == "netlink"
