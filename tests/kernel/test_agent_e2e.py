"""``cttrace agent`` end to end on this kernel: a separate agent process traces the lab's
``recycled-ip`` scenario with the netlink source and a followed identity file, and a real
Alertmanager (Debian's prometheus-alertmanager) on loopback receives the alert.

What an operator relies on, each checked from outside the process, the way the
cluster sees the agent:

* the wrong-pod connection becomes ``CttraceWrongPod`` in Alertmanager's own API,
  with the labels routes and silences match on;
* an Alertmanager that is down when the finding happens still gets the alert once
  it is back, with nothing dropped;
* ``/metrics`` (scraped over HTTP) counts the events and the finding; ``/readyz``
  answers 503 until identity is in sync, then 200;
* SIGTERM under load exits 0 within the shutdown deadline, releases the port, and
  leaves nothing behind.

The agent listens on ``127.0.0.1:0`` (a free port the kernel picks, so tests running
side by side never collide) and its "started" log line says which port it got.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cttrace.identity.model import PodRef
from cttrace.lab.background import BackgroundScenario
from cttrace.lab.plumbing import in_netns, lab_netns
from cttrace.lab.results import ScenarioResult, StepCallback
from tests import agent_http
from tests.agent_http import Samples
from tests.fixtures.alertmanager import Alertmanager, alertmanager, free_port  # noqa: F401
from tests.watch_process import WatchProcess

pytestmark = pytest.mark.kernel

NODE = "ctl-e2e-node"
WRONG_POD = {"alertname": "CttraceWrongPod"}
#: Generous: two cores shared with other test runs and a QEMU VM.
DEADLINE_S = 90.0


def wait_until(condition: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline_s}s waiting for {what}")
        time.sleep(0.1)


class Agent:
    """``cttrace agent`` in its own process; ``port`` is where its HTTP endpoint listens."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.ready_file = tmp_path / "agent-ready"
        self.proc = WatchProcess(["--listen", "127.0.0.1:0", "--node", NODE, *args],
                                 self.ready_file, command="agent")
        self.port = 0

    @property
    def pid(self) -> int:
        return self.proc.proc.pid

    def wait_attached(self) -> None:
        """Its source is attached: it logged ``started`` with its port.

        The ready file comes later, once identity is in sync as well (like /readyz).
        """
        started = self.proc.wait_for(
            lambda x: x.get("kind") == "agent" and x.get("msg") == "started", timeout=10)
        host, port = started["listen"].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        self.port = int(port)

    def get(self, path: str) -> tuple[int, str]:
        """GET ``path`` on the agent: (HTTP status, body)."""
        return agent_http.get(self.port, path)

    def metrics(self) -> Samples:
        """``/metrics`` scraped over HTTP and parsed back: {(name, sorted labels): value}."""
        return agent_http.scrape(self.port)

    def sample(self, name: str, **labels: str) -> float:
        """One sample of a scrape; 0 when the series is not exported (yet)."""
        return self.metrics().get(agent_http.key(name, **labels), 0.0)

    def terminate(self, deadline_s: float = 60.0) -> tuple[int, float]:
        """SIGTERM; (exit code, seconds to exit). Fails if it outlives ``deadline_s``."""
        start = time.monotonic()
        self.proc.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the agent did not exit within {deadline_s}s of SIGTERM") \
                from None
        elapsed = time.monotonic() - start
        self.proc.stop()  # collects the remaining lines and stderr
        return rc, elapsed

    def kill(self) -> None:
        self.proc.kill()


@contextmanager
def agent_on_lab(tmp_path: Path, *args: str, identity_link: bool = False,
                 on_step: StepCallback | None = None,
                 ) -> Iterator[tuple[BackgroundScenario, Agent, threading.Event]]:
    """The recycled-ip lab (built, its scenario waiting for ``go``) and an agent on its node.

    ``identity_link``: the agent follows ``tmp_path/identity.jsonl``, which does not exist
    yet (the identity writer has not started); the test links it to the lab's file when it
    wants identity to arrive. Otherwise the agent follows the lab's identity file directly.
    ``on_step`` is called (in the scenario's thread) after each step of the scenario.
    """
    go = threading.Event()
    lab_identity = tmp_path / "lab-identity.jsonl"
    with BackgroundScenario("recycled-ip", identity_path=lab_identity,
                            wait_ready=go.is_set, on_step=on_step) as bg:
        identity = tmp_path / "identity.jsonl" if identity_link else lab_identity
        agent = Agent(tmp_path, "--source", "netlink", "--netns", bg.node_netns,
                      "--identity-file", str(identity), *args)
        try:
            agent.wait_attached()
            if not identity_link:
                agent.proc.wait_ready(timeout=DEADLINE_S)
            yield bg, agent, go
        finally:
            agent.kill()


