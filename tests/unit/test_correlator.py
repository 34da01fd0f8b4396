"""The correlator's rules on made-up events: every edge a user relies on, at full speed."""

from __future__ import annotations

import gc
import itertools

import pytest

from cttrace.correlator import Correlator, Settings
from cttrace.events import (
    CtEvent,
    CtKind,
    CtStatus,
    Flow,
    ResyncDone,
    SockConnect,
    TcpReset,
    TcpState,
)
from cttrace.findings import Finding, Severity
from cttrace.identity.model import PodRef, ServiceRef
from tests.unit.fake_identity import FakeIdentity

DNAT = int(CtStatus.DST_NAT | CtStatus.DST_NAT_DONE | CtStatus.CONFIRMED)
REPLIED = DNAT | int(CtStatus.SEEN_REPLY)

CLIENT = PodRef("u-client", "shop", "frontend-6d8c9-k2x7p")
CART_A = PodRef("u-cart-a", "shop", "cart-7d9f8-abcde")
CART_A2 = PodRef("u-cart-a2", "shop", "cart-7d9f8-zzzzz")
LEDGER_B = PodRef("u-ledger-b", "billing", "ledger-5c8f9-x2x7q")
CART = ServiceRef("shop", "cart")
LEDGER = ServiceRef("billing", "ledger")

VIP, POD_IP, CLIENT_IP = "10.96.0.10", "10.244.1.5", "10.244.1.9"
ORIG = Flow(CLIENT_IP, 40000, VIP, 80)
REPLY = Flow(POD_IP, 8080, CLIENT_IP, 40000)

_ids = itertools.count(100)


def ct(kind: CtKind, ts: float, state: TcpState | None, status: int = DNAT, *,
       entry_id: int = 1, orig: Flow = ORIG, reply: Flow = REPLY) -> CtEvent:
    return CtEvent(kind, ts, entry_id, orig, reply, None if state is None else int(state), status)


def world(t_a_dies: float | None = 10.0) -> FakeIdentity:
    """cart's pod A holds POD_IP from t=0 until ``t_a_dies``; the client and both Services exist."""
    ident = FakeIdentity()
    ident.hold(CLIENT_IP, CLIENT, 0.0)
    ident.hold(POD_IP, CART_A, 0.0, t_a_dies)
    ident.service(VIP, 80, CART)
    ident.service("10.96.0.20", 80, LEDGER)
    ident.endpoint(CART, POD_IP, CART_A.uid, 0.0, t_a_dies)
    return ident


def run(corr: Correlator, events: list[CtEvent], *, until: float | None = None,
        step: float = 0.5) -> list[Finding]:
    """Feed events in order, ticking between them like the runtime does, then up to ``until``."""
    out: list[Finding] = []
    for ev in events:
        out += corr.tick(ev.ts)
        out += corr.feed(ev, ev.ts)
    t = events[-1].ts
    while until is not None and t < until:
        t += step
        out += corr.tick(t)
    return out


def rules(findings: list[Finding]) -> list[str]:
    return sorted(str(f.rule) for f in findings)


def recycled(ident: FakeIdentity, new_pod: PodRef = LEDGER_B, new_svc: ServiceRef = LEDGER,
             at: float = 12.0) -> None:
    ident.hold(POD_IP, new_pod, at)
    ident.endpoint(new_svc, POD_IP, new_pod.uid, at)


SCENARIO_1 = [
    ct(CtKind.NEW, 9.0, TcpState.SYN_SENT),
    ct(CtKind.UPDATE, 14.0, TcpState.SYN_RECV, REPLIED),
    ct(CtKind.UPDATE, 14.001, TcpState.ESTABLISHED, REPLIED),
]


def test_recycled_ip_to_another_service_is_critical_wrong_pod() -> None:
    ident = world()
    recycled(ident)
    findings = run(Correlator(identity=ident), SCENARIO_1)
    assert rules(findings) == ["late-establish", "wrong-pod"]
    wp = next(f for f in findings if f.rule == "wrong-pod")
    assert wp.severity is Severity.CRITICAL
    assert (wp.client, wp.service, wp.old_owner, wp.new_owner) == (CLIENT, CART, CART_A, LEDGER_B)
    assert wp.orig == ORIG and wp.target == (POD_IP, 8080)
    assert wp.unreplied_s == pytest.approx(5.0)
    assert wp.ts == 14.0, "decided at the first reply, not later"
    j = wp.to_json()
    assert j["old_owner"] == {"namespace": "shop", "name": CART_A.name, "uid": CART_A.uid}
    assert j["new_owner"]["name"] == LEDGER_B.name  # type: ignore[index]
    assert j["service"] == {"namespace": "shop", "name": "cart"}


