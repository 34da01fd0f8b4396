"""kube-proxy in IPVS mode on Debian's kernel (which has ip_vs): recycled-ip and dead-pod,
with the real kube-proxy 1.20 and ``cttrace watch --source netlink`` as a separate process.

What is measured: whether the retry from the same source port still reaches the pod
that inherited a dead pod's IP when IPVS, not iptables, translates the Service, and
what cttrace reports. kube-proxy sets ``net.ipv4.vs.conntrack=1`` (IPVS keeps a
netfilter conntrack entry per connection) and ``expire_nodest_conn=1`` (a packet of a
connection whose real server is gone expires the IPVS connection); IPVS rewrites the
entry's reply tuple itself (ip_vs_update_conntrack -> nf_conntrack_alter_reply)
without setting the IPS_DST_NAT status bit that iptables' DNAT sets. Each test
writes what it saw to ``ipvs-<scenario>.json`` in the results directory.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cttrace.lab.results import ScenarioResult
from tests.kernel.test_watch_scenarios import traced
from tests.watch_process import Line

from .conftest import OUT_DIR

pytestmark = pytest.mark.vm

PROXY = "kube-proxy-ipvs"
#: kube-apiserver and kube-proxy start several times slower under emulation.
SCENARIO_DEADLINE_S = 600.0


def ipvs_listing(netns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, "ipvsadm", "-Ln"], capture_output=True,
                          text=True, check=False).stdout


def record(name: str, result: ScenarioResult, lines: list[Line], **extra: Any) -> None:
    flows = [x for x in lines if x.get("kind") == "flow" and x["orig"] == result.flow.to_json()]
    (OUT_DIR / f"ipvs-{name}.json").write_text(json.dumps({
        "attempts": [a.outcome + " " + str(a.answered_by) for a in result.attempts],
        "exchanges": [e.outcome for e in result.exchanges],
        "conntrack": result.conntrack,
        "findings": [x for x in lines if x.get("kind") == "finding"],
        "flow_events": len(flows),
        **extra,
    }, indent=2, default=str))


def test_recycled_ip_under_ipvs(tmp_path: Path) -> None:
    seen: dict[str, str] = {}
    with traced(tmp_path, "recycled-ip", "--flows", proxy=PROXY) as (bg, watch):
        result = bg.result(timeout=SCENARIO_DEADLINE_S)
        seen["ipvsadm"] = ipvs_listing(bg.node_netns)
        assert watch.stop() == 0, watch.stderr.decode()
    record("recycled-ip", result, watch.lines, **seen)
    assert result.proxy == "kube-proxy-ipvs"
    assert "TCP  10.100.52.7:80" in seen["ipvsadm"]


def test_dead_pod_under_ipvs(tmp_path: Path) -> None:
    with traced(tmp_path, "dead-pod", "--flows", "--dead-after", "2",
                proxy=PROXY) as (bg, watch):
        result = bg.result(timeout=SCENARIO_DEADLINE_S)
        assert watch.stop() == 0, watch.stderr.decode()
    record("dead-pod", result, watch.lines)
    assert result.proxy == "kube-proxy-ipvs"
