"""Metrics on a fresh registry, and the agent's HTTP endpoint scraped over loopback."""

from __future__ import annotations

import contextlib
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cttrace.events import Flow
from cttrace.findings import Finding, Severity
from cttrace.http_server import AgentHTTPServer, ListenError, parse_listen
from cttrace.metrics import Metrics, read_conntrack_fill
from cttrace.sinks.alertmanager import AlertmanagerSink
from cttrace.sources import SourceStats

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(registry: CollectorRegistry) -> Samples:
    """Every sample of an exposition, parsed back: {(name, sorted labels): value}."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def finding(rule: str = "wrong-pod", severity: Severity = Severity.CRITICAL) -> Finding:
    return Finding(rule=rule, severity=severity, ts=1.0,
                   orig=Flow("10.0.1.5", 40000, "10.96.0.10", 80),
                   target=("10.0.2.7", 80), summary="s")


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def test_event_path_counters(registry: CollectorRegistry) -> None:
    m = Metrics(registry)
    for _ in range(3):
        m.event("netlink", "new")
    m.event("netlink", "update")
    m.lost("netlink", 7)
    m.finding(finding())
    m.set_tracked(12)
    m.identity_sync(True)
    m.watch_restart()
    got = samples(registry)
    assert got[("cttrace_events_total", (("kind", "new"), ("source", "netlink")))] == 3
    assert got[("cttrace_events_total", (("kind", "update"), ("source", "netlink")))] == 1
    assert got[("cttrace_lost_events_total", (("source", "netlink"),))] == 7
    assert got[("cttrace_findings_total", (("rule", "wrong-pod"), ("severity", "critical")))] == 1
    assert got[("cttrace_tracked_entries", ())] == 12
    assert got[("cttrace_identity_in_sync", ())] == 1
    assert got[("cttrace_identity_watch_restarts_total", ())] == 1


def test_every_rule_is_exported_before_its_first_finding(registry: CollectorRegistry) -> None:
    Metrics(registry)
    got = samples(registry)
    for rule in ("wrong-pod", "late-establish", "dead-endpoint", "unnated-reply",
                 "inherited-entry", "snat-collision"):
        for severity in Severity:
            key = (("rule", rule), ("severity", str(severity)))
            assert got[("cttrace_findings_total", key)] == 0


def test_unreplied_age_histogram(registry: CollectorRegistry) -> None:
    m = Metrics(registry)
    m.first_reply(0.0004)  # a healthy reply
    m.first_reply(31.0)  # a SYN that waited for a recycled IP
    got = samples(registry)
    assert got[("cttrace_unreplied_seconds_bucket", (("le", "0.001"),))] == 1
    assert got[("cttrace_unreplied_seconds_bucket", (("le", "30.0"),))] == 1
    assert got[("cttrace_unreplied_seconds_bucket", (("le", "60.0"),))] == 2
    assert got[("cttrace_unreplied_seconds_count", ())] == 2


def test_source_counters_are_read_at_scrape_time(registry: CollectorRegistry) -> None:
    stats = SourceStats(resyncs=2, filtered=40, extra={"kretprobe_misses": 5})
    Metrics(registry).add_source("bpf", lambda: stats)
    stats.resyncs = 3  # changed after registration: the scrape sees the new value
    got = samples(registry)
    assert got[("cttrace_source_resyncs_total", (("source", "bpf"),))] == 3
    assert got[("cttrace_source_filtered_events_total", (("source", "bpf"),))] == 40
    assert got[("cttrace_kretprobe_misses_total", (("source", "bpf"),))] == 5


def test_the_bpf_sources_evictions_records_and_hooks_are_exported(
    registry: CollectorRegistry,
) -> None:
    """Map evictions and probe misses are never silent, and how each hook is attached is
    visible with its reason."""
    stats = SourceStats(
        extra={"entry_map_evictions": 4, "kprobe_misses": 1, "records_emitted": 12,
               "entries_tracked": 3000, "entries_reported": 2},
        hooks={"tcp_connect": ("fentry", "vmlinux function, kernel BTF and trampolines"),
               "nf_ct_delete": ("kprobe", "nf_conntrack is a module")})
    Metrics(registry).add_source("bpf", lambda: stats)
    got = samples(registry)
    bpf = (("source", "bpf"),)
    assert got[("cttrace_bpf_entry_map_evictions_total", bpf)] == 4
    assert got[("cttrace_kprobe_misses_total", bpf)] == 1
    assert got[("cttrace_bpf_records_emitted_total", bpf)] == 12
    assert got[("cttrace_bpf_entries_tracked_total", bpf)] == 3000
    assert got[("cttrace_bpf_entries_reported_total", bpf)] == 2
    assert got[("cttrace_source_hook_info", (
        ("function", "tcp_connect"), ("mode", "fentry"), ("source", "bpf"),
        ("why", "vmlinux function, kernel BTF and trampolines")))] == 1
    assert got[("cttrace_source_hook_info", (
        ("function", "nf_ct_delete"), ("mode", "kprobe"), ("source", "bpf"),
        ("why", "nf_conntrack is a module")))] == 1


def test_alertmanager_counters_come_from_the_sink(registry: CollectorRegistry) -> None:
    sink = AlertmanagerSink(["http://127.0.0.1:9"], node="n", generator_url="", queue_max=1)
    Metrics(registry).add_alertmanager(sink.stats)
    sink.submit(finding())
    sink.submit(finding("dead-endpoint"))  # the queue holds one: dropped
    got = samples(registry)
    assert got[("cttrace_alertmanager_queue_depth", ())] == 1
    assert got[("cttrace_alertmanager_dropped_alerts_total", ())] == 1
    assert got[("cttrace_alertmanager_alerts_sent_total", ())] == 0
    assert got[("cttrace_alertmanager_send_failures_total", ())] == 0


def test_conntrack_fill_and_failures(registry: CollectorRegistry, tmp_path: Path) -> None:
    (tmp_path / "nf_conntrack_count").write_text("1234\n")
    (tmp_path / "nf_conntrack_max").write_text("262144\n")
    stats = {"entries": 1234, "insert_failed": 3, "drop": 4, "early_drop": 0, "clashres": 9}
    Metrics(registry).add_conntrack(lambda: stats,
                                    lambda: read_conntrack_fill(sysctl_dir=tmp_path))
    got = samples(registry)
    assert got[("cttrace_conntrack_entries", ())] == 1234
    assert got[("cttrace_conntrack_max", ())] == 262144
    assert got[("cttrace_conntrack_insert_failed_total", ())] == 3
    assert got[("cttrace_conntrack_drop_total", ())] == 4
    assert got[("cttrace_conntrack_early_drop_total", ())] == 0


def test_conntrack_fill_is_read_inside_the_traced_namespace(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # /proc/sys/net resolves against the reading thread's namespace: the fill is read
    # with the traced namespace entered, not in the agent's own (the host's).
    (tmp_path / "nf_conntrack_count").write_text("330001\n")
    (tmp_path / "nf_conntrack_max").write_text("524288\n")
    entered: list[str | None] = []

    @contextlib.contextmanager
    def fake_enter(name: str | None) -> Iterator[None]:
        entered.append(name)
        yield

    monkeypatch.setattr("cttrace.metrics.entered_netns", fake_enter)
    assert read_conntrack_fill("ctl-node", sysctl_dir=tmp_path) == {"count": 330001,
                                                                     "max": 524288}
    assert entered == ["ctl-node"]


def test_evicted_entries_are_exported_by_reason_from_the_start(
        registry: CollectorRegistry) -> None:
    m = Metrics(registry)
    assert samples(registry)[("cttrace_evicted_entries_total", (("reason", "unreplied"),))] == 0
    m.evicted("unreplied", 3)
    got = samples(registry)
    assert got[("cttrace_evicted_entries_total", (("reason", "unreplied"),))] == 3
    assert got[("cttrace_evicted_entries_total", (("reason", "answered"),))] == 0


def test_unreadable_kernel_files_drop_metrics_not_the_scrape(
        registry: CollectorRegistry, tmp_path: Path) -> None:
    def broken() -> dict[str, int]:
        raise PermissionError("/proc/net/stat/nf_conntrack")

    m = Metrics(registry)
    m.add_conntrack(broken, lambda: read_conntrack_fill(sysctl_dir=tmp_path))  # no files there
    m.event("netlink", "new")
    got = samples(registry)
    assert not any(name.startswith("cttrace_conntrack_") for name, _ in got)
    assert got[("cttrace_events_total", (("kind", "new"), ("source", "netlink")))] == 1


# -- the HTTP endpoint --------------------------------------------------------------------


class Flags:
    healthy = (True, "ok: netlink attached")
    ready = (False, "identity not in sync yet")


@pytest.fixture
def server(registry: CollectorRegistry) -> Iterator[AgentHTTPServer]:
    srv = AgentHTTPServer("127.0.0.1:0", registry,
                          healthy=lambda: Flags.healthy, ready=lambda: Flags.ready)
    srv.start()
    yield srv
    srv.stop()


def get(srv: AgentHTTPServer, path: str, accept: str = "") -> tuple[int, str, str]:
    host, port = srv.address
    request = urllib.request.Request(f"http://{host}:{port}{path}",
                                     headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def test_metrics_are_scraped_over_http(registry: CollectorRegistry,
                                       server: AgentHTTPServer) -> None:
    Metrics(registry).finding(finding())
    status, content_type, body = get(server, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    parsed = {s.name: s for f in text_string_to_metric_families(body) for s in f.samples}
    assert parsed["cttrace_build_info"].value == 1
    assert 'cttrace_findings_total{rule="wrong-pod",severity="critical"} 1.0' in body


def test_openmetrics_is_negotiated(registry: CollectorRegistry, server: AgentHTTPServer) -> None:
    Metrics(registry)
    status, content_type, body = get(server, "/metrics", "application/openmetrics-text")
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")


def test_probes_answer_from_the_callables(server: AgentHTTPServer) -> None:
    assert get(server, "/healthz")[0::2] == (200, "ok: netlink attached\n")
    assert get(server, "/readyz")[0::2] == (503, "identity not in sync yet\n")
    Flags.ready = (True, "ready")
    try:
        assert get(server, "/readyz")[0::2] == (200, "ready\n")
    finally:
        Flags.ready = (False, "identity not in sync yet")
    assert get(server, "/nope")[0] == 404


def test_a_probe_that_raises_fails_the_probe(registry: CollectorRegistry) -> None:
    def boom() -> tuple[bool, str]:
        raise RuntimeError("source gone")

    srv = AgentHTTPServer("127.0.0.1:0", registry, healthy=boom, ready=boom)
    srv.start()
    try:
        status, _, body = get(srv, "/healthz")
        assert status == 503 and "source gone" in body
    finally:
        srv.stop()
        srv.stop()  # idempotent


def test_port_in_use_is_a_user_error(registry: CollectorRegistry) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = AgentHTTPServer(f"127.0.0.1:{port}", registry,
                              healthy=lambda: (True, ""), ready=lambda: (True, ""))
        with pytest.raises(ListenError, match="pick another --listen"):
            srv.start()


@pytest.mark.parametrize(("text", "expected"), [
    ("0.0.0.0:19808", ("0.0.0.0", 19808)),
    (":19808", ("0.0.0.0", 19808)),
    ("[::]:19808", ("::", 19808)),
    ("127.0.0.1:0", ("127.0.0.1", 0)),
])
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("bad", ["19808", "host:", "::1:80", "a:70000"])
def test_bad_listen_is_a_user_error(bad: str) -> None:
    with pytest.raises(ListenError):
        parse_listen(bad)