def pod_label(pod: PodRef | None) -> str:
    assert pod is not None
    return f"{pod.namespace}/{pod.name}"


def expected_labels(result: ScenarioResult) -> dict[str, str]:
    flow = result.flow
    return {
        "alertname": "CttraceWrongPod",
        "severity": "critical",
        "node": NODE,
        "namespace": result.service.namespace,
        "service": result.service.name,
        "client_pod": pod_label(result.client),
        "old_pod": pod_label(result.old_pod),
        "new_pod": pod_label(result.new_pod),
        "tuple": f"{flow.src}:{flow.sport}->{flow.dst}:{flow.dport}",
    }


def assert_clean_exit(agent: Agent, rc: int) -> None:
    stderr = agent.proc.stderr.decode(errors="replace")
    assert rc == 0, stderr
    assert b"Traceback" not in agent.proc.stderr, stderr
    assert agent.proc.lines[-1]["kind"] == "summary"
    assert not agent.ready_file.exists(), "the ready file outlived the agent"


def findings_sample(agent: Agent) -> float:
    return agent.sample("cttrace_findings_total", rule="wrong-pod", severity="critical")


def test_wrong_pod_alert_in_alertmanager_and_counters_in_metrics(
        tmp_path: Path, alertmanager: Alertmanager) -> None:  # noqa: F811 (fixture)
    with agent_on_lab(tmp_path, "--alertmanager-url", alertmanager.url,
                      identity_link=True) as (bg, agent, go):
        # Attached, but the identity file is not there yet: alive, not ready.
        assert agent.get("/healthz") == (200, "source attached\n")
        status, body = agent.get("/readyz")
        assert (status, body) == (503, "identity not in sync yet\n")
        assert agent.sample("cttrace_identity_in_sync") == 0
        assert not agent.ready_file.exists(), "ready file written before identity was in sync"
        (tmp_path / "identity.jsonl").symlink_to(bg.identity_path)
        wait_until(lambda: agent.get("/readyz") == (200, "ready\n"), "/readyz to turn ready")
        agent.proc.wait_ready(timeout=DEADLINE_S)
        go.set()  # only now does the scenario kill the pod and send its SYNs

        result = bg.result(timeout=DEADLINE_S)
        alert = alertmanager.wait_for_alert(WRONG_POD, deadline_s=DEADLINE_S)
        assert result.attempts[-1].answered_by == pod_label(result.new_pod)
        assert alert["labels"] == expected_labels(result)
        assert alert["status"]["state"] == "active"  # type: ignore[index]
        assert alert["generatorURL"] == f"http://{NODE}:{agent.port}/"
        notes = alert["annotations"]
        assert isinstance(notes, dict)
        assert notes["target"] == f"{result.target[0]}:{result.target[1]}"
        assert pod_label(result.new_pod) in notes["summary"]

        # The sink counts a delivery after Alertmanager answered: wait for that scrape.
        wait_until(lambda: agent.sample("cttrace_alertmanager_alerts_sent_total") >= 1,
                   "the agent to count the delivery")
        got = agent.metrics()
        assert findings_sample(agent) == 1
        events = {labels: value for (name, labels), value in got.items()
                  if name == "cttrace_events_total"}
        # The first SYN created the entry; the retry's SYN-ACK updated the same entry.
        assert events[(("kind", "new"), ("source", "netlink"))] >= 1
        assert events[(("kind", "update"), ("source", "netlink"))] >= 1
        assert got[("cttrace_unreplied_seconds_count", ())] >= 1
        first, retry = result.attempts
        assert got[("cttrace_unreplied_seconds_sum", ())] >= retry.started - first.started - 0.5
        assert got[("cttrace_identity_in_sync", ())] == 1
        assert got[("cttrace_alertmanager_dropped_alerts_total", ())] == 0
        assert got[("cttrace_alertmanager_send_failures_total", ())] == 0
        assert got[("cttrace_lost_events_total", (("source", "netlink"),))] == 0

        rc, _ = agent.terminate()
    assert_clean_exit(agent, rc)


