"""Prometheus metrics for `cttrace agent`, all named ``cttrace_*``.

Why it exists: the agent runs unattended on every node, and these series are how
an operator sees that it works (events flowing, nothing lost, identity in sync,
alerts delivered) and how the node's conntrack table is doing.

Two kinds of values:

* counted on the event path through :class:`Metrics` methods (events, lost
  events, findings, the unreplied-age histogram, identity state);
* read at scrape time from callables the runtime registers (source counters,
  the Alertmanager sink's counters, the kernel's conntrack counters). A callable
  that fails with ``OSError``, ``ValueError`` or a ``UserError`` (such as a
  missing ``/proc/net/stat/nf_conntrack``) makes its collector return fewer
  metrics; it never fails the scrape.

Everything is registered on a passed-in ``CollectorRegistry`` so tests use a
fresh one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

import cttrace
from cttrace.entry_table import REASONS
from cttrace.errors import UserError
from cttrace.findings import Finding, Severity
from cttrace.netns import entered_netns
from cttrace.rules import ids
from cttrace.sources import SourceStats

log = logging.getLogger(__name__)

#: Seconds an entry stayed unreplied before its first reply. A healthy reply takes
#: well under 10 ms; a SYN retried against a dead pod waits 1, 3, 7, 15... s (the
#: client's SYN backoff); the kernel gives up after nf_conntrack_tcp_timeout_syn_sent
#: (120 s by default), so the top buckets reach past it.
UNREPLIED_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                     120.0, 300.0)

#: Keys of the Alertmanager sink's ``stats()`` and the metric each becomes.
_ALERTMANAGER_COUNTERS = {
    "sent": ("cttrace_alertmanager_alerts_sent", "Alerts accepted by an Alertmanager "
             "(counted once per Alertmanager, re-sends included)."),
    "failed": ("cttrace_alertmanager_send_failures", "POSTs to an Alertmanager that failed."),
    "retries": ("cttrace_alertmanager_retries", "POSTs retried after a failure."),
    "rejected": ("cttrace_alertmanager_rejected_alerts",
                 "Alerts an Alertmanager refused as invalid (HTTP 400/422)."),
    "dropped": ("cttrace_alertmanager_dropped_alerts",
                "Findings not queued for Alertmanager because the queue was full."),
}

#: Columns of /proc/net/stat/nf_conntrack exported as counters (summed over CPUs).
#: insert_failed and drop grow on SNAT port clashes (nf_ct_resolve_clash() failing in
#: __nf_conntrack_confirm()); early_drop counts evictions when the table is full.
_CONNTRACK_COUNTERS = {
    "insert_failed": "Conntrack entries that failed to insert (clashing NAT tuples).",
    "drop": "Packets conntrack dropped (insert failure or full table).",
    "early_drop": "Entries evicted early to make room in a full table.",
}

StatsReader = Callable[[], Mapping[str, int]]

#: nf_conntrack_count and nf_conntrack_max of the reading thread's network namespace:
#: /proc/sys/net resolves against the opening thread's namespace (net_ctl_header_lookup()
#: reads current->nsproxy->net_ns), so a thread that entered the traced one reads its own.
SYSCTL_DIR = Path("/proc/sys/net/netfilter")


def read_conntrack_fill(netns: str | None = None,
                        sysctl_dir: Path = SYSCTL_DIR) -> dict[str, int]:
    """``{"count": nf_conntrack_count, "max": nf_conntrack_max}`` of the traced namespace
    (``netns``; None: ours). OSError if unreadable, NetnsError if it cannot be entered."""
    with entered_netns(netns):
        return {
            key: int((sysctl_dir / f"nf_conntrack_{key}").read_text())
            for key in ("count", "max")
        }


class Metrics:
    """The agent's metrics. Methods are cheap enough for the event path."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._events = Counter("cttrace_events", "Events delivered by a source, by kind.",
                               ["source", "kind"], registry=registry)
        self._lost = Counter("cttrace_lost_events",
                             "Events a source knows it missed (ENOBUFS, perf buffer overrun).",
                             ["source"], registry=registry)
        self._findings = Counter("cttrace_findings", "Findings, by rule and severity.",
                                 ["rule", "severity"], registry=registry)
        self._tracked = Gauge("cttrace_tracked_entries",
                              "Conntrack entries the correlator is following.",
                              registry=registry)
        self._evicted = Counter(
            "cttrace_evicted_entries",
            "Entries the correlator's full table forgot, by what they were: finished, "
            "answered, unobserved (seen only in a dump) or unreplied (a rule could still "
            "have fired for it).", ["reason"], registry=registry)
        for reason in REASONS:
            self._evicted.labels(reason)
        self._unreplied = Histogram(
            "cttrace_unreplied_seconds",
            "How long a NATed entry stayed unreplied, observed at its first reply.",
            buckets=UNREPLIED_BUCKETS, registry=registry)
        self._identity_in_sync = Gauge(
            "cttrace_identity_in_sync",
            "1 when the identity source delivered a full picture (list done), else 0.",
            registry=registry)
        self._watch_restarts = Counter(
            "cttrace_identity_watch_restarts",
            "Times an identity watch restarted (expired resourceVersion, dropped stream).",
            registry=registry)
        self._remediations = Counter(
            "cttrace_remediations",
            "Conntrack entries --remediate deleted (or would delete, or failed to), by action.",
            ["action"], registry=registry)
        info = Gauge("cttrace_build_info", "Always 1; the version label says which cttrace.",
                     ["version"], registry=registry)
        info.labels(cttrace.__version__).set(1)
        # Every rule and severity is exported from the start (at 0), so that rate() and
        # alert rules see a series before the first finding.
        for rule in ids():
            for severity in Severity:
                self._findings.labels(rule, str(severity))
        self._event_children: dict[tuple[str, str], Any] = {}

    # -- the event path -------------------------------------------------------------

    def event(self, source: str, kind: str) -> None:
        """Count one event of ``kind`` (``new``, ``update``, ``connect``...) from ``source``."""
        child = self._event_children.get((source, kind))
        if child is None:
            child = self._event_children[(source, kind)] = self._events.labels(source, kind)
        child.inc()

    def lost(self, source: str, n: int) -> None:
        self._lost.labels(source).inc(n)

    def finding(self, finding: Finding) -> None:
        self._findings.labels(str(finding.rule), str(finding.severity)).inc()

    def first_reply(self, unreplied_s: float) -> None:
        self._unreplied.observe(unreplied_s)

    def set_tracked(self, n: int) -> None:
        self._tracked.set(n)

    def evicted(self, reason: str, n: int) -> None:
        self._evicted.labels(reason).inc(n)

    def identity_sync(self, in_sync: bool) -> None:
        self._identity_in_sync.set(1 if in_sync else 0)

    def remediation(self, action: str) -> None:
        """Count one ``--remediate`` action: deleted, would-delete or failed."""
        self._remediations.labels(action).inc()

    def watch_restart(self, n: int = 1) -> None:
        self._watch_restarts.inc(n)

    # -- read at scrape time ----------------------------------------------------------

    def add_source(self, name: str, stats: Callable[[], SourceStats]) -> None:
        """Export a source's own counters (resyncs, filtered, kretprobe misses) at scrape time.

        ``SourceStats.extra["kretprobe_misses"]`` (the bpf source: kretprobe instances
        the kernel could not allocate, ``maxactive`` exhausted) becomes
        ``cttrace_kretprobe_misses_total``.
        """
        self.registry.register(_SourceCollector(name, stats))
        self._lost.labels(name)  # exported at 0 from the start, like the findings

    def add_alertmanager(self, stats: StatsReader) -> None:
        """Export an Alertmanager sink's ``stats()`` at scrape time."""
        self.registry.register(_AlertmanagerCollector(stats))

    def add_conntrack(self, stats: StatsReader, fill: StatsReader) -> None:
        """Export the traced namespace's conntrack fill and failure counters at scrape time.

        ``stats()`` returns the ``/proc/net/stat/nf_conntrack`` columns summed over CPUs
        (``cttrace.ctstats.read_conntrack_stats``); ``fill()`` returns ``count`` and
        ``max`` (:func:`read_conntrack_fill`). Each is read on its own: one failing
        leaves the other's metrics in the scrape.
        """
        self.registry.register(_ConntrackCollector(stats, fill))

