"""IPv6 address and port are written ``[addr]:port`` in every place a person reads them.

One set of IPv6 findings (every rule whose summary names an address and port)
goes through each sink: the JSON lines a pipe reads, the live table, the
Alertmanager annotations and ``cttrace explain``. None may print the ambiguous
``fd00:100::37:12:80``.
"""

from __future__ import annotations

import io
import re

import orjson
import pytest
from rich.console import Console

from cttrace.addr import canonical, endpoint, flow_text
from cttrace.correlator import Correlator, Settings
from cttrace.errors import UserError
from cttrace.events import CtKind, Flow, SockConnect, TcpReset, TcpState
from cttrace.explain import matches, render, timeline
from cttrace.filters import Filter
from cttrace.findings import Finding
from cttrace.sinks.alertmanager import finding_to_alert
from cttrace.sinks.jsonl import JsonLinesSink
from cttrace.sinks.live import LiveView
from tests.unit.fake_identity import FakeIdentity
from tests.unit.test_correlator import (
    CART,
    CART_A,
    CLIENT,
    LEDGER,
    LEDGER_B,
    REPLIED,
    ct,
    run,
)

CLIENT6, VIP6, POD6 = "fd00:10:1::a", "fd00:100::37:12", "fd00:10:1::c"
ORIG6 = Flow(CLIENT6, 40000, VIP6, 80)
REPLY6 = Flow(POD6, 8080, CLIENT6, 40000)
ADDRESSES = (CLIENT6, VIP6, POD6)


def ipv6_findings() -> tuple[Correlator, list[Finding]]:
    """wrong-pod, late-establish, inherited-entry, unnated-reply and dead-endpoint, all over
    IPv6, from one correlator (so that its entry table holds IPv6 entries too)."""
    ident = FakeIdentity()
    ident.hold(CLIENT6, CLIENT, 0.0)
    ident.hold(POD6, CART_A, 0.0, 10.0)
    ident.hold(POD6, LEDGER_B, 12.0)
    ident.service(VIP6, 80, CART)
    ident.endpoint(CART, POD6, CART_A.uid, 0.0, 10.0)
    ident.endpoint(LEDGER, POD6, LEDGER_B.uid, 12.0)
    corr = Correlator(Settings(dead_after=5.0), identity=ident)

    def entry(entry_id: int, sport: int) -> tuple[Flow, Flow]:
        return ORIG6._replace(sport=sport), REPLY6._replace(dport=sport)

    recycled_o, recycled_r = entry(1, 40000)
    inherit_o, inherit_r = entry(2, 40001)
    reset_o, reset_r = entry(3, 40002)
    out = corr.feed(SockConnect(8.99, inherit_o, 100, "client", 42, 1, 0xA), 8.99)
    out += run(corr, [
        ct(CtKind.NEW, 9.0, TcpState.SYN_SENT, orig=recycled_o, reply=recycled_r),
        ct(CtKind.NEW, 9.0, TcpState.SYN_SENT, entry_id=2, orig=inherit_o, reply=inherit_r),
        ct(CtKind.NEW, 9.0, TcpState.SYN_SENT, entry_id=3, orig=reset_o, reply=reset_r),
        ct(CtKind.UPDATE, 14.0, TcpState.SYN_RECV, REPLIED, orig=recycled_o, reply=recycled_r),
        ct(CtKind.UPDATE, 14.001, TcpState.ESTABLISHED, REPLIED, orig=recycled_o,
           reply=recycled_r),
    ])
    out += corr.feed(SockConnect(14.5, inherit_o, 200, "client", 42, 1, 0xB), 14.5)
    out += corr.feed(TcpReset(14.6, Flow(CLIENT6, 40002, POD6, 8080), sent=True, pid=7,
                              comm="curl"), 14.6)
    ident.release(POD6, LEDGER_B, 20.0)
    out += corr.tick(30.0)
    return corr, out


def assert_bracketed(text: str) -> None:
    for ip in ADDRESSES:
        assert not re.search(rf"(?<!\[){re.escape(ip)}:\d", text), f"bare {ip}:port in {text!r}"


@pytest.fixture(scope="module")
def findings() -> list[Finding]:
    _, out = ipv6_findings()
    assert {str(f.rule) for f in out} >= {"wrong-pod", "late-establish", "inherited-entry",
                                          "unnated-reply", "dead-endpoint"}
    return out


