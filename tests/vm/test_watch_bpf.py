"""Every lab scenario caught by ``cttrace watch --source bpf --output json``, run as a
separate process exactly as a user runs it, on Debian's kernel.

One watch process (one BCC compile) serves the whole module: the scenarios run
one after another, each in a lab of its own (its own node namespace, torn down
before the next), and the watch follows each lab's identity file in turn (see
:class:`~tests.vm.conftest.SharedWatch`). Without ``--netns`` the bpf source
reports NATed entries of every namespace; every assertion picks its lines by
the scenario's own flow (each scenario has its own Service VIP and port).
The last test stops the process with SIGTERM under load and checks that no
BPF program is left behind.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import pytest

from cttrace.lab.background import BackgroundScenario
from cttrace.lab.results import ScenarioResult
from tests.lab_checks import assert_snat_race_clashed
from tests.watch_process import Line, owner, ref

from .conftest import (
    DEAD_AFTER_S,
    SharedWatch,
    assert_detached,
    bpf_prog_ids,
    prog_ids_of,
    wait_until,
    write_timing,
)
from .topology import CLIENT_IP, VIP, Topology

pytestmark = pytest.mark.vm

#: How long a finding may take to show after its scenario's traffic, under emulation.
FINDING_S = 90.0
#: SIGTERM under load: the process detaches every probe and exits 0 within this.
SHUTDOWN_DEADLINE_S = 60.0


def wall(ts: str) -> float:
    """A JSON line's RFC 3339 ``ts`` as a wall-clock timestamp."""
    return datetime.fromisoformat(ts).timestamp()


def inserts_failed(findings: list[Line]) -> int:
    return sum(x["deltas"]["insert_failed"] for x in findings)


@contextmanager
def scenario(watch: SharedWatch, name: str, tag: str = "",
             **options: Any) -> Iterator[BackgroundScenario]:
    """The scenario in a lab of its own; its first packet waits until the shared watch
    process has read the lab's identity file (pods and Services) to its end. ``tag``
    tells apart the identity files of one scenario run more than once."""
    identity = watch.dir / f"identity-{name}{tag}.jsonl"
    with BackgroundScenario(name, identity_path=identity,
                            wait_ready=lambda: watch.caught_up(identity), **options) as bg:
        watch.follow(identity)  # the lab created the file: point the watch at it
        yield bg


def finding(watch: SharedWatch, rule: str, result_flow: dict[str, object]) -> Line:
    return watch.process.wait_for(
        lambda x: x.get("kind") == "finding" and x.get("rule") == rule
        and x.get("orig") == result_flow,
        timeout=FINDING_S,
    )


def of_flow(watch: SharedWatch, flow: dict[str, object], rule: str | None = None) -> list[Line]:
    return [x for x in watch.process.lines if x.get("kind") == "finding"
            and x.get("orig") == flow and (rule is None or x.get("rule") == rule)]


def of_attempts(watch: SharedWatch, result: ScenarioResult) -> list[Line]:
    """Findings about any of the scenario's connections (scenarios share VIPs and pod
    IPs, not client ports)."""
    flows = [{**result.flow.to_json(), "sport": a.sport} for a in result.attempts]
    return [x for x in watch.process.lines if x.get("kind") == "finding"
            and x.get("orig") in flows]


#: recycled-ip over each way a client reaches a Service: an IPv4 node, an IPv6 node
#: (IPv6 conntrack entries, tcp_v6_connect sockets), and an IPv4 node whose client uses an
#: AF_INET6 socket to ::ffff:<VIP> (the IPv4 entry its SYN creates must join that socket).
#: Each has its own flow (addresses, or the client port). The v4-mapped lab reuses the
#: IPv4 lab's pod IPs: its dead pod's IP is still watched (for the syn_sent timeout), so
#: its entry is reported at confirm, and the creating socket must go out with it.
RECYCLED_IP = {
    "ipv4": {},
    "ipv6": {"family": "6"},
    "v4-mapped": {"v4_mapped": True, "sport": 40124},
}


