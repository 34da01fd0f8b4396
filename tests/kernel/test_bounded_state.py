"""``cttrace agent`` keeps what a rule needs when the node holds more entries than it may
track, and says so when its source goes blind; checked on this kernel with the netlink
source, in the lab's node namespace, from outside the agent process.

* More live NATed entries than ``--max-entries`` (lowered from its default, which is
  sized from ``nf_conntrack_max``, so that the test is quick): the client's stale
  SYN_SENT entry, created before all the others, still becomes ``wrong-pod`` and
  ``late-establish``, because the agent evicts the answered and finished entries
  first; ``/metrics`` counts every eviction by reason, and its conntrack gauge is
  the traced namespace's table, not the machine's.
* The traced namespace deleted under a running agent: ``/healthz`` and ``/readyz``
  fail and a ``netns-gone`` warning line says why.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cttrace.events import Flow
from cttrace.lab.background import BackgroundScenario
from cttrace.lab.plumbing import delete_netns, in_netns, run
from cttrace.lab.scenario_parts import FRONTEND
from tests.kernel.test_agent_e2e import DEADLINE_S, Agent, agent_on_lab, pod_label, wait_until
from tests.watch_process import owner, ref

pytestmark = pytest.mark.kernel

#: The agent's --max-entries here, and how many answered connections the load makes.
CAP = 300
LOAD = 2 * CAP
#: recycled-ip's client port (its default), for finding the client's entry.
SPORT = 40123

#: In the client pod: LOAD connections to a Service, each answered, then closed.
_CONNECTIONS = """
import socket, sys
vip, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
answered = 0
for _ in range(count):
    with socket.create_connection((vip, port), timeout=5) as s:
        answered += bool(s.recv(100))
print(answered)
"""


def evicted(agent: Agent, reason: str) -> float:
    return agent.sample("cttrace_evicted_entries_total", reason=reason)


class FillOnceTheEntryExists:
    """The scenario's ``on_step``: once the client's first SYN has left its unreplied entry
    in the node's table, more NATed connections than the agent may track go through the
    other Service, and the scenario goes on only when the agent has evicted for them.
    Runs in the scenario's thread: an assertion failing here fails ``bg.result()``."""

    def __init__(self) -> None:
        self.bg: BackgroundScenario | None = None
        self.agent: Agent | None = None
        self.filled = False
        self.kernel_entries = 0  # the node's table right after the load (`conntrack -C`)
        self.gauge = 0.0  # the agent's cttrace_conntrack_entries at that moment

    def __call__(self, note: str) -> None:
        bg, agent = self.bg, self.agent
        if self.filled or bg is None or agent is None:
            return
        lab = bg.lab
        client = next((pod for pod in lab.pods.values() if pod.workload == FRONTEND), None)
        if client is None or not lab.conntrack_entries(Flow(client.ip, SPORT, "", 0)):
            return  # the first SYN has not been sent yet
        self.filled = True
        ledger = next(svc for svc in lab.services if svc.name == "ledger")
        out = subprocess.run(
            in_netns(client.netns, [sys.executable, "-c", _CONNECTIONS, ledger.vip,
                                    str(ledger.port), str(LOAD)]),
            capture_output=True, text=True, timeout=DEADLINE_S, check=True)
        assert int(out.stdout) == LOAD
        # The stale entry and LOAD others: at least this many had to go.
        wait_until(lambda: evicted(agent, "finished") + evicted(agent, "answered")
                   >= LOAD + 1 - CAP, "the agent to evict for the load")
        self.kernel_entries = int(run(in_netns(lab.node_netns, ["conntrack", "-C"])))
        self.gauge = agent.sample("cttrace_conntrack_entries")


def test_more_live_entries_than_the_cap_still_find_the_stale_client_entry(
        tmp_path: Path) -> None:
    fill = FillOnceTheEntryExists()
    with agent_on_lab(tmp_path, "--max-entries", str(CAP), on_step=fill) as (bg, agent, go):
        fill.bg, fill.agent = bg, agent
        go.set()
        result = bg.result(timeout=DEADLINE_S * 2)
        flow = result.flow.to_json()
        assert fill.filled and result.flow.sport == SPORT
        wrong_pod = agent.proc.wait_for(lambda x: x.get("kind") == "finding"
                                        and x.get("rule") == "wrong-pod"
                                        and x.get("orig") == flow, timeout=DEADLINE_S)
        late = agent.proc.wait_for(lambda x: x.get("kind") == "finding"
                                   and x.get("rule") == "late-establish"
                                   and x.get("orig") == flow, timeout=DEADLINE_S)
        got = agent.metrics()
        rc, _ = agent.terminate()
    assert rc == 0, agent.proc.stderr.decode(errors="replace")

    # The table held more live entries than the cap when the client's retry came.
    assert fill.kernel_entries > CAP + LOAD // 2, fill.kernel_entries
    # The agent's gauge is that namespace's table (read in it), give or take an expiry.
    assert abs(fill.gauge - fill.kernel_entries) <= 5, (fill.gauge, fill.kernel_entries)
    assert result.attempts[-1].answered_by == pod_label(result.new_pod)
    assert wrong_pod["severity"] == "critical"
    assert owner(wrong_pod, "new_owner") == ref(result.new_pod)
    assert late["entry_id"] == wrong_pod["entry_id"]

    def reason(name: str) -> float:
        return got[("cttrace_evicted_entries_total", (("reason", name),))]

    assert reason("finished") + reason("answered") >= LOAD + 1 - CAP
    assert reason("unreplied") == 0 and reason("unobserved") == 0
    assert not [x for x in agent.proc.lines if x.get("reason") == "evicted-unreplied"]
    print(f"node table {fill.kernel_entries} entries, --max-entries {CAP}: evicted "
          f"{reason('finished'):g} finished, {reason('answered'):g} answered, 0 unreplied")


def test_deleting_the_traced_namespace_fails_healthz(tmp_path: Path) -> None:
    with agent_on_lab(tmp_path) as (bg, agent, _go):
        assert agent.get("/healthz") == (200, "source attached\n")
        # The lab process still runs its pods; only the node namespace goes.
        delete_netns(bg.node_netns)
        wait_until(lambda: agent.get("/healthz")[0] == 503, "/healthz to fail")
        body = agent.get("/healthz")[1]
        assert "was deleted" in body, body
        assert agent.get("/readyz")[0] == 503
        gone = agent.proc.wait_for(lambda x: x.get("kind") == "warning"
                                   and x.get("reason") == "netns-gone", timeout=DEADLINE_S)
        assert bg.node_netns in gone["msg"]
        agent.metrics()  # /metrics still answers: the failure is visible, not a crash
        rc, _ = agent.terminate()
    assert rc == 0, agent.proc.stderr.decode(errors="replace")
