"""``cttrace doctor`` against the lab's own node namespaces.

tests/kernel/test_doctor.py audits hand-made namespaces; here the doctor runs,
as a separate process the way a user runs it, against the node of a lab
scenario right after the scenario showed the failure with real packets:

- ``bridge-no-brnf`` (bridge-nf-call-iptables=0, the client's connection reset):
  ``br-netfilter`` fails with its exact fix, as does the SYN_SENT timeout
  against a 30 s IP cooldown; running the printed fixes makes every check pass
  and the very same client connection through the Service then works.
- the same over IPv6 (an IPv6 node: bridge-nf-call-ip6tables=0): ``br-netfilter``
  fails with the ip6tables sysctl, and its fix makes the connection work.
- the same layout configured well (bridge-nf-call-iptables=1, a CNI cooldown
  above the SYN_SENT timeout): every check passes, exit 0.
- ``snat-race`` (MASQUERADE without --random-fully, SYNs dropped on insert):
  ``masquerade-random-fully`` names the lab's rule and ``insert-failed`` shows
  the counters the scenario pushed up.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from cttrace.lab.addressing import Family
from cttrace.lab.node import Lab
from cttrace.lab.results import ScenarioResult
from cttrace.lab.scenarios import get_scenario

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv" / "bin" / "python")
SYN_SENT = "net.netfilter.nf_conntrack_tcp_timeout_syn_sent"
BRNF = "net.bridge.bridge-nf-call-iptables"
BRNF6 = "net.bridge.bridge-nf-call-ip6tables"
VERDICTS = {"pass", "fail", "warn", "info", "error"}


def run_lab(name: str, family: Family = Family.V4,
            **options: Any) -> Iterator[tuple[Lab, ScenarioResult]]:
    scenario = get_scenario(name)
    with Lab(layout=scenario.layout, family=family) as lab:
        yield lab, scenario.run(lab, **options)


@pytest.fixture
def brnf_off() -> Iterator[tuple[Lab, ScenarioResult]]:
    yield from run_lab("bridge-no-brnf", brnf=False)


@pytest.fixture
def brnf_off_v6() -> Iterator[tuple[Lab, ScenarioResult]]:
    yield from run_lab("bridge-no-brnf", Family.V6, brnf=False)


@pytest.fixture
def brnf_on() -> Iterator[tuple[Lab, ScenarioResult]]:
    yield from run_lab("bridge-no-brnf", brnf=True)


@pytest.fixture
def snat_race() -> Iterator[tuple[Lab, ScenarioResult]]:
    yield from run_lab("snat-race")


def doctor(netns: str, *extra: str) -> tuple[int, dict[str, Any], dict[str, dict[str, Any]]]:
    """``cttrace doctor --netns NETNS --output json``: exit code, document, checks by id."""
    proc = subprocess.run(
        [PYTHON, "-m", "cttrace", "doctor", "--netns", netns, "--output", "json", *extra],
        capture_output=True, cwd=REPO, timeout=120, check=False,
    )
    assert proc.stderr == b"", proc.stderr
    doc = orjson.loads(proc.stdout)
    # The documented schema (src/cttrace/doctor/README.md).
    assert set(doc) >= {"node", "netns", "checks", "exit_code"}
    assert doc["netns"] == netns and doc["exit_code"] == proc.returncode
    for check in doc["checks"]:
        assert set(check) >= {"id", "verdict", "summary", "observed", "fix"}
        assert check["verdict"] in VERDICTS
    return proc.returncode, doc, {c["id"]: c for c in doc["checks"]}


def namespace_verdicts(doc: dict[str, Any]) -> set[str]:
    """The verdicts of the checks about the audited namespace (bpf-source is about this
    machine's kernel, which has no kprobes: warn)."""
    return {c["verdict"] for c in doc["checks"] if c["id"] != "bpf-source"}


def failing(checks: dict[str, dict[str, Any]]) -> set[str]:
    return {cid for cid, c in checks.items() if c["verdict"] == "fail"}


def pod_links(lab: Lab) -> list[str]:
    """The node-side veth of every running lab pod (the bridge's ports)."""
    return sorted(lab.names.pod_link_node(pod.slot) for pod in lab.pods.values())


def test_bridge_no_brnf_node_fails_br_netfilter_and_its_fixes_heal_it(
    brnf_off: tuple[Lab, ScenarioResult],
) -> None:
    lab, result = brnf_off
    assert result.attempts[0].outcome != "answered"  # the scenario's failure really happened
    ns = lab.node_netns

    code, doc, checks = doctor(ns, "--ip-cooldown", "30", "--sample-seconds", "0.2")
    assert code == 1
    assert failing(checks) == {"br-netfilter", "syn-sent-vs-ip-cooldown"}
    assert not [c for c in doc["checks"] if c["verdict"] == "error"]
    brnf = checks["br-netfilter"]
    assert brnf["observed"]["bridges"] == {lab.names.bridge: pod_links(lab)}
    assert brnf["observed"]["bridge-nf-call-iptables"] == "0"
    assert brnf["fix"] == f"ip netns exec {ns} sysctl -w {BRNF}=1"
    syn = checks["syn-sent-vs-ip-cooldown"]
    assert syn["observed"]["nf_conntrack_tcp_timeout_syn_sent"] == 120
    assert syn["fix"] == f"ip netns exec {ns} sysctl -w {SYN_SENT}=20"
    # The lab node has no MASQUERADE rules: nothing to fix there.
    assert checks["masquerade-random-fully"]["verdict"] == "pass"

    for check in checks.values():
        if check["verdict"] == "fail":
            for line in check["fix"].splitlines():
                subprocess.run(["sh", "-c", line], check=True, capture_output=True)

    code, doc, checks = doctor(ns, "--ip-cooldown", "30", "--sample-seconds", "0.2")
    assert code == 0, failing(checks)
    assert namespace_verdicts(doc) <= {"pass", "info"}
    # ... and the fix is real: the same client now reaches the catalog pod through the VIP.
    client = next(p for p in lab.pods.values() if p.ref == result.client)
    again = lab.connect(client, lab.services[0], sport=result.flow.sport + 100)
    assert again.outcome == "answered"
    assert again.answered_by == f"{result.old_pod.namespace}/{result.old_pod.name}"


def test_ipv6_bridge_node_without_brnf_fails_on_ip6tables_and_its_fix_heals_it(
    brnf_off_v6: tuple[Lab, ScenarioResult],
) -> None:
    lab, result = brnf_off_v6
    assert result.attempts[0].outcome != "answered"
    ns = lab.node_netns

    code, _, checks = doctor(ns, "--ip-cooldown", "150", "--sample-seconds", "0.2")
    assert code == 1 and failing(checks) == {"br-netfilter"}
    brnf = checks["br-netfilter"]
    assert brnf["observed"]["ipv6_bridges"] == [lab.names.bridge]
    assert brnf["observed"]["bridge-nf-call-ip6tables"] == "0"
    assert brnf["fix"] == f"ip netns exec {ns} sysctl -w {BRNF6}=1"
    assert "bypass ip6tables" in brnf["summary"]

    subprocess.run(["sh", "-c", brnf["fix"]], check=True, capture_output=True)
    code, _, checks = doctor(ns, "--ip-cooldown", "150", "--sample-seconds", "0.2")
    assert code == 0, failing(checks)
    client = next(p for p in lab.pods.values() if p.ref == result.client)
    again = lab.connect(client, lab.services[0], sport=result.flow.sport + 100)
    assert again.outcome == "answered"


def test_well_configured_bridge_node_passes(brnf_on: tuple[Lab, ScenarioResult]) -> None:
    lab, result = brnf_on
    assert result.attempts[0].outcome == "answered"
    # A CNI that keeps a freed IP longer than an unreplied SYN's entry lives (120 s here).
    code, doc, checks = doctor(lab.node_netns, "--ip-cooldown", "150", "--sample-seconds", "0.2")
    assert code == 0 and failing(checks) == set()
    assert namespace_verdicts(doc) <= {"pass", "info"}
    for cid in ("syn-sent-vs-ip-cooldown", "br-netfilter", "masquerade-random-fully",
                "conntrack-fill", "insert-failed"):
        assert checks[cid]["verdict"] == "pass", checks[cid]
    assert checks["br-netfilter"]["observed"]["bridges"] == {lab.names.bridge: pod_links(lab)}
    assert checks["br-netfilter"]["observed"]["bridge-nf-call-iptables"] == "1"


def test_snat_race_node_fails_masquerade_random_fully_and_shows_insert_failed(
    snat_race: tuple[Lab, ScenarioResult],
) -> None:
    lab, result = snat_race
    assert result.counters["insert_failed"] > 0
    ns = lab.node_netns

    code, _, checks = doctor(ns, "--ip-cooldown", "150", "--sample-seconds", "0")
    assert code == 1 and failing(checks) == {"masquerade-random-fully"}
    masq = checks["masquerade-random-fully"]
    [rule] = masq["observed"]["rules_without_random_fully"]
    assert rule["chain"] == "POSTROUTING" and rule["target"] == "MASQUERADE"
    assert f"{lab.names.tag} masquerade" in rule["rule"]
    # Counters are per namespace: what the doctor read is what the scenario pushed up.
    counters = checks["insert-failed"]["observed"]["counters"]
    assert counters["insert_failed"] >= result.counters["insert_failed"]
    assert checks["insert-failed"]["verdict"] == "warn"  # non-zero, not growing any more

    for line in masq["fix"].splitlines():
        subprocess.run(["sh", "-c", line], check=True, capture_output=True)
    code, _, checks = doctor(ns, "--ip-cooldown", "150", "--sample-seconds", "0")
    assert checks["masquerade-random-fully"]["verdict"] == "pass"
    assert code == 0  # the old insert failures stay a warning