@pytest.mark.parametrize("client", list(RECYCLED_IP))
def test_recycled_ip_is_a_wrong_pod_and_an_inherited_entry(
    bpf_watch: SharedWatch, client: str,
) -> None:
    with scenario(bpf_watch, "recycled-ip", f"-{client}", **RECYCLED_IP[client]) as bg:
        result: ScenarioResult = bg.result(timeout=120)
        flow = result.flow.to_json()
        # Decided before the lab (and the entry with it) goes away.
        wp = finding(bpf_watch, "wrong-pod", flow)
        ie = finding(bpf_watch, "inherited-entry", flow)
    first, retry = result.attempts
    assert retry.answered_by == f"{result.new_pod.namespace}/{result.new_pod.name}"  # type: ignore[union-attr]

    assert wp["severity"] == "critical"
    assert wp["target"] == {"ip": result.target[0], "port": result.target[1]}
    assert owner(wp, "client") == ref(result.client)
    assert wp["service"] == {"namespace": result.service.namespace, "name": result.service.name}
    assert owner(wp, "old_owner") == ref(result.old_pod)
    assert owner(wp, "new_owner") == ref(result.new_pod)
    assert wp["new_owner_is_endpoint"] is False

    # The retry's socket inherited the entry the first attempt's socket created.
    sockets = ie["sockets"]
    assert sockets["old"]["pid"] == first.pid
    assert sockets["new"]["pid"] == retry.pid
    assert first.pid != retry.pid
    assert sockets["old"]["comm"] and sockets["new"]["comm"]
    assert sockets["old"]["netns_ino"] == sockets["new"]["netns_ino"] != 0
    assert ie["entry_id"] == wp["entry_id"]
    assert owner(ie, "client") == ref(result.client)
    assert owner(ie, "old_owner") == ref(result.old_pod)
    assert len(of_flow(bpf_watch, flow, "wrong-pod")) == 1
    # The entry of the flow's family: a v4-mapped socket's SYN makes an IPv4 one.
    assert (":" in str(flow["src"])) is (client == "ipv6")
    if client == "v4-mapped":  # both attempts really came from AF_INET6 sockets
        assert first.local == retry.local == f"::ffff:{flow['src']}"


def test_dead_pod_is_a_dead_endpoint(bpf_watch: SharedWatch) -> None:
    with scenario(bpf_watch, "dead-pod") as bg:
        result = bg.result(timeout=120)
        flow = result.flow.to_json()
        de = finding(bpf_watch, "dead-endpoint", flow)
    assert owner(de, "old_owner") == ref(result.old_pod)
    assert owner(de, "client") == ref(result.client)
    assert de["target"] == {"ip": result.target[0], "port": result.target[1]}
    assert de["state"] == "ESTABLISHED"
    assert of_flow(bpf_watch, flow, "wrong-pod") == []


@pytest.mark.parametrize("family", ["4", "6"], ids=["ipv4", "ipv6"])
def test_bridge_without_br_netfilter_is_a_critical_unnated_reply(
    bpf_watch: SharedWatch, family: str,
) -> None:
    # IPv6: the client's RST to the pod's IPv6 address comes from tcp_v6_send_reset.
    with scenario(bpf_watch, "bridge-no-brnf", f"-{family}", brnf=False,
                  family=family) as bg:
        result = bg.result(timeout=120)
        flow = result.flow.to_json()
        ur = finding(bpf_watch, "unnated-reply", flow)
    assert result.attempts[0].outcome != "answered"
    assert result.counters["client_out_rsts"] >= 1
    # The bpf source saw the client's RST to the pod IP: evidence, not a timeout.
    assert ur["evidence"] == "rst" and ur["severity"] == "critical"
    assert ur["target"] == {"ip": result.target[0], "port": result.target[1]}
    assert owner(ur, "new_owner") == ref(result.old_pod)
    assert owner(ur, "client") == ref(result.client)
    assert len(of_flow(bpf_watch, flow, "unnated-reply")) == 1


