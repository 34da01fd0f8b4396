"""Lab scenarios for prevention: what ``--remediate`` must leave alone, and SNAT clashes.

- ``graceful-drain``: a long-lived connection to a pod that starts terminating
  (rolling update: Pod deletionTimestamp set, its EndpointSlice endpoint
  ``ready=false, serving=true, terminating=true``, kube-proxy drops it from the
  Service's chains) keeps exchanging data and then closes normally. Its
  conntrack entry is ESTABLISHED and replied: deleting it would send the next
  packet through the Service's rules again, to another pod, which resets it.
  That is why kube-proxy never flushes TCP entries and why ``--remediate``
  touches only entries that never saw a reply.
- ``snat-race`` (DESIGN scenario 3): many concurrent connections from one
  client pod through a MASQUERADE rule without ``--random-fully``; each one
  that finds no free NAT tuple clashes at ``__nf_conntrack_confirm()``, its SYN
  is dropped and the node's ``insert_failed`` and ``drop`` counters grow.

  The race itself (two CPUs picking the same port before either entry is in
  the table) needs many CPUs and luck; on this 2-vCPU machine it cannot be
  provoked on demand. So the rule's port range is narrowed (``--to-ports``,
  ``ports`` wide): the first ``ports`` connections hold every port, and every
  later SYN takes the same path a lost race takes (``get_unique_tuple()`` hands
  out a tuple already in use, the confirm fails, the packet is dropped, the
  same counters grow).

Registered in :data:`cttrace.lab.scenarios.SCENARIOS`.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from cttrace.addr import flow_text
from cttrace.ctstats import parse_conntrack_stats
from cttrace.events import Flow
from cttrace.lab.cluster import LabPod, LabService
from cttrace.lab.k8s_objects import endpoint_slice_objects, pod_object
from cttrace.lab.node import Lab, ReadyCheck
from cttrace.lab.plumbing import in_netns, run, snmp_counters
from cttrace.lab.preconditions import LabError
from cttrace.lab.processes import ClientSession
from cttrace.lab.results import Attempt, Exchange, ScenarioResult, StepCallback
from cttrace.lab.scenario_parts import (
    CHECKOUT,
    CHECKOUT_NEXT,
    FRONTEND,
    LEDGER,
    Story,
    conntrack_state,
    exchange_of,
    flow_to,
    pod_text,
    service_text,
)

#: How long a terminating pod gets before SIGKILL (the Pod's terminationGracePeriodSeconds).
GRACE_PERIOD_S = 30

#: Where snat-race's MASQUERADE may take source ports from (narrowed to ``ports`` of them).
SNAT_PORT_BASE = 61000


# -- graceful-drain ------------------------------------------------------------------------------


def _terminating(lab: Lab, svc: LabService, pod: LabPod, ready: list[LabPod]) -> None:
    """Rolling update, the API side then kube-proxy: Pod MODIFIED with a deletionTimestamp and
    Ready=False; the EndpointSlice lists ``pod`` as terminating (serving, not ready) beside
    ``ready``; kube-proxy keeps only the ready endpoints in the Service's chains."""
    obj = pod_object(pod, deleted_at=time.time() + GRACE_PERIOD_S)
    obj["metadata"]["deletionGracePeriodSeconds"] = GRACE_PERIOD_S
    obj["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    lab.publish("MODIFIED", obj)
    svc.endpoints = list(ready)
    svc.slice_generation += 1
    for slice_obj in endpoint_slice_objects(svc, terminating=[pod]):
        lab.publish("MODIFIED", slice_obj)
    lab.sync_rules()


def _wait_for_state(lab: Lab, flow: Flow, states: set[str], deadline_s: float) -> tuple[str, ...]:
    """The flow's conntrack lines once its state is one of ``states`` (or at the deadline)."""
    deadline = time.monotonic() + deadline_s
    while True:
        entries = lab.conntrack_entries(flow)
        if conntrack_state(entries) in states or time.monotonic() > deadline:
            return entries
        lab.pause_until(time.time() + 0.05)


def graceful_drain(
    lab: Lab,
    *,
    wait_ready: ReadyCheck | None = None,
    on_step: StepCallback | None = None,
    sport: int = 40126,
    lines: int = 3,
    drain_s: float = 4.0,
    interval: float = 0.25,
) -> ScenarioResult:
    """An ESTABLISHED connection to a terminating pod keeps working until it closes normally.

    ``drain_s``: how long the client keeps talking after its pod started terminating
    (every ``interval`` s, one line, which must come back).
    """
    story = Story(on_step)
    frontend = lab.start_pod(FRONTEND, suffix="k2x7p")
    old = lab.start_pod(CHECKOUT, suffix="q9w2z")
    checkout = lab.add_service("shop", "checkout", app="checkout", vip="10.100.18.90",
                               endpoints=[old])
    flow = flow_to(frontend, checkout, sport)
    story("ready", f"node {lab.node_netns}: client {pod_text(frontend)}; "
                   f"{service_text(checkout)} -> {pod_text(old)}")
    lab.wait_ready(wait_ready)

    session = lab.open_session(frontend, checkout, sport=sport)
    attempt = Attempt.from_report(sport, session.pid, session.greeting)
    exchanges: list[Exchange] = []
    conntrack: dict[str, tuple[str, ...]] = {}
    attempts = [attempt]
    try:
        if not session.connected:
            raise LabError(f"graceful-drain: the connection was not answered ({attempt.outcome})")
        for i in range(1, lines + 1):
            exchanges.append(exchange_of(session.send(f"order {i}", wait_s=2.0)))
        conntrack["established"] = lab.conntrack_entries(flow)
        story("connected", f"{flow_text(flow)} answered by "
                           f"{attempt.answered_by}; {lines} lines exchanged; conntrack "
                           f"{conntrack_state(conntrack['established'])}")

        new = lab.start_pod(CHECKOUT_NEXT, suffix="r3t8v")
        _terminating(lab, checkout, old, ready=[new])
        story("terminating", f"rolling update: {pod_text(new)} ready; Pod "
                             f"{old.namespace}/{old.name} terminating (deletionTimestamp set, "
                             f"grace {GRACE_PERIOD_S} s), its "
                             "endpoint ready=false serving=true terminating=true; kube-proxy "
                             "removed it from the Service's chains")

        fresh = lab.connect(frontend, checkout, sport=sport + 1)
        attempts.append(fresh)
        story("new-connection", f"a new connection from port {sport + 1} is answered by "
                                f"{fresh.answered_by}")

        start = tick = time.time()
        sent_before = len(exchanges)
        while tick < start + drain_s:
            exchanges.append(exchange_of(session.send(f"order {len(exchanges) + 1}", wait_s=2.0)))
            tick += interval
            lab.pause_until(tick)
        drained = exchanges[sent_before:]
        conntrack["draining"] = lab.conntrack_entries(flow)
        story("drained", f"{len(drained)} lines sent to the terminating pod over {drain_s:g} s, "
                         f"{sum(e.outcome == 'echoed' for e in drained)} echoed; conntrack "
                         f"{conntrack_state(conntrack['draining'])}")
    finally:
        closed = session.close()
    # Both FINs seen and acknowledged: the entry moves to TIME_WAIT (CLOSE if reset).
    conntrack["closed"] = _wait_for_state(lab, flow, {"TIME_WAIT", "CLOSE"}, deadline_s=10.0)
    counters = {"client_out_rsts": snmp_counters(frontend.netns)["Tcp.OutRsts"],
                "pod_out_rsts": snmp_counters(old.netns)["Tcp.OutRsts"],
                "closed": int(closed is not None and closed.get("event") == "close")}
    story("closed", f"the client closed its connection; conntrack "
                    f"{conntrack_state(conntrack['closed'])}; RSTs sent: client "
                    f"{counters['client_out_rsts']}, terminating pod "
                    f"{counters['pod_out_rsts']}")

    lab.kill_pod(old)
    lab.delete_pod_object(old)
    lab.set_endpoints(checkout, [new])
    story("pod-gone", f"{pod_text(old)} exited after its drain; API: Pod DELETED, EndpointSlice "
                      f"lists {new.namespace}/{new.name} only")

    return ScenarioResult(
        scenario="graceful-drain", instance=lab.instance, node_netns=lab.node_netns,
        identity_path=str(lab.identity_path), client=frontend.ref, client_ip=frontend.ip,
        service=checkout.ref, flow=flow, target=(old.ip, checkout.target_port),
        old_pod=old.ref, new_pod=new.ref, attempts=tuple(attempts), exchanges=tuple(exchanges),
        steps=tuple(story.steps), conntrack=conntrack, counters=counters,
        options={"sport": sport, "lines": lines, "drain_s": drain_s, "interval": interval},
    )


# -- snat-race -------------------------------------------------------------------------------------


def _conntrack_stats(netns: str) -> dict[str, int]:
    return parse_conntrack_stats(run(in_netns(netns, ["cat", "/proc/net/stat/nf_conntrack"])))


def _masquerade(lab: Lab, target: LabPod, ports: int) -> str:
    """Masquerade the node's traffic to ``target`` (as kube-proxy's ``--masquerade-all`` or a
    CNI's egress rule does), without --random-fully, from ``ports`` source ports."""
    rule = [
        "-t", "nat", "-A", "POSTROUTING", "-p", "tcp", "-d", f"{target.ip}/{lab.plan.host_prefix}",
        "-m", "comment", "--comment", f"{lab.names.tag} masquerade, no --random-fully",
        "-j", "MASQUERADE", "--to-ports", f"{SNAT_PORT_BASE}-{SNAT_PORT_BASE + ports - 1}",
    ]
    run(in_netns(lab.node_netns, [lab.plan.iptables, "-w", *rule]))
    return " ".join(rule)


def snat_race(
    lab: Lab,
    *,
    wait_ready: ReadyCheck | None = None,
    on_step: StepCallback | None = None,
    connections: int = 12,
    ports: int = 4,
    base_sport: int = 41000,
    connect_timeout: float = 2.5,
) -> ScenarioResult:
    """``connections`` concurrent connections through MASQUERADE from ``ports`` source ports."""
    if not 0 < ports < connections:
        raise LabError("snat-race needs fewer SNAT ports than connections")
    story = Story(on_step)
    frontend = lab.start_pod(FRONTEND, suffix="k2x7p")
    backend = lab.start_pod(LEDGER, suffix="m4v8t")
    ledger = lab.add_service("billing", "ledger", app="ledger", vip="10.100.52.7",
                             endpoints=[backend])
    rule = _masquerade(lab, backend, ports)  # after the kube-proxy sync, which rewrites nat
    story("ready", f"node {lab.node_netns}: client {pod_text(frontend)}; "
                   f"{service_text(ledger)} -> {pod_text(backend)}; "
                   f"`{lab.plan.iptables} {rule}`")
    lab.wait_ready(wait_ready)

    before = _conntrack_stats(lab.node_netns)
    sports = [base_sport + i for i in range(connections)]

    def open_one(sport: int) -> ClientSession:
        return lab.open_session(frontend, ledger, sport=sport, connect_timeout=connect_timeout)

    with ThreadPoolExecutor(max_workers=connections) as pool:
        sessions = list(pool.map(open_one, sports))
    try:
        after = _conntrack_stats(lab.node_netns)
        attempts = tuple(Attempt.from_report(sport, s.pid, s.greeting)
                         for sport, s in zip(sports, sessions, strict=True))
        conntrack = {"held": tuple(line for sport in sports
                                   for line in lab.conntrack_entries(
                                       flow_to(frontend, ledger, sport)))}
    finally:
        for session in sessions:
            session.close()
    counters = {name: after.get(name, 0) - before.get(name, 0)
                for name in ("insert_failed", "drop", "clashres")}
    answered = sum(a.outcome == "answered" for a in attempts)
    story("burst", f"{connections} concurrent connections, {answered} answered, "
                   f"{connections - answered} not; node conntrack insert_failed "
                   f"+{counters['insert_failed']}, drop +{counters['drop']}")

    first = attempts[0]
    return ScenarioResult(
        scenario="snat-race", instance=lab.instance, node_netns=lab.node_netns,
        identity_path=str(lab.identity_path), client=frontend.ref, client_ip=frontend.ip,
        service=ledger.ref, flow=flow_to(frontend, ledger, first.sport),
        target=(backend.ip, ledger.target_port), old_pod=backend.ref, new_pod=None,
        attempts=attempts, steps=tuple(story.steps), conntrack=conntrack, counters=counters,
        options={"connections": connections, "ports": ports, "base_sport": base_sport,
                 "connect_timeout": connect_timeout},
    )
