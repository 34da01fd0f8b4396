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

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from cttrace.identity.model import PodRef
from cttrace.lab.background import BackgroundScenario
from cttrace.lab.results import ScenarioResult
from tests.watch_process import Line

from .conftest import SharedWatch, bpf_prog_ids, write_timing
from .topology import CLIENT_IP, VIP, Topology

pytestmark = pytest.mark.vm

#: How long a finding may take to show after its scenario's traffic, under emulation.
FINDING_S = 90.0
#: SIGTERM under load: the process detaches every probe and exits 0 within this.
SHUTDOWN_DEADLINE_S = 60.0


def ref(pod: PodRef | None) -> dict[str, str] | None:
    return None if pod is None else {"namespace": pod.namespace, "name": pod.name, "uid": pod.uid}


def owner(line: Line, key: str) -> dict[str, str] | None:
    obj = line[key]
    return None if obj is None else {k: obj[k] for k in ("namespace", "name", "uid")}


@contextmanager
def scenario(watch: SharedWatch, name: str, **options: Any) -> Iterator[BackgroundScenario]:
    """The scenario in a lab of its own; its first packet waits until the shared watch
    process has read the lab's identity file (pods and Services) to its end."""
    identity = watch.dir / f"identity-{name}.jsonl"
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


def test_recycled_ip_is_a_wrong_pod_and_an_inherited_entry(bpf_watch: SharedWatch) -> None:
    with scenario(bpf_watch, "recycled-ip") as bg:
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


def test_bridge_without_br_netfilter_is_a_critical_unnated_reply(
    bpf_watch: SharedWatch,
) -> None:
    with scenario(bpf_watch, "bridge-no-brnf", brnf=False) as bg:
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


_LOAD_CODE = r"""
import socket, sys
dst, port = sys.argv[1], int(sys.argv[2])
print("started", flush=True)
while True:
    s = socket.socket()
    try:
        s.connect((dst, port))
    except OSError:
        pass
    s.close()
"""


def new_load_entries(before: list[Line], n: int) -> Callable[[Line], bool]:
    """True at the ``n``-th flow line, not among ``before``, of a new entry of the load."""
    old = {id(line) for line in before}
    seen = 0

    def match(line: Line) -> bool:
        nonlocal seen
        if id(line) not in old and line.get("kind") == "flow" and line["event"] == "new" \
                and (line["orig"]["src"], line["orig"]["dst"]) == (CLIENT_IP, VIP):
            seen += 1
        return seen >= n

    return match


def test_sigterm_under_load_exits_0_and_leaves_no_program(
    bpf_watch: SharedWatch, topology: Topology
) -> None:
    watch = bpf_watch.process
    load = topology.spawn(topology.client_ns, _LOAD_CODE, VIP, "80")
    try:
        assert load.expect_line() == "started"
        # Under load: the process is reporting the load's new entries right now.
        watch.wait_for(new_load_entries(watch.lines, 20), timeout=FINDING_S)
        sent = time.monotonic()
        watch.terminate()
        rc = watch.proc.wait(timeout=SHUTDOWN_DEADLINE_S)
        took = time.monotonic() - sent
    finally:
        load.proc.kill()
        load.proc.wait()
    assert watch.stop() == 0 == rc, watch.stderr.decode(errors="replace")[-3000:]
    assert took < SHUTDOWN_DEADLINE_S
    assert watch.lines[-1]["kind"] == "summary"
    assert b"Traceback" not in watch.stderr
    write_timing("sigterm_to_exit_s", took)

    # Every program it loaded is gone (freed after the last reference: wait for it),
    # and so are its kprobe events.
    deadline = time.monotonic() + SHUTDOWN_DEADLINE_S
    while (left := bpf_prog_ids() - bpf_watch.prog_ids_before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == set(), f"BPF programs left after exit: {sorted(left)}"
    with open("/sys/kernel/tracing/kprobe_events") as f:
        events = f.read()
    assert f"_bcc_{watch.proc.pid}" not in events