def test_different_pod_of_the_same_service_is_a_warning() -> None:
    ident = world()
    recycled(ident, CART_A2, CART)
    findings = run(Correlator(identity=ident), SCENARIO_1)
    wp = next(f for f in findings if f.rule == "wrong-pod")
    assert wp.severity is Severity.WARNING
    assert wp.new_owner == CART_A2


def test_same_pod_restarting_with_the_same_ip_is_not_a_finding() -> None:
    ident = world(t_a_dies=None)  # same uid keeps the IP across a container restart
    findings = run(Correlator(identity=ident), SCENARIO_1)
    assert rules(findings) == ["late-establish"]


def test_entry_destroyed_before_any_reply_yields_nothing() -> None:
    ident = world()
    recycled(ident)
    corr = Correlator(identity=ident)
    findings = run(corr, [ct(CtKind.NEW, 9.0, TcpState.SYN_SENT),
                          ct(CtKind.DESTROY, 11.0, TcpState.SYN_SENT)], until=40.0)
    assert findings == []
    assert len(corr.entries) == 0


def test_port_reused_after_the_entry_expired_is_a_new_entry() -> None:
    ident = world()
    recycled(ident)
    events = [
        ct(CtKind.NEW, 9.0, TcpState.SYN_SENT),
        ct(CtKind.DESTROY, 129.0, TcpState.SYN_SENT),  # nf_conntrack_tcp_timeout_syn_sent
        ct(CtKind.NEW, 130.0, TcpState.SYN_SENT, entry_id=2,
           reply=Flow("10.244.2.7", 8080, CLIENT_IP, 40000)),
        ct(CtKind.UPDATE, 130.002, TcpState.SYN_RECV, REPLIED, entry_id=2,
           reply=Flow("10.244.2.7", 8080, CLIENT_IP, 40000)),
    ]
    assert run(Correlator(identity=ident), events) == []


def test_identity_arriving_after_the_reply_is_decided_within_the_grace() -> None:
    ident = world()
    corr = Correlator(Settings(identity_grace=5.0), identity=ident)
    findings = run(corr, SCENARIO_1)
    assert rules(findings) == ["late-establish"]  # pod B not known yet: held
    recycled(ident, at=15.5)  # B's pod status reaches us 1.5 s after it answered
    later = corr.tick(15.6)
    assert rules(later) == ["wrong-pod"]
    assert later[0].new_owner == LEDGER_B and later[0].severity is Severity.CRITICAL
    assert later[0].replied_ts == 14.0


def test_identity_never_arriving_is_decided_at_grace_end_as_unknown() -> None:
    ident = world()
    corr = Correlator(Settings(identity_grace=5.0), identity=ident)
    findings = run(corr, SCENARIO_1, until=18.5)
    assert rules(findings) == ["late-establish"]
    final = corr.tick(19.0)
    assert rules(final) == ["wrong-pod"]
    wp = final[0]
    assert wp.old_owner == CART_A and wp.new_owner is None
    assert wp.to_json()["identity"] == "unknown"
    assert corr.tick(30.0) == [], "decided once"


def test_reply_while_the_chosen_pod_still_holds_the_ip_is_not_wrong_pod() -> None:
    """A slow but living pod: late, not wrong."""
    ident = world(t_a_dies=None)
    findings = run(Correlator(identity=ident), SCENARIO_1, until=30.0)
    assert rules(findings) == ["late-establish"]


def test_fresh_pod_whose_identity_lags_is_not_blamed() -> None:
    """A new pod answers before its status reaches the API: nobody else held the IP."""
    ident = FakeIdentity()
    ident.hold(CLIENT_IP, CLIENT, 0.0)
    ident.service(VIP, 80, CART)
    corr = Correlator(identity=ident)
    events = [ct(CtKind.NEW, 9.0, TcpState.SYN_SENT),
              ct(CtKind.UPDATE, 9.001, TcpState.SYN_RECV, REPLIED)]
    run(corr, events)
    ident.hold(POD_IP, CART_A, 10.0)
    ident.endpoint(CART, POD_IP, CART_A.uid, 10.5)
    assert corr.tick(10.6) == []
    assert corr.tick(20.0) == []


