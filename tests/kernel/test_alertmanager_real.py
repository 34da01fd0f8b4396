"""The Alertmanager sink against real Alertmanagers (Debian's prometheus-alertmanager).

What a user relies on: the alert shows up in Alertmanager's own API with the
labels routes and silences match on; an Alertmanager that is down while a
finding happens still gets it when it comes back; a full queue drops (and
counts) only the excess, the least severe first, in a JSON log line; a one-shot
alert resolves after its hold.
"""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from cttrace.events import Flow
from cttrace.findings import Finding, Severity
from cttrace.identity.model import PodRef, ServiceRef
from cttrace.json_log import logging_to
from cttrace.sinks.alertmanager import AlertmanagerSink
from cttrace.sinks.jsonl import JsonLinesSink
from tests.fixtures.alertmanager import Alertmanager, alertmanager  # noqa: F401 (fixture)

pytestmark = pytest.mark.kernel


def wrong_pod(sport: int = 40000) -> Finding:
    now = time.time()
    return Finding(
        rule="wrong-pod",
        severity=Severity.CRITICAL,
        ts=now,
        orig=Flow("10.0.1.5", sport, "10.96.0.10", 80),
        target=("10.0.2.7", 8080),
        summary="shop/web-1 connected to shop/cart and reached billing/api-0",
        created_ts=now - 31.0,
        replied_ts=now,
        client=PodRef("u1", "shop", "web-1"),
        service=ServiceRef("shop", "cart"),
        old_owner=PodRef("u2", "shop", "cart-0"),
        new_owner=PodRef("u3", "billing", "api-0"),
    )


def wait_until(condition: Callable[[], bool], what: str, deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def make_sink() -> Iterator[Callable[..., AlertmanagerSink]]:
    made: list[AlertmanagerSink] = []

    def make(urls: list[str], **kwargs: object) -> AlertmanagerSink:
        options: dict[str, object] = {"node": "node-a", "generator_url": "http://node-a:19808/",
                                      "backoff_initial": 0.1, "backoff_max": 0.5}
        options.update(kwargs)
        made.append(AlertmanagerSink(urls, **options))  # type: ignore[arg-type]
        made[-1].start()
        return made[-1]

    yield make
    for s in made:
        s.close(1)


def test_alert_reaches_every_alertmanager_with_its_labels(
        alertmanager: Alertmanager, tmp_path: Path,  # noqa: F811 (fixture)
        make_sink: Callable[..., AlertmanagerSink]) -> None:
    second = Alertmanager(tmp_path / "second")
    second.start()
    try:
        sink = make_sink([alertmanager.url, second.url])
        sink.submit(wrong_pod())
        for am in (alertmanager, second):
            alert = am.wait_for_alert({"alertname": "CttraceWrongPod"})
            assert alert["labels"] == {
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
            assert alert["status"]["state"] == "active"  # type: ignore[index]
            assert alert["generatorURL"] == "http://node-a:19808/"
            notes = alert["annotations"]
            assert isinstance(notes, dict)
            assert notes["target"] == "10.0.2.7:8080" and notes["unreplied_s"] == "31"
            assert "billing/api-0" in notes["summary"]
    finally:
        second.stop()


def test_alert_submitted_during_an_outage_arrives_when_alertmanager_returns(
        alertmanager: Alertmanager,  # noqa: F811 (fixture)
        make_sink: Callable[..., AlertmanagerSink]) -> None:
    alertmanager.stop()
    sink = make_sink([alertmanager.url])
    sink.submit(wrong_pod())
    # The outage lasts until the sink has retried several times (a few seconds with this
    # backoff cap): the alert waits in the queue meanwhile.
    wait_until(lambda: sink.stats()["failed"] >= 5, "the sink to retry against the outage")
    alertmanager.start()
    alertmanager.wait_for_alert({"alertname": "CttraceWrongPod",
                                 "tuple": "10.0.1.5:40000->10.96.0.10:80"})
    stats = sink.stats()
    assert stats["dropped"] == 0 and stats["sent"] >= 1 and stats["retries"] >= 5


def test_queue_bound_drops_only_the_excess(
        alertmanager: Alertmanager,  # noqa: F811 (fixture)
        make_sink: Callable[..., AlertmanagerSink]) -> None:
    alertmanager.stop()
    sink = make_sink([alertmanager.url], queue_max=3)
    for sport in range(5):
        sink.submit(wrong_pod(40000 + sport))
    assert sink.stats()["dropped"] == 2
    sink.submit(wrong_pod(40000))  # the same connection again refreshes a held alert
    assert sink.stats()["dropped"] == 2
    alertmanager.start()
    alerts = alertmanager.wait_for(lambda found: len(found) >= 3, what="three alerts")
    wait_until(lambda: sink.stats()["sent"] >= 3, "the sink to count the deliveries")
    assert sorted(a["labels"]["tuple"] for a in alerts) == [  # type: ignore[index]
        f"10.0.1.5:{40000 + i}->10.96.0.10:80" for i in range(3)]
    assert sink.stats()["queue_depth"] == 3


def test_a_critical_displaces_an_undelivered_warning_and_the_drop_is_a_json_line(
        alertmanager: Alertmanager,  # noqa: F811 (fixture)
        make_sink: Callable[..., AlertmanagerSink]) -> None:
    alertmanager.stop()
    out = io.BytesIO()
    log = JsonLinesSink(out)  # the agent's stdout: one JSON object per line
    sink = make_sink([alertmanager.url], queue_max=1)
    warning = dataclasses.replace(wrong_pod(40001), rule="late-establish",
                                  severity=Severity.WARNING)
    with logging_to(log.note):
        sink.submit(warning)
        wait_until(lambda: sink.stats()["failed"] >= 1, "a failed delivery of the warning")
        sink.submit(wrong_pod(40002))  # the queue holds one undelivered alert: the warning
    (line,) = [orjson.loads(raw) for raw in out.getvalue().splitlines()
               if b'"dropped"' in raw]
    assert line["kind"] == "log" and line["level"] == "warning"
    assert line["dropped"]["alertname"] == "CttraceLateEstablish"
    assert line["dropped"]["tuple"] == "10.0.1.5:40001->10.96.0.10:80"
    assert sink.stats()["dropped"] == 1

    alertmanager.start()
    alertmanager.wait_for_alert({"alertname": "CttraceWrongPod",
                                 "tuple": "10.0.1.5:40002->10.96.0.10:80"})
    wait_until(lambda: sink.stats()["sent"] >= 1, "the sink to count the delivery")
    assert alertmanager.alerts({"alertname": "CttraceLateEstablish"}) == []


def test_one_shot_alert_resolves_after_its_hold(
        alertmanager: Alertmanager,  # noqa: F811 (fixture)
        make_sink: Callable[..., AlertmanagerSink]) -> None:
    sink = make_sink([alertmanager.url], hold=2.0)
    sink.submit(wrong_pod())
    labels = {"alertname": "CttraceWrongPod"}
    alertmanager.wait_for_alert(labels)
    # Alertmanager lists only unresolved alerts: the resolved one (endsAt passed) drops out.
    alertmanager.wait_for(lambda found: found == [], labels=labels, what="the resolution")
    wait_until(lambda: sink.stats()["queue_depth"] == 0, "the sink to forget the alert")
