"""Alert building and the delivery book's timing rules, on made-up findings and times."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from cttrace.events import Flow
from cttrace.findings import Finding, Severity, rfc3339
from cttrace.identity.model import PodRef, ServiceRef
from cttrace.sinks.alertmanager import (
    ALERT_NAMES,
    AlertBook,
    AlertmanagerConfigError,
    alerts_url,
    finding_to_alert,
    label_key,
)

T0 = 1_790_000_000.0
A = "http://am-0:9093/api/v2/alerts"
B = "http://am-1:9093/api/v2/alerts"


def wrong_pod(sport: int = 40000, ts: float = T0) -> Finding:
    return Finding(
        rule="wrong-pod",
        severity=Severity.CRITICAL,
        ts=ts,
        orig=Flow("10.0.1.5", sport, "10.96.0.10", 80),
        target=("10.0.2.7", 8080),
        summary="shop/web-1 connected to shop/cart and reached billing/api-0",
        created_ts=ts - 42.5,
        replied_ts=ts,
        client=PodRef("u1", "shop", "web-1"),
        service=ServiceRef("shop", "cart"),
        old_owner=PodRef("u2", "shop", "cart-0"),
        new_owner=PodRef("u3", "billing", "api-0"),
    )


def labels(alert: dict[str, object]) -> dict[str, str]:
    value = alert["labels"]
    assert isinstance(value, dict)
    return value


def notes_of(alert: dict[str, object]) -> dict[str, str]:
    value = alert["annotations"]
    assert isinstance(value, dict)
    return value


def test_wrong_pod_alert_carries_every_name_an_operator_routes_and_acts_on() -> None:
    alert = finding_to_alert(wrong_pod(), "node-a", "http://node-a:19808/")
    assert labels(alert) == {
        "alertname": "CttraceWrongPod",
        "severity": "critical",
        "node": "node-a",
        "namespace": "shop",
        "service": "cart",
        "client_pod": "shop/web-1",
        "old_pod": "shop/cart-0",
        "new_pod": "billing/api-0",
        "tuple": "10.0.1.5:40000->10.96.0.10:80",
    }
    notes = notes_of(alert)
    assert notes["tuple"] == "10.0.1.5:40000->10.96.0.10:80"
    assert notes["target"] == "10.0.2.7:8080"
    assert notes["unreplied_s"] == "42.5"
    # who and what (the finding's sentence, the node) and what to do (a command to run)
    assert notes["summary"].startswith("shop/web-1 connected to shop/cart and reached")
    assert "node-a" in notes["summary"]
    assert "conntrack -D -p tcp -s 10.0.1.5 --sport 40000 -d 10.96.0.10 --dport 80" in (
        notes["summary"])
    assert alert["generatorURL"] == "http://node-a:19808/"
    assert "endsAt" not in alert  # firing
    starts = dt.datetime.fromisoformat(str(alert["startsAt"]).replace("Z", "+00:00"))
    assert starts.timestamp() == pytest.approx(T0)


def test_unknown_names_are_left_out_not_sent_empty() -> None:
    finding = Finding(rule="late-establish", severity=Severity.WARNING, ts=T0,
                      orig=Flow("10.0.1.5", 40000, "10.96.0.10", 80), target=("10.0.2.7", 80),
                      summary="entry stayed unreplied")
    got = labels(finding_to_alert(finding, "node-a", ""))
    assert set(got) == {"alertname", "severity", "node", "tuple"}
    assert "generatorURL" not in finding_to_alert(finding, "node-a", "")
    assert "unreplied_s" not in notes_of(finding_to_alert(finding, "node-a", ""))


def test_ipv6_tuples_are_bracketed() -> None:
    finding = Finding(rule="dead-endpoint", severity=Severity.WARNING, ts=T0,
                      orig=Flow("fd00::5", 40000, "fd00:96::a", 443), target=("fd00:2::7", 8443),
                      summary="gone")
    alert = finding_to_alert(finding, "n", "")
    assert labels(alert)["tuple"] == "[fd00::5]:40000->[fd00:96::a]:443"
    assert notes_of(alert)["target"] == "[fd00:2::7]:8443"
    assert "conntrack -D -f ipv6 -p tcp -s fd00::5" in notes_of(alert)["summary"]


def test_counter_based_finding_has_one_alert_per_node() -> None:
    # snat-collision findings come from counters and carry no tuple
    finding = Finding(rule="snat-collision", severity=Severity.CRITICAL, ts=T0,
                      orig=None, target=None,
                      summary="conntrack insert_failed +3, drop +3 in 10.0 s")
    alert = finding_to_alert(finding, "node-a", "")
    assert labels(alert) == {"alertname": "CttraceSnatCollision", "severity": "critical",
                             "node": "node-a"}
    assert set(notes_of(alert)) == {"summary"}
    assert "--random-fully" in notes_of(alert)["summary"]


def test_every_rule_has_its_alertname() -> None:
    # The alert names are a contract with users' Alertmanager routes: they never change.
    assert ALERT_NAMES == {
        "wrong-pod": "CttraceWrongPod",
        "inherited-entry": "CttraceInheritedEntry",
        "late-establish": "CttraceLateEstablish",
        "dead-endpoint": "CttraceDeadEndpoint",
        "unnated-reply": "CttraceUnnatedReply",
        "snat-collision": "CttraceSnatCollision",
    }


def test_distinct_connections_are_distinct_alerts() -> None:
    one = finding_to_alert(wrong_pod(40000), "n", "")
    two = finding_to_alert(wrong_pod(40001), "n", "")
    again = finding_to_alert(wrong_pod(40000, ts=T0 + 5), "n", "")
    assert label_key(labels(one)) != label_key(labels(two))
    assert label_key(labels(one)) == label_key(labels(again))


@pytest.mark.parametrize(("given", "expected"), [
    ("http://am:9093", "http://am:9093/api/v2/alerts"),
    ("http://am:9093/", "http://am:9093/api/v2/alerts"),
    ("https://mon.example/alertmanager/", "https://mon.example/alertmanager/api/v2/alerts"),
    ("http://am:9093/api/v2/alerts", "http://am:9093/api/v2/alerts"),
])
def test_alerts_url_appends_the_v2_path(given: str, expected: str) -> None:
    assert alerts_url(given) == expected


@pytest.mark.parametrize("bad", ["am:9093", "ftp://am", "http://", ""])
def test_bad_alertmanager_url_is_a_user_error(bad: str) -> None:
    with pytest.raises(AlertmanagerConfigError, match="expected http"):
        alerts_url(bad)


# -- the book: what each Alertmanager is sent, and when ---------------------------------


def book(urls: tuple[str, ...] = (A,), capacity: int = 100) -> AlertBook:
    return AlertBook(urls, resend_interval=60.0, hold=300.0, capacity=capacity)


def add(b: AlertBook, finding: Finding, now: float) -> bool:
    """File ``finding``; True when nothing had to be dropped for it."""
    return b.add(finding_to_alert(finding, "n", ""), starts_at=finding.ts, now=now) is None


def late(sport: int, ts: float = T0) -> Finding:
    """A warning (late-establish) with the client port ``sport``."""
    return dataclasses.replace(wrong_pod(sport, ts), rule="late-establish",
                               severity=Severity.WARNING)


def test_new_alert_goes_to_every_alertmanager_then_is_resent_on_the_interval() -> None:
    b = book((A, B))
    assert add(b, wrong_pod(), T0)
    for url in (A, B):
        sending = b.due(url, T0, limit=10)
        assert [s.resolves for s in sending] == [False]
        assert "endsAt" not in sending[0].wire
        b.accepted(url, sending, T0)
    assert b.due(A, T0 + 59, limit=10) == []
    assert b.next_due(A, T0 + 1) == T0 + 60
    resend = b.due(A, T0 + 60, limit=10)
    assert [s.resolves for s in resend] == [False]


def test_one_shot_alert_resolves_after_hold_and_is_then_forgotten() -> None:
    b = book((A, B))
    add(b, wrong_pod(), T0)
    for url in (A, B):
        b.accepted(url, b.due(url, T0, limit=10), T0)
    now = T0 + 300
    for url in (A, B):
        sending = b.due(url, now, limit=10)
        assert [s.resolves for s in sending] == [True]
        assert sending[0].wire["endsAt"] == rfc3339(T0 + 300)
        assert len(b) == 1  # kept until every Alertmanager has the resolution
        b.accepted(url, sending, now)
    assert len(b) == 0
    assert b.next_due(A, now) is None


def test_alertmanager_down_longer_than_hold_still_gets_the_firing_alert_first() -> None:
    b = book((A, B))
    add(b, wrong_pod(), T0)
    b.accepted(A, b.due(A, T0, limit=10), T0)
    # B is unreachable for 400 s, longer than the hold
    late = T0 + 400
    assert [s.resolves for s in b.due(A, late, limit=10)] == [True]
    sending = b.due(B, late, limit=10)
    assert [s.resolves for s in sending] == [False]  # it never saw it fire: fire first
    b.accepted(B, sending, late)
    # ...and it stays firing there for a full hold from when B accepted it
    assert [s.resolves for s in b.due(B, late + 299, limit=10)] == [False]
    assert b.due(B, late + 300, limit=10)[0].wire["endsAt"] == rfc3339(late + 300)


def test_repeated_finding_extends_the_hold() -> None:
    b = book()
    add(b, wrong_pod(), T0)
    b.accepted(A, b.due(A, T0, limit=10), T0)
    add(b, wrong_pod(ts=T0 + 200), T0 + 200)
    assert len(b) == 1
    due = b.due(A, T0 + 300, limit=10)
    assert [s.resolves for s in due] == [False]  # a re-send, not a resolution
    assert due[0].wire["startsAt"] == rfc3339(T0)  # the same occurrence
    assert b.due(A, T0 + 500, limit=10)[0].resolves


def test_finding_after_resolution_fires_a_new_occurrence() -> None:
    b = book()
    add(b, wrong_pod(), T0)
    b.accepted(A, b.due(A, T0, limit=10), T0)
    stale = b.due(A, T0 + 300, limit=10)  # the resolution is in flight...
    add(b, wrong_pod(ts=T0 + 301), T0 + 301)  # ...when the same connection goes wrong again
    b.accepted(A, stale, T0 + 302)  # the late acceptance of the old resolution is ignored
    due = b.due(A, T0 + 302, limit=10)
    assert [s.resolves for s in due] == [False]
    assert due[0].wire["startsAt"] == rfc3339(T0 + 301)


def test_full_book_refuses_new_alerts_but_refreshes_held_ones() -> None:
    b = book(capacity=2)
    assert add(b, wrong_pod(1), T0)
    assert add(b, wrong_pod(2), T0)
    dropped = b.add(finding_to_alert(wrong_pod(3), "n", ""), starts_at=T0, now=T0)
    assert dropped is not None and dropped["tuple"].endswith(":3->10.96.0.10:80")
    assert add(b, wrong_pod(1), T0 + 1)
    assert len(b) == 2


def test_delivered_alerts_kept_for_resending_do_not_take_an_undelivered_ones_room() -> None:
    b = book((A, B), capacity=1)
    assert add(b, wrong_pod(1), T0)
    assert b.undelivered() == 1
    b.accepted(A, b.due(A, T0, limit=10), T0)
    assert b.undelivered() == 1  # B has not accepted it yet
    b.accepted(B, b.due(B, T0, limit=10), T0)
    assert b.undelivered() == 0
    assert add(b, wrong_pod(2), T0 + 5)  # room: the first is delivered, only re-sent
    assert len(b) == 2
    assert [s.resolves for s in b.due(A, T0 + 60, limit=10)] == [False, False]


def test_a_full_book_drops_the_least_severe_first() -> None:
    b = book(capacity=2)
    assert add(b, late(1), T0)
    assert add(b, late(2), T0)
    dropped = b.add(finding_to_alert(wrong_pod(3), "n", ""), starts_at=T0, now=T0)
    assert dropped is not None
    assert (dropped["alertname"], dropped["severity"]) == ("CttraceLateEstablish", "warning")
    assert dropped["tuple"].endswith(":2->10.96.0.10:80")  # the newest warning
    assert not add(b, late(4), T0)  # a warning among a warning and a critical: dropped
    assert not add(b, wrong_pod(5), T0)  # a critical displaces the last warning
    assert len(b) == 2
    assert sorted(s.wire["labels"]["severity"] for s in b.due(A, T0, limit=10)  # type: ignore[index]
                  ) == ["critical", "critical"]


def test_delivered_alerts_are_bounded_too() -> None:
    b = book(capacity=2)
    for sport in range(5):
        assert add(b, wrong_pod(sport), T0)
        b.accepted(A, b.due(A, T0, limit=10), T0)
    assert len(b) == 2 and b.undelivered() == 0 and b.released == 3


def test_due_is_batched() -> None:
    b = book()
    for sport in range(5):
        add(b, wrong_pod(sport), T0)
    first = b.due(A, T0, limit=2)
    assert len(first) == 2
    b.accepted(A, first, T0)
    assert b.unsent(A) == 3
    assert len(b.due(A, T0, limit=10)) == 3


def test_resolution_never_ends_before_it_starts() -> None:
    # a finding stamped ahead of the sink's clock (clock skew) still yields a valid alert
    b = AlertBook((A,), resend_interval=60.0, hold=0.0, capacity=10)
    add(b, wrong_pod(ts=T0 + 10), T0)
    b.accepted(A, b.due(A, T0, limit=10), T0)
    wire = b.due(A, T0, limit=10)[0].wire
    assert wire["endsAt"] == wire["startsAt"]