def test_ip_recycled_before_the_entry_from_outside_the_service_is_still_caught() -> None:
    """Identity already shows A gone when the SYN leaves (kube-proxy lagging): B is outside cart."""
    ident = world(t_a_dies=8.0)
    recycled(ident, at=12.0)
    findings = run(Correlator(identity=ident), SCENARIO_1, until=25.0)
    wp = [f for f in findings if f.rule == "wrong-pod"]
    assert len(wp) == 1 and wp[0].severity is Severity.CRITICAL
    assert wp[0].old_owner == CART_A and wp[0].new_owner == LEDGER_B


def test_without_identity_late_establish_still_fires() -> None:
    findings = run(Correlator(), SCENARIO_1, until=40.0)
    assert rules(findings) == ["late-establish"]
    le = findings[0]
    assert le.client is None and le.unreplied_s == pytest.approx(5.0)
    assert le.to_json()["orig"] == {"src": CLIENT_IP, "sport": 40000, "dst": VIP, "dport": 80}


def test_fast_reply_is_not_late() -> None:
    events = [ct(CtKind.NEW, 9.0, TcpState.SYN_SENT),
              ct(CtKind.UPDATE, 9.002, TcpState.SYN_RECV, REPLIED)]
    assert run(Correlator(Settings(late_after=3.0)), events) == []


def test_ipv6_tuples_flow_through() -> None:
    orig = Flow("fd00::9", 40000, "fd00:96::10", 80)
    reply = Flow("fd00:244::5", 8080, "fd00::9", 40000)
    ident = FakeIdentity()
    ident.hold("fd00:244::5", CART_A, 0.0, 10.0)
    ident.hold("fd00:244::5", LEDGER_B, 12.0)
    events = [ct(CtKind.NEW, 9.0, TcpState.SYN_SENT, orig=orig, reply=reply),
              ct(CtKind.UPDATE, 14.0, TcpState.SYN_RECV, REPLIED, orig=orig, reply=reply)]
    findings = run(Correlator(identity=ident), events, until=30.0)
    assert rules(findings) == ["late-establish", "wrong-pod"]
    assert findings[0].to_json()["target"] == {"ip": "fd00:244::5", "port": 8080}


def test_dead_endpoint_fires_once_after_the_pod_is_gone() -> None:
    ident = world(t_a_dies=None)
    corr = Correlator(Settings(dead_after=5.0), identity=ident)
    run(corr, [ct(CtKind.NEW, 1.0, TcpState.SYN_SENT),
               ct(CtKind.UPDATE, 1.001, TcpState.ESTABLISHED, REPLIED)])
    assert corr.tick(9.0) == []
    ident.release(POD_IP, CART_A, 10.0)
    assert corr.tick(12.0) == [], "not before dead_after"
    found = corr.tick(15.5)
    assert rules(found) == ["dead-endpoint"]
    assert found[0].old_owner == CART_A and found[0].client == CLIENT
    assert found[0].to_json()["state"] == "ESTABLISHED"
    assert corr.tick(40.0) == []


def test_finished_connection_to_a_deleted_pod_is_not_dead_endpoint() -> None:
    ident = world(t_a_dies=None)
    corr = Correlator(Settings(dead_after=5.0), identity=ident)
    run(corr, [ct(CtKind.NEW, 1.0, TcpState.SYN_SENT),
               ct(CtKind.UPDATE, 1.001, TcpState.ESTABLISHED, REPLIED),
               ct(CtKind.UPDATE, 2.0, TcpState.TIME_WAIT, REPLIED)])
    ident.release(POD_IP, CART_A, 3.0)
    assert corr.tick(20.0) == []


def test_unreplied_entry_to_a_live_endpoint_is_unnated_reply() -> None:
    ident = world(t_a_dies=None)
    corr = Correlator(Settings(late_after=3.0, identity_grace=5.0), identity=ident)
    run(corr, [ct(CtKind.NEW, 1.0, TcpState.SYN_SENT)])
    assert corr.tick(8.0) == []
    found = corr.tick(9.5)
    assert rules(found) == ["unnated-reply"]
    assert found[0].severity is Severity.WARNING
    assert found[0].to_json()["evidence"] == "no-reply"
    assert corr.tick(30.0) == []


def test_client_rst_to_the_pod_ip_is_critical_unnated_reply() -> None:
    ident = world(t_a_dies=None)
    corr = Correlator(identity=ident)
    run(corr, [ct(CtKind.NEW, 1.0, TcpState.SYN_SENT)])
    rst = TcpReset(1.01, Flow(CLIENT_IP, 40000, POD_IP, 8080), sent=True, pid=77, comm="curl")
    found = corr.feed(rst, 1.01)
    assert rules(found) == ["unnated-reply"]
    assert found[0].severity is Severity.CRITICAL
    assert found[0].to_json()["socket"] == {"pid": 77, "comm": "curl"}