def _read_or_none(what: str, read: Callable[[], Any]) -> Any:
    """``read()``, or None (logged) when the kernel file behind it cannot be read or parsed."""
    try:
        return read()
    except (OSError, ValueError, UserError) as err:
        log.debug("metrics: cannot read %s: %s", what, err)
        return None


#: The bpf source's own counters (SourceStats.extra keys) exported as they are.
_BPF_COUNTERS = {
    "entry_map_evictions": (
        "cttrace_bpf_entry_map_evictions",
        "NATed TCP entries deleted while the kernel's entry map no longer held them "
        "(evicted from the LRU map, or older than the programs): their records were never "
        "sent."),
    "kprobe_misses": (
        "cttrace_kprobe_misses",
        "Kernel function calls a kprobe missed (the kernel's own count, kprobe_profile)."),
    "trampoline_misses": (
        "cttrace_trampoline_misses",
        "Runs of fentry/fexit programs the kernel skipped because the same program was "
        "already running on that CPU (fdinfo recursion_misses): their records were lost."),
    "entries_tracked": (
        "cttrace_bpf_entries_tracked",
        "NATed TCP entries the kernel kept from confirm to delete."),
    "entries_reported": (
        "cttrace_bpf_entries_reported",
        "Kept entries that became interesting to a rule and were sent to userspace."),
    "records_emitted": (
        "cttrace_bpf_records_emitted",
        "Records the kernel wrote to the ring/perf buffer for userspace."),
}