def test_alert_found_during_an_alertmanager_outage_arrives_after_it(
        tmp_path: Path, alertmanager: Alertmanager) -> None:  # noqa: F811 (fixture)
    alertmanager.stop()
    with agent_on_lab(tmp_path, "--alertmanager-url", alertmanager.url) as (bg, agent, go):
        go.set()
        result = bg.result(timeout=DEADLINE_S)
        # Alertmanager comes back only once the agent has found the wrong pod and tried,
        # and failed, to deliver it: the alert waited in the queue meanwhile.
        wait_until(lambda: findings_sample(agent) == 1, "the wrong-pod finding")
        wait_until(lambda: agent.sample("cttrace_alertmanager_send_failures_total") >= 3,
                   "the agent to fail delivering to the stopped Alertmanager")
        during = agent.metrics()
        assert during[("cttrace_alertmanager_queue_depth", ())] >= 1
        assert during[("cttrace_alertmanager_alerts_sent_total", ())] == 0
        alertmanager.start()

        alert = alertmanager.wait_for_alert(WRONG_POD, deadline_s=DEADLINE_S)
        assert alert["labels"] == expected_labels(result)
        wait_until(lambda: agent.sample("cttrace_alertmanager_alerts_sent_total") >= 1,
                   "the agent to count the delivery")
        after = agent.metrics()
        assert after[("cttrace_alertmanager_dropped_alerts_total", ())] == 0
        assert after[("cttrace_alertmanager_retries_total", ())] >= 3

        rc, _ = agent.terminate()
    assert_clean_exit(agent, rc)


#: A client loop for the load: connect to the Service, read the pod's greeting, close.
_LOAD = """
import socket, sys, time
vip, port = sys.argv[1], int(sys.argv[2])
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    try:
        with socket.create_connection((vip, port), timeout=2) as s:
            s.recv(100)
    except OSError:
        time.sleep(0.01)
"""


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry))
    return out


def assert_port_released(port: int) -> None:
    """Nothing answers on the port any more, and a new server can bind it at once."""
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED
    with socket.socket() as server:
        # What a restarted agent does (SO_REUSEADDR): scrapes may leave TIME_WAIT behind.
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()


def test_sigterm_under_load_exits_cleanly_within_the_deadline(tmp_path: Path) -> None:
    # Alerts cannot be delivered (nothing listens there): shutdown must not wait for them
    # past --shutdown-deadline.
    unreachable = f"http://127.0.0.1:{free_port()}"
    shutdown_deadline = 3.0
    with agent_on_lab(tmp_path, "--alertmanager-url", unreachable, "--shutdown-deadline",
                      str(shutdown_deadline)) as (bg, agent, go):
        lab_prefix = bg.lab.names.netns_prefix
        state_dir = bg.lab.state_dir
        go.set()
        result = bg.result(timeout=DEADLINE_S)
        wait_until(lambda: findings_sample(agent) == 1, "the wrong-pod finding")
        wait_until(lambda: agent.sample("cttrace_alertmanager_send_failures_total") >= 1,
                   "a failed delivery")

        # Load: the client pod hammers the other Service (its pods are alive).
        client = bg.lab.pods[pod_label(result.client).split("/", 1)[1]]
        ledger = next(s for s in bg.lab.services if s.name == "ledger")
        load = subprocess.Popen(
            in_netns(client.netns, [sys.executable, "-c", _LOAD, ledger.vip, str(ledger.port),
                                    str(DEADLINE_S * 2)]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            def new_events() -> float:
                return agent.sample("cttrace_events_total", source="netlink", kind="new")

            before = new_events()
            wait_until(lambda: new_events() >= before + 200, "the load to reach the agent")
            assert load.poll() is None, "the load ended before SIGTERM"
            children = child_pids(agent.pid)
            rc, elapsed = agent.terminate(deadline_s=shutdown_deadline + 30)
            assert load.poll() is None, "the load ended before the agent did"
        finally:
            load.kill()
            load.wait()
        assert_clean_exit(agent, rc)
        summary = agent.proc.lines[-1]
        print(f"SIGTERM under load: exit {rc} after {elapsed:.2f}s "
              f"(--shutdown-deadline {shutdown_deadline:g}); {summary['events']} events")
        assert b"not delivered to every Alertmanager" in agent.proc.stderr
        assert_port_released(agent.port)
        assert [p for p in children if Path(f"/proc/{p}").exists()] == []
        assert summary["findings"]["wrong-pod"] == 1 and summary["events"] > 200
    # The lab is torn down with the test: none of its namespaces or state remain.
    assert lab_netns(lab_prefix) == []
    assert not state_dir.exists()