def test_client_rst_finds_entries_created_after_the_first_rst_and_not_destroyed_ones() -> None:
    """The client-side index is built at the first RST and kept up from then on."""
    corr = Correlator(identity=world(t_a_dies=None))
    stray = TcpReset(0.5, Flow(CLIENT_IP, 39999, POD_IP, 8080), sent=True, pid=1, comm="x")
    assert corr.feed(stray, 0.5) == []
    rst = TcpReset(1.01, Flow(CLIENT_IP, 40000, POD_IP, 8080), sent=True, pid=77, comm="curl")
    run(corr, [ct(CtKind.NEW, 1.0, TcpState.SYN_SENT), ct(CtKind.DESTROY, 1.005, None)])
    assert corr.feed(rst, 1.01) == []
    run(corr, [ct(CtKind.NEW, 2.0, TcpState.SYN_SENT, entry_id=2)])
    assert rules(corr.feed(rst._replace(ts=2.01), 2.01)) == ["unnated-reply"]


def _connect(ts: float, sock_id: int, pid: int) -> SockConnect:
    return SockConnect(ts, ORIG, pid, "client", 42, 4026532000, sock_id)


@pytest.mark.parametrize(
    "retry_sock_id",
    [
        0xB,
        # The kernel reuses a closed socket's memory: same address, new socket, new process.
        pytest.param(0xA, id="at-the-freed-sockets-address"),
    ],
)
def test_second_socket_on_an_unreplied_tuple_inherits_the_entry(retry_sock_id: int) -> None:
    corr = Correlator()
    out = corr.feed(_connect(8.999, 0xA, pid=100), 8.999)
    out += corr.feed(ct(CtKind.NEW, 9.0, TcpState.SYN_SENT), 9.0)
    out += corr.feed(_connect(12.0, retry_sock_id, pid=200), 12.0)
    assert rules(out) == ["inherited-entry"]
    socks = out[0].to_json()["sockets"]
    assert socks["old"]["pid"] == 100 and socks["new"]["pid"] == 200  # type: ignore[index]


def test_connect_event_after_its_own_confirm_is_not_inheritance() -> None:
    corr = Correlator()
    out = corr.feed(ct(CtKind.NEW, 9.0, TcpState.SYN_SENT), 9.0)
    out += corr.feed(_connect(9.0005, 0xA, pid=100), 9.0005)  # events raced
    out += corr.feed(_connect(9.2, 0xA, pid=100), 9.2)  # same socket again
    assert out == []


def test_resync_forgets_entries_that_vanished_while_events_were_lost() -> None:
    corr = Correlator()
    corr.feed(ct(CtKind.NEW, 1.0, TcpState.SYN_SENT), 1.0)
    corr.feed(ct(CtKind.NEW, 1.0, TcpState.SYN_SENT, entry_id=2,
                 orig=Flow(CLIENT_IP, 40001, VIP, 80)), 1.0)
    corr.feed(ResyncDone(2.0, "netlink", frozenset({2})), 2.0)
    assert [e.entry_id for e in corr.entries.values()] == [2]


def test_tracked_entries_are_bounded() -> None:
    corr = Correlator(Settings(max_entries=100))
    for i in range(250):
        corr.feed(ct(CtKind.NEW, 1.0, TcpState.SYN_SENT, entry_id=i,
                     orig=Flow(CLIENT_IP, 1000 + i, VIP, 80)), 1.0)
    assert len(corr.entries) == 100
    assert corr.stats.evicted == 150
    assert corr.entries.evicted["unreplied"] == 150
    assert min(e.entry_id for e in corr.entries.values()) == 150, "the oldest go first"


def test_a_full_table_evicts_answered_entries_before_an_old_unreplied_one() -> None:
    # The stale SYN_SENT entry is the oldest; thousands of answered entries come after it.
    ident = world()
    recycled(ident)
    corr = Correlator(Settings(max_entries=100), identity=ident)
    corr.feed(ct(CtKind.NEW, 9.0, TcpState.SYN_SENT), 9.0)
    for i in range(2, 1000):
        other = Flow(CLIENT_IP, 2000 + i, VIP, 80)
        corr.feed(ct(CtKind.NEW, 9.5, TcpState.SYN_SENT, entry_id=i, orig=other), 9.5)
        state = TcpState.ESTABLISHED if i % 2 else TcpState.TIME_WAIT
        corr.feed(ct(CtKind.UPDATE, 9.5, state, REPLIED, entry_id=i, orig=other), 9.5)
    assert len(corr.entries) == 100
    assert corr.entries.evicted["unreplied"] == 0
    assert corr.entries.evicted["answered"] + corr.entries.evicted["finished"] == 899
    found = run(corr, [ct(CtKind.UPDATE, 21.0, TcpState.SYN_RECV, REPLIED)], until=40.0)
    assert rules(found) == ["late-establish", "wrong-pod"]