class _SourceCollector(Collector):
    def __init__(self, name: str, stats: Callable[[], SourceStats]) -> None:
        self._name = name
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        stats: SourceStats | None = _read_or_none(f"source {self._name}", self._stats)
        if stats is None:
            return
        for metric, help_text, value in (
            ("cttrace_source_resyncs", "Table dumps after lost events.", stats.resyncs),
            ("cttrace_source_filtered_events",
             "Events a source saw and dropped as irrelevant (not TCP, not NATed).",
             stats.filtered),
        ):
            family = CounterMetricFamily(metric, help_text, labels=["source"])
            family.add_metric([self._name], value)
            yield family
        for key, (metric, help_text) in _BPF_COUNTERS.items():
            if key in stats.extra:
                family = CounterMetricFamily(metric, help_text, labels=["source"])
                family.add_metric([self._name], stats.extra[key])
                yield family
        if stats.hooks:
            info = GaugeMetricFamily(
                "cttrace_source_hook_info",
                "1 per kernel function the source hooks: how it is attached (fentry, fexit, "
                "kprobe, kprobe+kretprobe) and why.", labels=["source", "function", "mode", "why"])
            for function, (mode, why) in sorted(stats.hooks.items()):
                info.add_metric([self._name, function, mode, why], 1)
            yield info
        misses = stats.extra.get("kretprobe_misses")
        if misses is not None:
            family = CounterMetricFamily(
                "cttrace_kretprobe_misses",
                "Function returns a kretprobe missed (no free instance: maxactive exhausted).",
                labels=["source"])
            family.add_metric([self._name], misses)
            yield family

    def describe(self) -> Iterable[Metric]:
        return []  # computed at scrape time; nothing to check at registration


class _AlertmanagerCollector(Collector):
    def __init__(self, stats: StatsReader) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        stats: Mapping[str, int] | None = _read_or_none("alertmanager sink", self._stats)
        if stats is None:
            return
        for key, (metric, help_text) in _ALERTMANAGER_COUNTERS.items():
            if key in stats:
                yield CounterMetricFamily(metric, help_text, value=stats[key])
        if "queue_depth" in stats:
            yield GaugeMetricFamily(
                "cttrace_alertmanager_queue_depth",
                "Alerts held for delivery or re-sending (firing, or resolved but not yet "
                "accepted by every Alertmanager).",
                value=stats["queue_depth"])

    def describe(self) -> Iterable[Metric]:
        return []


class _ConntrackCollector(Collector):
    def __init__(self, stats: StatsReader, fill: StatsReader) -> None:
        self._stats = stats
        self._fill = fill

    def collect(self) -> Iterable[Metric]:
        fill: Mapping[str, int] | None = _read_or_none("conntrack sysctls", self._fill)
        if fill is not None and "count" in fill:
            yield GaugeMetricFamily("cttrace_conntrack_entries",
                                    "Entries in the conntrack table (nf_conntrack_count).",
                                    value=fill["count"])
        if fill is not None and "max" in fill:
            yield GaugeMetricFamily("cttrace_conntrack_max",
                                    "Size limit of the conntrack table (nf_conntrack_max).",
                                    value=fill["max"])
        stats: Mapping[str, int] | None = _read_or_none("conntrack statistics", self._stats)
        if stats is None:
            return
        for key, help_text in _CONNTRACK_COUNTERS.items():
            if key in stats:
                yield CounterMetricFamily(f"cttrace_conntrack_{key}", help_text,
                                          value=stats[key])

    def describe(self) -> Iterable[Metric]:
        return []
