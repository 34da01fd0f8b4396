"""``cttrace agent``: the long-running node agent (one privileged pod per node).

The same source, identity and correlator as ``watch``, plus what production
needs: structured JSON logs on stdout, Prometheus metrics and health probes on
``--listen``, Alertmanager alerts, and a shutdown that detaches the probes and
flushes the alert queue within a deadline.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from cttrace.agent_options import AgentOptions
from cttrace.assemble import (
    build_remediator,
    build_tracing,
    snat_check,
    warn,
)
from cttrace.blind_spots import TracedNamespace, blind_spot_checks
from cttrace.events import Event
from cttrace.findings import Finding, rfc3339
from cttrace.http_server import AgentHTTPServer
from cttrace.json_log import logging_to
from cttrace.metrics import Metrics
from cttrace.remediate import Remediation
from cttrace.runtime import Periodic, Pipeline, Sink, Status
from cttrace.sinks.jsonl import JsonLinesSink
from cttrace.sources import hooks_json
from cttrace.sources.bpf import settings_for_rules
from cttrace.sources.select import open_source
from cttrace.sources.watched import follow_targets


def default_node() -> str:
    """NODE_NAME (the DaemonSet sets it from spec.nodeName), else the host name."""
    return os.environ.get("NODE_NAME") or socket.gethostname()


class MetricsSink:
    """Feeds the Prometheus counters from the pipeline.

    Lost events and identity watch restarts are cumulative counts kept by the
    source and the identity pollers; each status turns their growth into counter
    increments (a status comes every second, and once more at the end).
    """

    def __init__(self, metrics: Metrics, pollers: Sequence[object] = ()) -> None:
        self.metrics = metrics
        self._pollers = list(pollers)
        self._lost = 0
        self._restarts = 0
        self._evicted: dict[str, int] = {}

    def finding(self, finding: Finding) -> None:
        self.metrics.finding(finding)

    def event(self, event: Event) -> None:
        kind = getattr(event, "kind", None)
        self.metrics.event(getattr(event, "source", "?"),
                           kind.name.lower() if kind is not None else type(event).__name__)

    def status(self, status: Status) -> None:
        self.metrics.set_tracked(status.tracked)
        self.metrics.identity_sync(status.identity != "syncing")
        for reason, n in status.evicted.items():
            if n > self._evicted.get(reason, 0):
                self.metrics.evicted(reason, n - self._evicted.get(reason, 0))
                self._evicted[reason] = n
        if status.lost > self._lost:
            self.metrics.lost(status.source, status.lost - self._lost)
            self._lost = status.lost
        restarts = 0
        for poller in self._pollers:
            stats = getattr(poller, "stats", None)
            if stats is not None:
                restarts += int(stats().get("watch_restarts", 0))
        if restarts > self._restarts:
            self.metrics.watch_restart(restarts - self._restarts)
            self._restarts = restarts

    def close(self) -> None:
        pass


def run_agent(opts: AgentOptions, stop: threading.Event) -> None:
    log = JsonLinesSink(sys.stdout.buffer, status_every=60.0)
    with logging_to(log.note):
        _run_agent(opts, stop, log)


def _run_agent(opts: AgentOptions, stop: threading.Event, log: JsonLinesSink) -> None:
    node = opts.node or default_node()
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    correlator, pollers = build_tracing(opts)
    correlator.on_first_reply = metrics.first_reply
    alerts = None
    attached = threading.Event()
    traced: TracedNamespace | None = None

    def healthy() -> tuple[bool, str]:
        if not attached.is_set():
            return False, "source not attached"
        gone = traced.gone() if traced is not None else None
        return (False, f"source gone: {gone}") if gone else (True, "source attached")

    def ready() -> tuple[bool, str]:
        alive, why = healthy()
        if not alive:
            return False, why
        if pollers and not all(p.in_sync for p in pollers):
            return False, "identity not in sync yet"
        return True, "ready"

    http = AgentHTTPServer(opts.listen, registry, healthy=healthy, ready=ready)
    http.start()
    source = None
    try:
        if opts.alertmanager_urls:
            from cttrace.sinks.alertmanager import AlertmanagerSink

            # The bound port, not the --listen text: ":0" lets the kernel pick one.
            alerts = AlertmanagerSink(
                opts.alertmanager_urls, node=node,
                generator_url=opts.generator_url or f"http://{node}:{http.address[1]}/",
                resend_interval=opts.resend_interval, hold=opts.alert_hold,
                queue_max=opts.alert_queue, basic_auth=opts.basic_auth,
                bearer_token=opts.bearer_token, ca_file=opts.ca_file,
            )
        source, note = open_source(opts.source, opts.netns,
                                   settings_for_rules(correlator.settings))
        traced = TracedNamespace(opts.netns)
        targets = follow_targets(correlator.identity, source, opts.netns)
        metrics.add_source(source.name, source.stats)
        from cttrace.ctstats import read_conntrack_stats
        from cttrace.metrics import read_conntrack_fill

        netns = opts.netns  # every conntrack series is the traced namespace's
        metrics.add_conntrack(lambda: read_conntrack_stats(netns),
                              lambda: read_conntrack_fill(netns))
        sinks: list[Sink] = [log, MetricsSink(metrics, pollers)]
        if alerts is not None:
            metrics.add_alertmanager(alerts.stats)
            alerts.start()
            sinks.append(alerts)
        attached.set()  # before "started": a reader of that line finds /healthz true
        log.note({"kind": "agent", "ts": rfc3339(time.time()), "msg": "started", "node": node,
                  "source": source.name, "fallback": note, "netns": opts.netns,
                  "listen": "{}:{}".format(*http.address),
                  "alertmanagers": opts.alertmanager_urls, **hooks_json(source.stats())})
        periodic = [snat_check(opts.netns, source), *blind_spot_checks(traced, log.note)]
        if targets is not None:
            periodic.append(Periodic(1.0, targets.expire))

        def record(r: Remediation) -> None:
            metrics.remediation(r.action)
            log.note(r.to_json())

        remediator = build_remediator(opts.remediate, correlator, opts.netns, record)
        if remediator is not None:
            periodic.append(remediator)
        pipeline = Pipeline(source, correlator, sinks, pollers, periodic=periodic,
                            on_warning=log.note)
        summary = pipeline.run(stop, ready_file=opts.ready_file)
        log.note({"kind": "summary", "ts": rfc3339(time.time()), "events": summary.events,
                  "lost": summary.lost, "findings": dict(summary.findings),
                  "seconds": round(summary.seconds, 3)})
    finally:
        attached.clear()
        deadline = time.monotonic() + opts.shutdown_deadline
        if source is not None:
            source.close()  # detach first: nothing new arrives while we flush
        if alerts is not None:
            alerts.close(max(0.0, deadline - time.monotonic()))
            left = alerts.undelivered()
            if left:
                warn(f"{left} alerts not delivered to every Alertmanager by the shutdown "
                     "deadline (--shutdown-deadline)")
        for poller in pollers:
            close = getattr(poller, "close", None)
            if close is not None:
                close()
        http.stop()
        if opts.ready_file is not None:
            opts.ready_file.unlink(missing_ok=True)