def test_entries_whose_ids_collide_stay_apart() -> None:
    # nf_ct_get_id() is a 32-bit hash: two live entries can share it.
    ident = world()
    recycled(ident)
    corr = Correlator(identity=ident)
    other = Flow(CLIENT_IP, 40001, VIP, 80)
    corr.feed(ct(CtKind.NEW, 9.0, TcpState.SYN_SENT), 9.0)
    corr.feed(ct(CtKind.NEW, 9.1, TcpState.SYN_SENT, orig=other), 9.1)  # the same id 1
    assert len(corr.entries) == 2
    found = run(corr, [ct(CtKind.UPDATE, 21.0, TcpState.SYN_RECV, REPLIED),
                       ct(CtKind.UPDATE, 21.0, TcpState.SYN_RECV, REPLIED, orig=other)],
                until=40.0)
    assert sorted(rules(found)) == ["late-establish", "late-establish", "wrong-pod", "wrong-pod"]
    assert {f.orig for f in found} == {ORIG, other}


def test_a_destroy_of_another_entry_at_the_tuple_keeps_the_tracked_one() -> None:
    corr = Correlator()
    corr.feed(ct(CtKind.NEW, 1.0, TcpState.SYN_SENT, entry_id=7), 1.0)
    corr.feed(ct(CtKind.DESTROY, 1.1, TcpState.SYN_SENT, entry_id=6), 1.1)
    assert [e.entry_id for e in corr.entries.values()] == [7]
    corr.feed(ct(CtKind.NEW, 2.0, TcpState.SYN_SENT, entry_id=8), 2.0)  # 7's destroy was lost
    assert [e.entry_id for e in corr.entries.values()] == [8]


def test_dead_endpoint_when_the_chosen_pod_was_known_only_just_after_the_entry() -> None:
    """Identity lags the kernel: the pod's ADDED is read 20 ms after its first connection."""
    ident = FakeIdentity()
    ident.hold(CLIENT_IP, CLIENT, 0.0)
    ident.service(VIP, 80, CART)
    corr = Correlator(Settings(dead_after=2.0), identity=ident)
    run(corr, [ct(CtKind.NEW, 1.0, TcpState.SYN_SENT),
               ct(CtKind.UPDATE, 1.0, TcpState.ESTABLISHED, REPLIED)])
    ident.hold(POD_IP, CART_A, 1.02, 1.2)
    found = [f for t in (1.3, 2.0, 3.0, 3.5) for f in corr.tick(t)]
    assert rules(found) == ["dead-endpoint"]
    assert found[0].old_owner == CART_A


def test_entries_share_nothing_they_report() -> None:
    # Entries start with one shared empty frozenset; a report gives only that entry its own.
    corr = Correlator()
    other = Flow(CLIENT_IP, 40001, VIP, 80)
    corr.feed(ct(CtKind.NEW, 1.0, TcpState.SYN_SENT), 1.0)
    corr.feed(ct(CtKind.NEW, 1.0, TcpState.SYN_SENT, entry_id=2, orig=other), 1.0)
    first, second = corr.entries.get(ORIG), corr.entries.get(other)
    assert first is not None and second is not None
    assert first.reported is second.reported and not first.reported
    first.mark_reported("inherited-entry")
    first.mark_reported("unnated-reply")
    assert first.reported == {"inherited-entry", "unnated-reply"}
    assert not second.reported
    assert first.target == (POD_IP, 8080)


def test_entry_keeps_its_tuple_as_a_plain_tuple_the_gc_stops_tracking() -> None:
    corr = Correlator()
    corr.feed(ct(CtKind.NEW, 1.0, TcpState.SYN_SENT), 1.0)
    entry = corr.entries.get(ORIG)
    assert entry is not None
    assert type(entry.orig) is Flow and entry.orig == ORIG and entry.key == ORIG
    gc.collect()
    assert type(entry.orig_tuple) is tuple and not gc.is_tracked(entry.orig_tuple)
