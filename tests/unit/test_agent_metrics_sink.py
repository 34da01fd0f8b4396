"""The agent's metrics sink turns the source's and identity's cumulative counts into counters;
the Alertmanager sink says how many alerts an exit would leave undelivered."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry

from cttrace.agent import MetricsSink
from cttrace.events import Flow
from cttrace.findings import Finding, Severity
from cttrace.metrics import Metrics
from cttrace.runtime import Status
from cttrace.sinks.alertmanager import AlertmanagerSink
from cttrace.sources import SourceStats


class FakeWatch:
    def __init__(self) -> None:
        self.restarts = 0
        self.in_sync = True

    def poll(self) -> int:
        return 0

    def stats(self) -> dict[str, int]:
        return {"watch_restarts": self.restarts, "lists": 1}


def status(lost: int) -> Status:
    return Status(ts=0.0, source="netlink", events=10, events_per_s=1.0, lost=lost,
                  tracked=2, findings=0, identity="in sync")


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_lost_events_and_watch_restarts_become_counters() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.add_source("netlink", SourceStats)
    watch = FakeWatch()
    sink = MetricsSink(metrics, [watch, object()])  # a poller without stats() is fine
    assert value(registry, "cttrace_lost_events_total", source="netlink") == 0
    sink.status(status(lost=0))
    sink.status(status(lost=5))
    watch.restarts = 2
    sink.status(status(lost=5))  # cumulative: no new loss
    sink.status(status(lost=12))
    assert value(registry, "cttrace_lost_events_total", source="netlink") == 12
    assert value(registry, "cttrace_identity_watch_restarts_total") == 2
    assert value(registry, "cttrace_tracked_entries") == 2


def test_undelivered_counts_alerts_no_alertmanager_accepted() -> None:
    sink = AlertmanagerSink(["http://127.0.0.1:9"], node="n", generator_url="")
    now = time.time()
    for sport in (40000, 40001):
        sink.submit(Finding(rule="wrong-pod", severity=Severity.CRITICAL, ts=now,
                            orig=Flow("10.0.1.5", sport, "10.96.0.10", 80),
                            target=("10.0.2.7", 8080), summary="s"))
    assert sink.undelivered() == 2 and sink.stats()["queue_depth"] == 2
    sink.close(0)
