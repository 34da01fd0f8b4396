"""kube-proxy in IPVS mode on Debian's kernel (which has ip_vs): recycled-ip and dead-pod
with the real kube-proxy 1.20, watched by ``cttrace watch --source netlink`` and by the
shared ``cttrace watch --source bpf``, each a separate process, as a user runs them.

What is measured: whether the retry from the same source port still reaches the pod
that inherited a dead pod's IP when IPVS, not iptables, translates the Service, and
what each source reports: both keep IPVS's entries, translated though they carry no
NAT status bit. kube-proxy sets ``net.ipv4.vs.conntrack=1`` (IPVS keeps a
netfilter conntrack entry per connection) and ``expire_nodest_conn=1`` (a packet of a
connection whose real server is gone expires the IPVS connection); IPVS rewrites the
entry's reply tuple itself (ip_vs_update_conntrack -> nf_conntrack_alter_reply)
without setting the IPS_DST_NAT status bit that iptables' DNAT sets. Each test
writes what it saw to ``ipvs-<scenario>.json`` in the results directory before it
asserts, so a failed run still says what happened.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from cttrace.lab.background import BackgroundScenario
from cttrace.lab.results import ScenarioResult
from tests.lab_checks import assert_dead_endpoint_names_the_pod
from tests.watch_process import Line, WatchProcess

from .conftest import DEAD_AFTER_S, OUT_DIR, SharedWatch

#: The first test also waits for the shared bpf watch's compile, then starts etcd and
#: kube-apiserver under emulation: more than the tier's per-test default.
pytestmark = [pytest.mark.vm, pytest.mark.timeout(1500)]

PROXY = "kube-proxy-ipvs"
#: kube-apiserver and kube-proxy start several times slower under emulation.
SCENARIO_DEADLINE_S = 600.0
#: How long a finding may take to show after its scenario's traffic, under emulation.
FINDING_S = 90.0
#: Source ports of their own: the shared bpf watch also sees test_watch_bpf.py's runs of
#: the same scenarios, whose flows must stay apart from these.
SPORTS = {"recycled-ip": 40223, "dead-pod": 40224}


def ipvs_listing(netns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, "ipvsadm", "-Lnc"],
                          capture_output=True, text=True, check=False).stdout


@contextmanager
def watched(tmp_path: Path, bpf_watch: SharedWatch, scenario: str, *extra: str,
            **options: Any) -> Iterator[tuple[BackgroundScenario, WatchProcess]]:
    """The scenario with the real kube-proxy in IPVS mode; its first packet waits until the
    netlink watch is attached and the shared bpf watch has read the lab's identity."""
    ready = tmp_path / "ready"
    identity = tmp_path / "identity.jsonl"
    with BackgroundScenario(
        scenario, identity_path=identity, proxy=PROXY, sport=SPORTS[scenario],
        wait_ready=lambda: ready.exists() and bpf_watch.caught_up(identity), **options,
    ) as bg:
        bpf_watch.follow(identity)
        netlink = WatchProcess(["--source", "netlink", "--netns", bg.node_netns, "--output",
                                "json", "--flows", "--identity-file", str(identity),
                                "--dead-after", f"{DEAD_AFTER_S:g}", *extra], ready)
        try:
            netlink.wait_ready(timeout=SCENARIO_DEADLINE_S)
            yield bg, netlink
        finally:
            netlink.kill()


def of_flow(lines: list[Line], result: ScenarioResult) -> list[Line]:
    return [x for x in lines if x.get("orig") == result.flow.to_json()]


def record(name: str, result: ScenarioResult, netlink: list[Line], bpf: list[Line],
           **extra: Any) -> None:
    def seen(lines: list[Line]) -> dict[str, Any]:
        mine = of_flow(lines, result)
        return {"findings": [x for x in mine if x.get("kind") == "finding"],
                "flow_events": [x for x in mine if x.get("kind") == "flow"]}

    (OUT_DIR / f"ipvs-{name}.json").write_text(json.dumps({
        "attempts": [dataclasses.asdict(a) for a in result.attempts],
        "exchanges": [e.outcome for e in result.exchanges],
        "steps": [dataclasses.asdict(step) for step in result.steps],
        "conntrack": result.conntrack,
        "netlink": seen(netlink),
        "bpf": seen(bpf),
        **extra,
    }, indent=2, default=str))