def test_snat_race_is_a_snat_collision(bpf_watch: SharedWatch) -> None:
    """The lab's node masquerades without --random-fully from a few ports; a burst of
    connections clashes on the NAT tuple and the kernel drops the losers' SYNs at confirm.
    The watch traces every namespace, so it counts those failed confirms in the kernel
    (in the lab's node namespace, not its own) and reports each one."""
    # Fewer, slower clients than the scenario's default: a dozen Python clients starting
    # at once under emulation do not all report within the lab's deadline.
    with scenario(bpf_watch, "snat-race", connections=6, ports=2, connect_timeout=4.0) as bg:
        node_ino = os.stat(f"/run/netns/{bg.node_netns}").st_ino
        result = bg.result(timeout=120)
        failed = result.counters["insert_failed"]

        def of_lab() -> list[Line]:
            return [x for x in bpf_watch.process.lines if x.get("kind") == "finding"
                    and x.get("rule") == "snat-collision" and x.get("netns_ino") == node_ino]

        # The sampler reads the counts every 5 s: wait until it has accounted for all.
        bpf_watch.process.wait_for(lambda _: inserts_failed(of_lab()) >= failed,
                                   timeout=FINDING_S)
    assert_snat_race_clashed(result)

    findings = of_lab()
    assert inserts_failed(findings) == failed
    assert sum(f["deltas"]["drop"] for f in findings) == result.counters["drop"]
    # Critical at one failure a second or more; how fast the clients clash depends
    # on the emulation's speed, so each finding's severity is checked against its rate.
    for f in findings:
        assert f["severity"] == ("critical" if f["rate_per_s"] >= 1.0 else "warning"), f
    assert "--random-fully" in findings[0]["summary"]
    assert bg.node_netns in findings[0]["summary"]  # which node namespace, by name
    assert findings[0]["netns"] == bg.node_netns
    assert findings[0]["orig"] == {"src": "", "sport": 0, "dst": "", "dport": 0}
    assert of_attempts(bpf_watch, result) == [], "a finding about one of the burst's entries"


def test_graceful_drain_completes_without_a_finding(bpf_watch: SharedWatch) -> None:
    """A connection drained from a terminating pod and closed with FINs, then the pod
    deleted: nothing is wrong, and the watch must not say otherwise once the pod is gone
    (its entry sits in TIME_WAIT for minutes, still pointing at the pod's IP)."""
    watch = bpf_watch.process
    with scenario(bpf_watch, "graceful-drain") as bg:
        result = bg.result(timeout=120)
        # The watch has read the pod's deletion, and its clock has then passed
        # --dead-after (and a tick) while the lab, and the entry, still exist.
        wait_until(lambda: bpf_watch.caught_up(bg.identity_path), "the pod's deletion read",
                   FINDING_S)
        read = time.time()
        watch.wait_for(lambda x: x.get("kind") == "status"
                       and wall(x["ts"]) >= read + DEAD_AFTER_S + 1.0, timeout=FINDING_S)
    connected, fresh = result.attempts
    assert connected.answered_by == f"{result.old_pod.namespace}/{result.old_pod.name}"  # type: ignore[union-attr]
    # The terminating pod really was out of the Service's rules: a new connection went elsewhere.
    assert fresh.answered_by == f"{result.new_pod.namespace}/{result.new_pod.name}"  # type: ignore[union-attr]
    drained = [e for e in result.exchanges if e.sent_at > result.step("terminating").ts]
    assert drained, result.exchanges
    assert all(e.outcome == "echoed" and e.echo == e.text for e in result.exchanges), \
        result.exchanges
    assert result.counters == {"client_out_rsts": 0, "pod_out_rsts": 0, "closed": 1}
    assert of_attempts(bpf_watch, result) == []


