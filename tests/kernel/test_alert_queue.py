"""``cttrace agent --alert-queue`` bounds only what Alertmanager has not accepted yet, and
drops the least severe first, out loud; checked with the agent process on the recycled-ip
lab (netlink source) and a real Alertmanager (Debian's prometheus-alertmanager) on loopback.

* A queue of one, Alertmanager up: two findings seconds apart both arrive. The first,
  delivered, is re-sent for ``--alert-hold`` but does not keep the one slot.
* A queue of one, Alertmanager down: the wrong-pod connection makes a critical
  ``CttraceWrongPod`` and a warning ``CttraceLateEstablish`` at the same moment; the
  warning is the one dropped, in a JSON log line naming its labels, and the critical
  arrives once Alertmanager is back.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cttrace.lab.scenario_parts import FRONTEND, LEDGER
from tests.fixtures.alertmanager import Alertmanager, alertmanager  # noqa: F401 (fixture)
from tests.kernel.test_agent_e2e import (
    DEADLINE_S,
    WRONG_POD,
    Agent,
    agent_on_lab,
    assert_clean_exit,
    expected_labels,
    findings_sample,
    wait_until,
)

pytestmark = pytest.mark.kernel

LATE_ESTABLISH = {"alertname": "CttraceLateEstablish"}
DEAD_ENDPOINT = {"alertname": "CttraceDeadEndpoint"}


def sent(agent: Agent) -> float:
    return agent.sample("cttrace_alertmanager_alerts_sent_total")


def test_a_queue_of_one_delivers_two_findings_seconds_apart(
        tmp_path: Path, alertmanager: Alertmanager) -> None:  # noqa: F811 (fixture)
    # --late-after above the scenario's 3 s: the wrong-pod connection is one finding.
    with agent_on_lab(tmp_path, "--alertmanager-url", alertmanager.url, "--alert-queue", "1",
                      "--late-after", "30") as (bg, agent, go):
        go.set()
        result = bg.result(timeout=DEADLINE_S)
        first = alertmanager.wait_for_alert(WRONG_POD, deadline_s=DEADLINE_S)
        assert first["labels"] == expected_labels(result)
        wait_until(lambda: sent(agent) >= 1, "the agent to count the delivery")

        # Seconds later, a second finding: a ledger pod vanishes under an open connection
        # (dead-endpoint, after --dead-after), while the first alert is still held.
        lab = bg.lab
        client = next(p for p in lab.pods.values() if p.workload == FRONTEND)
        ledger = next(s for s in lab.services if s.name == "ledger")
        recycled = next(p for p in lab.pods.values() if p.ip == result.target[0])
        doomed = next(p for p in lab.pods.values()
                      if p.workload == LEDGER and p is not recycled)
        lab.set_endpoints(ledger, [doomed])
        session = lab.open_session(client, ledger, sport=40200)
        try:
            assert session.connected
            lab.kill_pod(doomed)
            lab.delete_pod_object(doomed)
            lab.set_endpoints(ledger, [recycled])
            second = alertmanager.wait_for_alert(DEAD_ENDPOINT, deadline_s=DEADLINE_S)
        finally:
            session.close()
        assert second["labels"]["old_pod"] == f"{doomed.namespace}/{doomed.name}"  # type: ignore[index]
        wait_until(lambda: sent(agent) >= 2, "the agent to count the second delivery")
        names = sorted(a["labels"]["alertname"] for a in alertmanager.alerts())  # type: ignore[index]
        assert names == ["CttraceDeadEndpoint", "CttraceWrongPod"]
        assert agent.sample("cttrace_alertmanager_dropped_alerts_total") == 0
        assert not [x for x in agent.proc.lines if x.get("kind") == "log"
                    and "dropped" in x], agent.proc.lines
        rc, _ = agent.terminate()
    assert_clean_exit(agent, rc)


def test_a_full_queue_drops_the_warning_keeps_the_critical_and_logs_the_drop(
        tmp_path: Path, alertmanager: Alertmanager) -> None:  # noqa: F811 (fixture)
    alertmanager.stop()
    with agent_on_lab(tmp_path, "--alertmanager-url", alertmanager.url,
                      "--alert-queue", "1") as (bg, agent, go):
        go.set()
        result = bg.result(timeout=DEADLINE_S)
        wait_until(lambda: findings_sample(agent) == 1, "the wrong-pod finding")
        drop = agent.proc.wait_for(lambda x: x.get("kind") == "log" and "dropped" in x,
                                   timeout=DEADLINE_S)
        # One JSON line on the agent's stdout (WatchProcess parsed it), naming what went.
        assert drop["level"] == "warning"
        assert drop["dropped"]["alertname"] == "CttraceLateEstablish"
        assert drop["dropped"]["severity"] == "warning"
        assert "alert queue full" in drop["msg"]
        assert agent.sample("cttrace_findings_total", rule="late-establish",
                            severity="warning") == 1
        assert agent.sample("cttrace_alertmanager_dropped_alerts_total") == 1

        alertmanager.start()
        alert = alertmanager.wait_for_alert(WRONG_POD, deadline_s=DEADLINE_S)
        assert alert["labels"] == expected_labels(result)
        wait_until(lambda: sent(agent) >= 1, "the agent to count the delivery")
        assert alertmanager.alerts(LATE_ESTABLISH) == []
        assert agent.sample("cttrace_alertmanager_dropped_alerts_total") == 1
        rc, _ = agent.terminate()
    assert_clean_exit(agent, rc)