def assert_seen_without_a_nat_bit(netlink: list[Line], result: ScenarioResult) -> None:
    """The netlink source reported the flow's entry, translated by IPVS to the pod's
    address, though the entry carries no NAT status bit."""
    new = [x for x in of_flow(netlink, result) if x.get("kind") == "flow"
           and x["event"] == "new"]
    assert new, "the netlink source reported no entry of the flow"
    assert new[0]["target"] == {"ip": result.target[0], "port": result.target[1]}
    assert not {"SRC_NAT", "DST_NAT"} & set(new[0]["status"]), new[0]


def finding(watch: WatchProcess, rule: str, result: ScenarioResult,
            timeout: float = FINDING_S) -> Line | None:
    """The source's ``rule`` finding for the scenario's flow, or None if none came."""
    try:
        return watch.wait_for(lambda x: x.get("kind") == "finding" and x.get("rule") == rule
                              and x.get("orig") == result.flow.to_json(), timeout=timeout)
    except AssertionError:
        return None


def test_recycled_ip_under_ipvs(tmp_path: Path, bpf_watch: SharedWatch) -> None:
    """Measured: the retry does not reach the pod that inherited the IP; the node refuses
    it, and the entry the first SYN made is gone by then (see the README's Datapaths).
    The bpf source sees the retry's socket connect onto that unreplied entry."""
    with watched(tmp_path, bpf_watch, "recycled-ip") as (bg, netlink):
        result = bg.result(timeout=SCENARIO_DEADLINE_S)
        connections = ipvs_listing(bg.node_netns)
        inherited = finding(bpf_watch.process, "inherited-entry", result)
        by_netlink = finding(netlink, "wrong-pod", result, timeout=10)
        by_bpf = finding(bpf_watch.process, "wrong-pod", result, timeout=10)
        assert netlink.stop() == 0, netlink.stderr.decode()
    record("recycled-ip", result, netlink.lines, bpf_watch.process.lines,
           ipvs_connections=connections, caught={"netlink": by_netlink is not None,
                                                 "bpf": by_bpf is not None,
                                                 "bpf inherited-entry": inherited is not None})
    assert result.proxy == PROXY
    assert_seen_without_a_nat_bit(netlink.lines, result)
    assert result.attempts[-1].outcome == "refused", result.attempts
    assert result.conntrack["after-retry"] == ()
    # No wrong pod was reached, and neither source reports one.
    assert by_netlink is None and by_bpf is None
    assert inherited is not None, "the bpf source did not report the inherited entry"
    assert inherited["target"] == {"ip": result.target[0], "port": result.target[1]}


def test_dead_pod_under_ipvs(tmp_path: Path, bpf_watch: SharedWatch) -> None:
    """Measured: both sources report the entry that outlives its pod."""
    with watched(tmp_path, bpf_watch, "dead-pod") as (bg, netlink):
        result = bg.result(timeout=SCENARIO_DEADLINE_S)
        by_netlink = finding(netlink, "dead-endpoint", result)
        by_bpf = finding(bpf_watch.process, "dead-endpoint", result)
        assert netlink.stop() == 0, netlink.stderr.decode()
    record("dead-pod", result, netlink.lines, bpf_watch.process.lines,
           caught={"netlink": by_netlink is not None, "bpf": by_bpf is not None})
    assert result.proxy == PROXY
    assert_seen_without_a_nat_bit(netlink.lines, result)
    assert by_netlink is not None, "the netlink source reported no dead-endpoint"
    assert_dead_endpoint_names_the_pod(by_netlink, result)
    assert by_bpf is not None, "the bpf source reported no dead-endpoint"
    assert_dead_endpoint_names_the_pod(by_bpf, result)