def test_the_helper_brackets_ipv6_only() -> None:
    assert endpoint("10.0.0.5", 443) == "10.0.0.5:443"
    assert endpoint("fd00:100::7:7", 443) == "[fd00:100::7:7]:443"
    assert flow_text(ORIG6) == "[fd00:10:1::a]:40000 -> [fd00:100::37:12]:80"
    assert flow_text(Flow("10.0.0.5", 1, "10.96.0.1", 2), "->") == "10.0.0.5:1->10.96.0.1:2"
    assert canonical("FD00:0:0::5") == "fd00::5"
    with pytest.raises(ValueError):
        canonical("fd00::5:443:1:2:3:4:5:6")


def test_finding_summaries(findings: list[Finding]) -> None:
    wrong_pod = next(f for f in findings if str(f.rule) == "wrong-pod")
    assert "Service shop/cart ([fd00:100::37:12]:80)" in wrong_pod.summary
    assert "[fd00:10:1::c]:8080" in wrong_pod.summary
    for f in findings:
        assert_bracketed(f.summary)


def test_json_lines_keep_bare_addresses_in_fields_and_brackets_in_summaries(
        findings: list[Finding]) -> None:
    out = io.BytesIO()
    sink = JsonLinesSink(out)
    for f in findings:
        sink.finding(f)
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == len(findings)
    for obj in lines:
        assert_bracketed(obj["summary"])
        assert obj["orig"]["dst"] == VIP6  # fields stay machine-readable, no brackets
    assert any(obj["target"] == {"ip": POD6, "port": 8080} for obj in lines)


def test_live_view_table_findings_and_narration() -> None:
    corr, out = ipv6_findings()
    text = io.StringIO()
    # No identity: the table falls back to addresses, which is what must be bracketed.
    view = LiveView(corr, None, console=Console(file=text, width=400, force_terminal=False))
    view.say("lab: [fd00:10:1::a]:40000 -> [fd00:100::37:12]:80")  # demo narration
    for f in out:
        view.finding(f)
    view.close()
    shown = text.getvalue()
    assert "lab: [fd00:10:1::a]:40000 -> [fd00:100::37:12]:80" in shown
    # Both tables: the flows' client/service cells and the findings' summaries.
    assert "[fd00:10:1::a]:40001" in shown and "to [fd00:10:1::c]:8080" in shown
    assert_bracketed(shown)


def test_alertmanager_annotations_and_labels(findings: list[Finding]) -> None:
    for f in findings:
        alert = finding_to_alert(f, "node-a", "")
        notes = alert["annotations"]
        assert isinstance(notes, dict)
        for value in notes.values():
            assert_bracketed(str(value))
        if f.target[0]:
            assert notes["target"] == "[fd00:10:1::c]:8080"
        labels = alert["labels"]
        assert isinstance(labels, dict)
        assert str(labels["tuple"]).startswith("[fd00:10:1::a]:400")


def test_explain_timeline_and_tuple_selection(findings: list[Finding]) -> None:
    wrong_pod = orjson.loads(orjson.dumps(
        next(f for f in findings if str(f.rule) == "wrong-pod").to_json()))
    text = render(timeline(wrong_pod))
    assert "[fd00:10:1::a]:40000 -> [fd00:100::37:12]:80" in text
    assert "first reply from [fd00:10:1::c]:8080" in text
    assert_bracketed(text)
    assert matches(wrong_pod, tuple_text="[fd00:10:1::a]:40000", entry_id=None, rule=None)
    assert matches(wrong_pod, tuple_text="[fd00:10:1::a]:40000->[fd00:100::37:12]:80",
                   entry_id=None, rule=None)
    assert not matches(wrong_pod, tuple_text="[fd00:10:1::a]:40001", entry_id=None, rule=None)


def test_ip_filter_matches_any_spelling_and_refuses_nonsense(findings: list[Finding]) -> None:
    flt = Filter.build(ips=["FD00:100:0::37:12"])
    assert all(flt.finding(f) for f in findings if f.orig.src)
    with pytest.raises(UserError, match="--ip: 'fd00::zz' is not an IP address"):
        Filter.build(ips=["fd00::zz"])
