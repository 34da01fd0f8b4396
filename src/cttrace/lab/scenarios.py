"""The field failures, replayed on the real kernel.

docs/DESIGN.md, "The problem cttrace exists for", tells each failure.

Each scenario takes a built :class:`~cttrace.lab.node.Lab`, sets up its pods
and Services, waits for ``wait_ready`` (a tracer attaching), makes the failure
happen with real packets, and returns a :class:`ScenarioResult`. Scenarios do
not judge: whether the kernel did the surprising thing is for the caller (a
test, a tracer's checker) to assert from the result.

- ``recycled-ip`` (scenario 1): a retry from the same source port rides a
  SYN_SENT conntrack entry whose DNAT target is a dead pod's recycled IP, and
  reaches a pod of another Service.
- ``dead-pod`` (scenario 2): a long-lived connection keeps sending to a pod
  that vanished; its ESTABLISHED entry still points at the dead IP.
- ``bridge-no-brnf`` (scenario 4): with bridge-nf-call-iptables=0 a same-node
  pod's SYN-ACK is bridged un-NATed, and the client resets it.
- ``snat-race`` (scenario 3) and ``graceful-drain``: see
  :mod:`cttrace.lab.scenarios_prevention`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cttrace.addr import endpoint, flow_text
from cttrace.lab.addressing import Family
from cttrace.lab.node import Lab, Layout, ReadyCheck
from cttrace.lab.plumbing import snmp_counters
from cttrace.lab.preconditions import LabError
from cttrace.lab.proxies import DEFAULT_PROXY
from cttrace.lab.results import Attempt, Exchange, ScenarioResult, StepCallback
from cttrace.lab.scenario_parts import (
    CART,
    CATALOG,
    CHECKOUT,
    FRONTEND,
    LEDGER,
    Story,
    conntrack_text,
    exchange_of,
    flow_to,
    outcome_text,
    pod_text,
    service_text,
)
from cttrace.lab.scenarios_prevention import graceful_drain, snat_race


def recycled_ip(
    lab: Lab,
    *,
    wait_ready: ReadyCheck | None = None,
    on_step: StepCallback | None = None,
    sport: int = 40123,
    late_after: float = 3.0,
    connect_timeout: float = 1.5,
    v4_mapped: bool = False,
) -> ScenarioResult:
    """A dead cart pod's IP goes to a ledger pod; a retry from the same port reaches ledger.

    ``late_after``: the retry waits until at least this long after the first SYN,
    so that a tracer's "late establish" threshold is clearly crossed.
    ``v4_mapped`` (IPv4 node): the client connects through an AF_INET6 socket to
    ``::ffff:<VIP>``, as a dual-stack program does; the kernel sends IPv4.
    """
    if v4_mapped and lab.plan.version != 4:
        raise LabError("v4_mapped needs a node whose traffic is IPv4 (--family 4)")
    story = Story(on_step)
    frontend = lab.start_pod(FRONTEND, suffix="k2x7p")
    cart_a = lab.start_pod(CART, suffix="w5n4t")
    ledger_1 = lab.start_pod(LEDGER, suffix="m4v8t")
    cart = lab.add_service("shop", "cart", app="cart", vip="10.100.37.12", endpoints=[cart_a])
    ledger = lab.add_service("billing", "ledger", app="ledger", vip="10.100.52.7",
                             endpoints=[ledger_1])
    flow = flow_to(frontend, cart, sport)
    story("ready", f"node {lab.node_netns}: client {pod_text(frontend)}; {service_text(cart)} -> "
                   f"{pod_text(cart_a)}; {service_text(ledger)} -> {pod_text(ledger_1)}")
    lab.wait_ready(wait_ready)

    lab.kill_pod(cart_a)
    story("pod-killed", f"{pod_text(cart_a)} killed abruptly (no FIN, no RST): its netns, veth and "
                        f"/{lab.plan.host_prefix} route are gone; kube-proxy rules and the API do "
                        "not know yet")

    first = lab.connect(frontend, cart, sport=sport, connect_timeout=connect_timeout,
                        v4_mapped=v4_mapped)
    conntrack = {"after-first-attempt": lab.conntrack_entries(flow)}
    story("first-attempt", f"{flow_text(flow)}, DNAT to the dead "
                           f"pod's {endpoint(cart_a.ip, cart.target_port)}: {outcome_text(first)}; "
                           f"{conntrack_text(conntrack['after-first-attempt'])}")

    lab.delete_pod_object(cart_a)
    lab.set_endpoints(cart, [])
    story("endpoint-removed", f"API: Pod {cart_a.namespace}/{cart_a.name} DELETED, EndpointSlice "
                              f"{cart.namespace}/{cart.slice_name} has no endpoints; kube-proxy "
                              "removed the endpoint from its rules")

    pod_b = lab.start_pod(LEDGER, suffix="x2x7q", ips=cart_a.ips)
    lab.set_endpoints(ledger, [ledger_1, pod_b])
    story("ip-recycled", f"{pod_text(pod_b)} started with the dead cart pod's IP; the API and "
                         f"kube-proxy added it to Service {ledger.namespace}/{ledger.name}")

    lab.pause_until(first.started + late_after)
    retry = lab.connect(frontend, cart, sport=sport, connect_timeout=connect_timeout,
                        v4_mapped=v4_mapped)
    conntrack["after-retry"] = lab.conntrack_entries(flow)
    story("retry", f"retry from the same port {sport}, {retry.started - first.started:.1f} s "
                   f"after the first SYN: {outcome_text(retry)}; "
                   f"{conntrack_text(conntrack['after-retry'])}")

    return ScenarioResult(
        scenario="recycled-ip", instance=lab.instance, node_netns=lab.node_netns,
        identity_path=str(lab.identity_path), client=frontend.ref, client_ip=frontend.ip,
        service=cart.ref, flow=flow, target=(cart_a.ip, cart.target_port),
        old_pod=cart_a.ref, new_pod=pod_b.ref, attempts=(first, retry),
        steps=tuple(story.steps), conntrack=conntrack,
        options={"sport": sport, "late_after": late_after, "connect_timeout": connect_timeout,
                 "v4_mapped": v4_mapped},
    )


def dead_pod(
    lab: Lab,
    *,
    wait_ready: ReadyCheck | None = None,
    on_step: StepCallback | None = None,
    sport: int = 40124,
    lines: int = 3,
    void_s: float = 3.0,
    interval: float = 0.2,
) -> ScenarioResult:
    """A long-lived connection outlives its pod: the client keeps writing into the void."""
    story = Story(on_step)
    frontend = lab.start_pod(FRONTEND, suffix="k2x7p")
    pod_d = lab.start_pod(CHECKOUT, suffix="q9w2z")
    checkout = lab.add_service("shop", "checkout", app="checkout", vip="10.100.18.90",
                               endpoints=[pod_d])
    flow = flow_to(frontend, checkout, sport)
    story("ready", f"node {lab.node_netns}: client {pod_text(frontend)}; "
                   f"{service_text(checkout)} -> {pod_text(pod_d)}")
    lab.wait_ready(wait_ready)

    session = lab.open_session(frontend, checkout, sport=sport)
    attempt = Attempt.from_report(sport, session.pid, session.greeting)
    story("connected",
          f"{flow_text(flow)}: {outcome_text(attempt)}")
    exchanges: list[Exchange] = []
    conntrack: dict[str, tuple[str, ...]] = {}
    try:
        if not session.connected:
            raise LabError(f"dead-pod: the first connection was not answered ({attempt.outcome})")
        for i in range(1, lines + 1):
            exchanges.append(exchange_of(session.send(f"order {i}", wait_s=2.0)))
        conntrack["established"] = lab.conntrack_entries(flow)
        echoed = sum(e.outcome == "echoed" for e in exchanges)
        story("exchanged", f"{lines} lines sent, {echoed} echoed by {pod_d.namespace}/{pod_d.name}")

        lab.kill_pod(pod_d)
        lab.delete_pod_object(pod_d)
        lab.set_endpoints(checkout, [])
        story("pod-vanished", f"{pod_text(pod_d)} vanished (no FIN, no RST); API: Pod DELETED, "
                              "EndpointSlice emptied; kube-proxy removed its rules")

        start = tick = time.time()
        sent_before = len(exchanges)
        while tick < start + void_s:
            exchanges.append(exchange_of(session.send(f"order {len(exchanges) + 1}",
                                                    wait_s=interval / 2)))
            tick += interval
            lab.pause_until(tick)
        void = exchanges[sent_before:]
        conntrack["into-the-void"] = lab.conntrack_entries(flow)
        story("into-the-void", f"{len(void)} lines sent every {interval * 1000:.0f} ms for "
                               f"{void_s:g} s, {sum(e.outcome == 'echoed' for e in void)} "
                               f"echoed; {conntrack_text(conntrack['into-the-void'])}, DNAT to "
                               f"the dead pod's {pod_d.ip}")
    finally:
        session.close()
    conntrack["closed"] = lab.conntrack_entries(flow)
    story("closed", "the client gave up and closed its socket; the FIN queues behind the "
                    "unacknowledged lines, which its kernel keeps retransmitting into the void")

    return ScenarioResult(
        scenario="dead-pod", instance=lab.instance, node_netns=lab.node_netns,
        identity_path=str(lab.identity_path), client=frontend.ref, client_ip=frontend.ip,
        service=checkout.ref, flow=flow, target=(pod_d.ip, checkout.target_port),
        old_pod=pod_d.ref, new_pod=None, attempts=(attempt,), exchanges=tuple(exchanges),
        steps=tuple(story.steps), conntrack=conntrack,
        options={"sport": sport, "lines": lines, "void_s": void_s, "interval": interval},
    )


def bridge_no_brnf(
    lab: Lab,
    *,
    wait_ready: ReadyCheck | None = None,
    on_step: StepCallback | None = None,
    brnf: bool = False,
    sport: int = 40125,
    connect_timeout: float = 1.5,
) -> ScenarioResult:
    """A same-node client on a bridge connects to a Service; ``brnf`` sets
    net.bridge.bridge-nf-call-iptables in the node (False: the failure, True: the control).

    The client's SYN to the VIP goes to its gateway, the bridge's own address, so
    the node routes it: PREROUTING DNATs it to the pod. The pod's SYN-ACK to the
    client stays on the bridge's L2 segment and never enters the IP stack; only
    br_netfilter (br_nf_pre_routing, when bridge-nf-call-iptables=1) hands a
    bridged frame to conntrack for the reverse NAT. Without it, the SYN-ACK
    arrives from pod-IP:8080, matches no socket, and the client's kernel answers
    with RST (tcp_v4_send_reset), while the entry never sees a reply.
    """
    if lab.layout != "bridge":
        raise LabError("bridge-no-brnf needs a lab built with layout='bridge'")
    story = Story(on_step)
    lab.set_bridge_nf_call_iptables(brnf)
    frontend = lab.start_pod(FRONTEND, suffix="k2x7p")
    backend = lab.start_pod(CATALOG, suffix="h5m2n")
    catalog = lab.add_service("shop", "catalog", app="catalog", vip="10.100.61.5",
                              endpoints=[backend])
    flow = flow_to(frontend, catalog, sport)
    story("ready", f"node {lab.node_netns}: bridge {lab.names.bridge}, "
                   f"bridge-nf-call-iptables={int(brnf)}; client {pod_text(frontend)}; "
                   f"{service_text(catalog)} -> {pod_text(backend)}")
    lab.wait_ready(wait_ready)

    attempt = lab.connect(frontend, catalog, sport=sport, connect_timeout=connect_timeout)
    conntrack = {"after-attempt": lab.conntrack_entries(flow)}
    # The client pod's own namespace counts the RSTs its kernel sent (tcp_v4_send_reset).
    client_rsts = snmp_counters(frontend.netns)["Tcp.OutRsts"]
    story("attempt", f"{flow_text(flow)}: "
                     f"{outcome_text(attempt)}; the client's kernel sent {client_rsts} RST(s); "
                     f"{conntrack_text(conntrack['after-attempt'])}")

    return ScenarioResult(
        scenario="bridge-no-brnf", instance=lab.instance, node_netns=lab.node_netns,
        identity_path=str(lab.identity_path), client=frontend.ref, client_ip=frontend.ip,
        service=catalog.ref, flow=flow, target=(backend.ip, catalog.target_port),
        old_pod=backend.ref, new_pod=None, attempts=(attempt,),
        steps=tuple(story.steps), conntrack=conntrack, counters={"client_out_rsts": client_rsts},
        options={"brnf": brnf, "sport": sport, "connect_timeout": connect_timeout},
    )


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    layout: Layout  # the Lab layout it needs
    summary: str  # one line for `cttrace lab list` and --help
    run: Callable[..., ScenarioResult]  # (lab, *, wait_ready, on_step, **options)

    def play(self, lab: Lab, *, wait_ready: ReadyCheck | None = None,
             on_step: StepCallback | None = None, **options: Any) -> ScenarioResult:
        """Run it on ``lab``; says first, and records in the result, who wrote the rules."""
        if on_step is not None:
            on_step(f"Service rules: {lab.proxy.description}")
        result = self.run(lab, wait_ready=wait_ready, on_step=on_step, **options)
        return dataclasses.replace(result, proxy=lab.proxy.name)


SCENARIOS: dict[str, Scenario] = {
    s.name: s for s in (
        Scenario("recycled-ip", "routed",
                 "a retry from the same source port reaches the pod that inherited a dead "
                 "pod's IP, in another Service (DESIGN scenario 1)", recycled_ip),
        Scenario("dead-pod", "routed",
                 "a long-lived connection keeps sending to a pod that vanished "
                 "(DESIGN scenario 2)", dead_pod),
        Scenario("bridge-no-brnf", "bridge",
                 "bridge-nf-call-iptables=0: a same-node pod's SYN-ACK bypasses reverse NAT "
                 "and the client resets it (DESIGN scenario 4)", bridge_no_brnf),
        Scenario("snat-race", "routed",
                 "concurrent connections through MASQUERADE without --random-fully clash on "
                 "one NAT tuple: insert_failed and drop grow (DESIGN scenario 3)", snat_race),
        Scenario("graceful-drain", "routed",
                 "an established connection to a terminating pod drains and closes normally "
                 "(what --remediate must never break)", graceful_drain),
    )
}


def get_scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise LabError(f"unknown scenario {name!r}: choose one of {', '.join(SCENARIOS)}") from None


def run_scenario(
    name: str,
    *,
    instance: str | None = None,
    identity_path: Path | None = None,
    wait_ready: ReadyCheck | None = None,
    on_step: StepCallback | None = None,
    keep: bool = False,
    family: Family | str = Family.V4,
    proxy: str = DEFAULT_PROXY,
    **options: Any,
) -> ScenarioResult:
    """Build a lab for scenario ``name`` (on a node of IP ``family``: 4, 6 or dual; its
    Service rules written by ``proxy``, one of :data:`cttrace.lab.proxies.PROXIES`), run it,
    tear the lab down (unless ``keep``)."""
    scenario = get_scenario(name)
    with Lab(instance=instance, layout=scenario.layout, identity_path=identity_path,
             keep=keep, family=family, proxy=proxy) as lab:
        return scenario.play(lab, wait_ready=wait_ready, on_step=on_step, **options)