def source_counter(line: Line, key: str) -> int:
    """One of the bpf source's own counters, from a status line."""
    return int(line.get(key, 0))


def next_status(watch: SharedWatch, pred: Callable[[Line], bool] = lambda _: True,
                timeout: float = FINDING_S) -> Line:
    """The first status line printed from now on that satisfies ``pred``."""
    old = {id(line) for line in watch.process.lines}
    return watch.process.wait_for(
        lambda x: id(x) not in old and x.get("kind") == "status" and pred(x), timeout=timeout)


#: Healthy connections through a Service the storm test drives (under emulation: ~1 minute).
STORM_CONNECTIONS = 300


def test_a_storm_of_healthy_connections_sends_no_record_per_connection(
    bpf_watch: SharedWatch, topology: Topology
) -> None:
    """Connections through a Service, each answered at once by a pod whose IP nobody
    watches, one socket per tuple: the kernel keeps each entry from confirm to delete
    and sends userspace nothing about it (the source's own counters say so)."""
    watch = bpf_watch.process
    before = next_status(bpf_watch)
    tracked0 = source_counter(before, "entries_tracked")
    with topology.load(80):
        after = next_status(
            bpf_watch,
            lambda x: source_counter(x, "entries_tracked") >= tracked0 + STORM_CONNECTIONS,
            timeout=4 * FINDING_S)
    tracked = source_counter(after, "entries_tracked") - tracked0
    emitted = source_counter(after, "records_emitted") - source_counter(before,
                                                                        "records_emitted")
    reported = source_counter(after, "entries_reported") - source_counter(before,
                                                                          "entries_reported")
    assert tracked >= STORM_CONNECTIONS
    assert emitted <= 0.01 * tracked, (emitted, tracked)
    assert reported <= 0.01 * tracked, (reported, tracked)
    assert source_counter(after, "entry_map_evictions") == source_counter(
        before, "entry_map_evictions")
    # From the storm's first status line on (earlier tests drove this topology's flow into
    # findings of their own on purpose: the second-socket test's inherited entry).
    during = watch.lines[next(i for i, x in enumerate(watch.lines) if x is before):]
    assert [x for x in during if x.get("kind") == "finding"
            and (x["orig"]["src"], x["orig"]["dst"]) == (CLIENT_IP, VIP)] == []
    hooks = watch.wait_for(lambda x: x.get("kind") == "source", timeout=0)["hooks"]
    assert hooks["tcp_connect"]["mode"] == "fentry", hooks
    assert hooks["nf_conntrack_tcp_packet"]["mode"] == "fexit", hooks
    write_timing("storm_records_per_connection", emitted / tracked)


def test_sigterm_under_load_exits_0_and_leaves_no_program(
    bpf_watch: SharedWatch, topology: Topology
) -> None:
    watch = bpf_watch.process
    programs = prog_ids_of(watch.proc.pid)
    assert programs and programs <= bpf_prog_ids()
    tracked0 = source_counter(next_status(bpf_watch), "entries_tracked")
    with topology.load(80) as load:
        # Under load: the kernel is tracking the load's new entries right now.
        next_status(bpf_watch, lambda x: source_counter(x, "entries_tracked") >= tracked0 + 20)
        rc, took = watch.terminate(SHUTDOWN_DEADLINE_S)
        assert load.proc.poll() is None, "the load ended before the watch did"
    assert watch.stop() == 0 == rc, watch.stderr.decode(errors="replace")[-3000:]
    assert watch.lines[-1]["kind"] == "summary"
    assert b"Traceback" not in watch.stderr
    write_timing("sigterm_to_exit_s", took)
    # Every program it loaded is gone, and so are its kprobe events.
    assert_detached(watch.proc.pid, programs, SHUTDOWN_DEADLINE_S)
