"""The BCC programs on Debian's kernel: they load, attach, and report real flows field by field.

Every test drives real packets through tests/vm/topology.py (client → node
DNAT → server, the node a namespace of its own) and reads the one shared
:class:`~cttrace.sources.bpf.BpfSource` (filtered to the node's namespace)
through the session's EventLog. Each test uses its own client source port,
so tests never see each other's tuples. The checked records are saved as
samples for tests/unit/test_bpf_layout.py.
"""

from __future__ import annotations

import errno
import itertools
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cttrace.events import CtEvent, CtKind, CtStatus, Event, Flow, SockConnect, TcpReset, TcpState
from cttrace.rules import UNREPLIED_TCP_STATES, WANTED_TCP_STATES
from cttrace.sources.bpf import BpfSource
from cttrace.sources.netlink import NetlinkSource

from .conftest import EventLog
from .topology import CLIENT_IP, CLIENT_LOCAL_VIP, SERVER_IP, VIP, Topology

pytestmark = pytest.mark.vm

#: How the conntrack functions are hooked where the kernel has nf_conntrack's BTF.
CONNTRACK_HOOKS = {"__nf_conntrack_confirm": "fexit", "nf_conntrack_tcp_packet": "fexit",
                   "nf_ct_delete": "fentry"}



def is_kernel_pointer(value: int) -> bool:
    """A kernel address on x86-64: in the canonical upper half (bit 63 set; where the
    half starts depends on the paging mode: 0xffff8000... with 4 levels, 0xff000000...
    with 5, as under QEMU's TCG), and 8-byte aligned (slab objects)."""
    return value >> 63 == 1 and value % 8 == 0

Samples = dict[str, dict[str, object]]


def ct(kind: CtKind, *, orig: Flow | None = None, of: Event | None = None,
       state: TcpState | None = None) -> Callable[[Event], bool]:
    """Matches conntrack events; ``of``: of the entry that NEW event created (same id,
    same tuple: the id is the nf_conn's address, which a later entry may reuse)."""
    if of is not None:
        assert isinstance(of, CtEvent)
        orig = of.orig

    def match(event: Event) -> bool:
        return (
            isinstance(event, CtEvent)
            and event.kind is kind
            and (orig is None or event.orig == orig)
            and (of is None or (event.entry_id == of.entry_id and event.ts >= of.ts))
            and (state is None or event.tcp_state == state)
        )
    return match


def transitions(log: EventLog, new: Event) -> list[tuple[int | None, int | None]]:
    """The state changes reported for the entry ``new`` created."""
    return [
        (e.old_tcp_state, e.tcp_state)
        for e in log.matching(ct(CtKind.UPDATE, of=new))
        if isinstance(e, CtEvent)
    ]


def record(samples: Samples, name: str, log: EventLog, event: Event,
           expect: dict[str, object]) -> None:
    samples[name] = {"raw_hex": log.raw_of(event).hex(), "expect": expect}


def flow_json(flow: Flow) -> list[object]:
    return [flow.src, flow.sport, flow.dst, flow.dport]


def test_programs_load_and_attach(bpf: BpfSource, topology: Topology) -> None:
    source = bpf
    assert source.settings is not None
    # Settled by probing the kernel: 6.1 has BPF ring buffers (5.8+) and a
    # probeable tcp_v4_send_reset, and tcp_v6_send_reset beside it (IPv6 built in).
    assert source.settings.ringbuf
    assert source.settings.send_reset == "kprobe"
    assert source.hooks()["tcp_v6_send_reset"][0] == "kprobe"
    assert source.settings.netns_ino == topology.netns_ino(topology.node_ns)
    # Both kernels have nf_conntrack's BTF: its functions carry trampolines cttrace loads
    # itself (BCC cannot), and no kretprobe is attached anywhere.
    hooks = source.hooks()
    assert {fn: hooks[fn][0] for fn in CONNTRACK_HOOKS} == CONNTRACK_HOOKS
    assert hooks["tcp_connect"][0] == "fentry"
    stats = source.stats()
    assert stats.lost == 0
    assert stats.extra["undecodable"] == 0
    assert stats.extra["trampoline_misses"] == 0
    assert f"#define CTT_NETNS_INO {source.settings.netns_ino}U" in source.dump_text()


def test_nat_flow_confirm_transitions_and_delete(
    topology: Topology, tracer: EventLog, samples: Samples
) -> None:
    sport = 40001
    orig = Flow(CLIENT_IP, sport, VIP, 80)
    reply = Flow(SERVER_IP, 8080, CLIENT_IP, sport)
    before = time.time()
    client = topology.client(VIP, 80, sport)
    assert client.expect_line() == "connected"
    after = time.time()

    new = tracer.wait_for(ct(CtKind.NEW, orig=orig), f"NEW for {orig}")
    assert isinstance(new, CtEvent)
    assert new.reply == reply
    assert new.target == (SERVER_IP, 8080)
    assert new.tcp_state == TcpState.SYN_SENT
    assert new.old_tcp_state is None
    assert new.status & CtStatus.DST_NAT
    assert new.status & CtStatus.CONFIRMED
    assert not new.status & CtStatus.SEEN_REPLY
    assert (new.zone, new.mark, new.source) == (0, 0, "bpf")
    assert is_kernel_pointer(new.entry_id)
    assert before - 1.0 <= new.ts <= after + 1.0  # CLOCK_MONOTONIC converted to wall clock

    syn_recv = tracer.wait_for(
        ct(CtKind.UPDATE, of=new, state=TcpState.SYN_RECV), "SYN_RECV"
    )
    established = tracer.wait_for(
        ct(CtKind.UPDATE, of=new, state=TcpState.ESTABLISHED), "ESTABLISHED"
    )
    assert isinstance(syn_recv, CtEvent) and isinstance(established, CtEvent)
    assert syn_recv.old_tcp_state == TcpState.SYN_SENT
    assert established.old_tcp_state == TcpState.SYN_RECV
    for update in (syn_recv, established):
        assert (update.orig, update.reply) == (orig, reply)
    assert established.status & CtStatus.SEEN_REPLY

    topology.conntrack_delete(sport)
    destroy = tracer.wait_for(ct(CtKind.DESTROY, of=new), "DESTROY")
    assert isinstance(destroy, CtEvent)
    assert (destroy.orig, destroy.reply) == (orig, reply)
    assert destroy.tcp_state == TcpState.ESTABLISHED
    # Only the transitions the rules need left the kernel.
    assert transitions(tracer, new) == [
        (TcpState.SYN_SENT, TcpState.SYN_RECV),
        (TcpState.SYN_RECV, TcpState.ESTABLISHED),
    ]

    common = {"type": "CtEvent", "orig": flow_json(orig), "reply": flow_json(reply),
              "status_has": ["DST_NAT", "CONFIRMED"], "zone": 0, "mark": 0, "entry": "flow1"}
    record(samples, "ct_new", tracer, new,
           {**common, "kind": "NEW", "tcp_state": 1, "old_tcp_state": None})
    record(samples, "ct_update_syn_recv", tracer, syn_recv,
           {**common, "kind": "UPDATE", "tcp_state": 2, "old_tcp_state": 1})
    record(samples, "ct_destroy", tracer, destroy,
           {**common, "kind": "DESTROY", "tcp_state": 3, "old_tcp_state": None})


def test_connect_names_the_socket_and_its_tuple(
    topology: Topology, tracer: EventLog, samples: Samples
) -> None:
    sport = 40006
    flow = Flow(CLIENT_IP, sport, VIP, 80)
    client = topology.client(VIP, 80, sport)
    assert client.expect_line() == "connected"
    comm, cgroup = client.comm(), client.cgroup_path()

    conn = tracer.wait_for(
        lambda e: isinstance(e, SockConnect) and e.flow == flow, f"connect of {flow}"
    )
    assert isinstance(conn, SockConnect)
    assert conn.pid == client.pid
    assert conn.comm == comm
    assert conn.netns_ino == topology.netns_ino(topology.client_ns)
    assert is_kernel_pointer(conn.sock_id)
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        # cgroup v2 id = inode of the cgroup's directory (kernfs node id)
        assert conn.cgroup_id == os.stat(f"/sys/fs/cgroup{cgroup}").st_ino
    else:
        assert conn.cgroup_id == 1  # the unmounted default hierarchy's root
    # The socket's tuple is the original tuple of the entry its SYN created, and the
    # socket is reported before that SYN (tcp_connect's entry).
    created = tracer.wait_for(ct(CtKind.NEW, orig=flow), f"NEW for {flow}")
    assert tracer.events.index(conn) < tracer.events.index(created)
    record(samples, "connect", tracer, conn,
           {"type": "SockConnect", "flow": flow_json(flow), "pid": client.pid, "comm": comm,
            "netns_ino": conn.netns_ino})


def test_resets_sent_without_a_socket_and_received(
    topology: Topology, tracer: EventLog, samples: Samples
) -> None:
    sport = 40002
    client = topology.client(VIP, 81, sport)  # 8081 has no listener
    assert client.expect_line() == f"error {errno.ECONNREFUSED}"

    # The server's kernel answers the SYN from tcp_v4_send_reset(NULL, skb).
    sent_flow = Flow(SERVER_IP, 8081, CLIENT_IP, sport)
    sent = tracer.wait_for(
        lambda e: isinstance(e, TcpReset) and e.sent and e.flow == sent_flow, "RST sent"
    )
    # The client's socket receives it reverse-NATed, from the VIP.
    received_flow = Flow(VIP, 81, CLIENT_IP, sport)
    received = tracer.wait_for(
        lambda e: isinstance(e, TcpReset) and not e.sent and e.flow == received_flow,
        "RST received",
    )
    new = tracer.wait_for(ct(CtKind.NEW, orig=Flow(CLIENT_IP, sport, VIP, 81)), "NEW")
    assert isinstance(new, CtEvent)
    # The RST kills the unreplied entry inside nf_conntrack_tcp_packet, before it
    # returns: the transition is reported from the delete, then the delete itself.
    close = tracer.wait_for(
        ct(CtKind.UPDATE, of=new, state=TcpState.CLOSE), "SYN_SENT -> CLOSE"
    )
    destroy = tracer.wait_for(ct(CtKind.DESTROY, of=new), "DESTROY")
    assert isinstance(close, CtEvent) and close.old_tcp_state == TcpState.SYN_SENT
    assert isinstance(destroy, CtEvent) and destroy.tcp_state == TcpState.CLOSE
    assert tracer.events.index(close) < tracer.events.index(destroy)
    assert transitions(tracer, new) == [(TcpState.SYN_SENT, TcpState.CLOSE)]
    record(samples, "reset_sent", tracer, sent,
           {"type": "TcpReset", "flow": flow_json(sent_flow), "sent": True})
    record(samples, "reset_received", tracer, received,
           {"type": "TcpReset", "flow": flow_json(received_flow), "sent": False})


def test_entries_of_other_namespaces_are_filtered_in_the_kernel(
    topology: Topology, bpf: BpfSource, tracer: EventLog
) -> None:
    filtered_before = bpf.stats().filtered
    sport = 40005
    # The client namespace DNATs CLIENT_LOCAL_VIP:80 to VIP:84 (its own entry),
    # then the node DNATs VIP:84 to the server (the node's entry).
    client = topology.client(CLIENT_LOCAL_VIP, 80, sport)
    assert client.expect_line() == "connected"
    node_entry = tracer.wait_for(ct(CtKind.NEW, orig=Flow(CLIENT_IP, sport, VIP, 84)), "NEW")
    assert isinstance(node_entry, CtEvent)
    assert node_entry.reply == Flow(SERVER_IP, 8084, CLIENT_IP, sport)
    # The client namespace confirmed its entry earlier on the same SYN's way;
    # the ring buffer keeps that order, so had it been reported it would be here.
    assert not tracer.matching(
        lambda e: isinstance(e, CtEvent) and e.orig.dst == CLIENT_LOCAL_VIP
    )
    assert bpf.stats().filtered > filtered_before


def test_second_socket_on_a_tuple_inherits_the_unreplied_entry(
    topology: Topology, tracer: EventLog
) -> None:
    """The mechanism behind wrong-pod: a new socket's SYN reuses an old DNAT decision."""
    sport = 40003
    flow = Flow(CLIENT_IP, sport, VIP, 82)
    topology.block_server_port(8082, True)  # SYNs vanish: the entry stays SYN_SENT
    try:
        first = topology.client(VIP, 82, sport, wait=False)
        assert first.expect_line() == "sent"
        new = tracer.wait_for(ct(CtKind.NEW, orig=flow), f"NEW for {flow}")
        first_conn = tracer.wait_for(
            lambda e: isinstance(e, SockConnect) and e.pid == first.pid, "first connect"
        )
        first.stop()  # a SYN_SENT socket closes silently; the port is free at once
        second = topology.client(VIP, 82, sport)
        second_conn = tracer.wait_for(
            lambda e: isinstance(e, SockConnect) and e.pid == second.pid, "second connect"
        )
    finally:
        topology.block_server_port(8082, False)
    assert isinstance(first_conn, SockConnect) and isinstance(second_conn, SockConnect)
    assert first_conn.flow == second_conn.flow == flow

    assert second.expect_line() == "connected"  # a retransmitted SYN got through
    answered = tracer.wait_for(
        ct(CtKind.UPDATE, of=new, state=TcpState.SYN_RECV),
        "SYN_RECV on the first socket's entry",
    )
    assert isinstance(answered, CtEvent) and answered.old_tcp_state == TcpState.SYN_SENT
    # The new socket is reported before its SYN is answered: what inherited-entry needs.
    assert tracer.events.index(second_conn) < tracer.events.index(answered)
    # One entry served both sockets: no second confirm came before it was answered.
    assert len(tracer.matching(ct(CtKind.NEW, orig=flow))) == 1


def test_netlink_and_bpf_see_the_same_entry_and_transitions(
    topology: Topology, tracer: EventLog
) -> None:
    # Unfiltered: every state ctnetlink reports (the kernel filter drops the closing ones).
    netlink = NetlinkSource(netns=topology.node_ns, kernel_filter=False)
    netlink.open()  # before the flow: entries get ctnetlink events only if a listener existed
    nl_log = EventLog(netlink)
    sport = 40004
    flow = Flow(CLIENT_IP, sport, VIP, 83)
    try:
        client = topology.client(VIP, 83, sport)
        assert client.expect_line() == "connected"
        new = tracer.wait_for(ct(CtKind.NEW, orig=flow), "bpf NEW")
        tracer.wait_for(
            ct(CtKind.UPDATE, orig=flow, state=TcpState.ESTABLISHED), "bpf ESTABLISHED"
        )
        client.stop()  # FIN handshake: only its end (TIME_WAIT) passes the bpf filter
        nl_log.wait_for(ct(CtKind.UPDATE, orig=flow, state=TcpState.TIME_WAIT), "TIME_WAIT")
        topology.conntrack_delete(sport)
        bpf_destroy = tracer.wait_for(ct(CtKind.DESTROY, orig=flow), "bpf DESTROY")
        nl_destroy = nl_log.wait_for(ct(CtKind.DESTROY, orig=flow), "netlink DESTROY")
    finally:
        netlink.close()
    nl_new = nl_log.wait_for(ct(CtKind.NEW, orig=flow), "netlink NEW", timeout=0)
    assert isinstance(new, CtEvent) and isinstance(nl_new, CtEvent)
    assert isinstance(bpf_destroy, CtEvent) and isinstance(nl_destroy, CtEvent)
    assert (nl_new.orig, nl_new.reply, nl_new.tcp_state) == (new.orig, new.reply, new.tcp_state)
    assert (nl_destroy.orig, nl_destroy.reply) == (bpf_destroy.orig, bpf_destroy.reply)

    # ctnetlink reports the state changes; keep those the bpf programs report (out of a
    # no-reply state, into a state a rule reads): the two must agree. One caveat: an event
    # ctnetlink could not deliver at once is merged into the next one, which carries the
    # state of that moment (nf_conntrack_ecache keeps the missed event bits and re-sends
    # them with the next event), so an intermediate closing state such as LAST_ACK may be
    # absent from ctnetlink's side (seen on 6.12 under emulation: 4 -> 7 where bpf saw
    # 6 -> 7). Hence: the same changes out of no-reply states, and the same states entered.
    seen = nl_log.matching(ct(CtKind.NEW, orig=flow)) + nl_log.matching(
        ct(CtKind.UPDATE, orig=flow)
    )
    known = [e.tcp_state for e in seen if isinstance(e, CtEvent) and e.tcp_state is not None]
    nl_changes = [(a, b) for a, b in itertools.pairwise(known) if a != b]
    wanted = [
        (a, b) for a, b in nl_changes if a in UNREPLIED_TCP_STATES or b in WANTED_TCP_STATES
    ]
    reported = transitions(tracer, new)
    assert [(a, b) for a, b in wanted if a in UNREPLIED_TCP_STATES] == [
        (a, b) for a, b in reported if a in UNREPLIED_TCP_STATES]
    assert [b for _, b in wanted] == [b for _, b in reported]
    # ctnetlink saw the close (a later change may follow it: seen on 6.12, TIME_WAIT ->
    # CLOSE, reported by both sources alike)
    assert TcpState.TIME_WAIT in [b for _, b in nl_changes], nl_changes


def test_the_kprobe_variant_reports_the_same_records(
    bpf: BpfSource, topology: Topology, tracer: EventLog
) -> None:
    """The fallback where trampolines cannot be had (no BTF, no CAP_SYS_ADMIN to open the
    module's BTF object): the same source switched to the kprobe variant, compiled with
    the rest, reports a flow's life and an unreplied entry killed by a RST as the
    trampolines do. Last in this module: the source stays on kprobes."""
    bpf.detach()
    bpf.attach(module_kprobes=True)
    hooks = bpf.hooks()
    assert hooks["nf_conntrack_tcp_packet"][0] == "kprobe+kretprobe"
    assert hooks["__nf_conntrack_confirm"][0] == "kprobe+kretprobe"
    assert hooks["nf_ct_delete"][0] == "kprobe"
    assert bpf.settings is not None
    events = Path("/sys/kernel/tracing/kprobe_events").read_text()
    assert f"r{bpf.settings.kretprobe_maxactive}:" in events  # tracefs kprobes, maxactive

    sport = 40090
    orig = Flow(CLIENT_IP, sport, VIP, 80)
    client = topology.client(VIP, 80, sport)
    assert client.expect_line() == "connected"
    new = tracer.wait_for(ct(CtKind.NEW, orig=orig), f"NEW for {orig}")
    tracer.wait_for(ct(CtKind.UPDATE, of=new, state=TcpState.ESTABLISHED), "ESTABLISHED")
    topology.conntrack_delete(sport)
    tracer.wait_for(ct(CtKind.DESTROY, of=new), "DESTROY")
    assert transitions(tracer, new) == [
        (TcpState.SYN_SENT, TcpState.SYN_RECV), (TcpState.SYN_RECV, TcpState.ESTABLISHED)]

    refused = topology.client(VIP, 81, sport + 1)  # 8081 has no listener
    assert refused.expect_line() == f"error {errno.ECONNREFUSED}"
    new = tracer.wait_for(ct(CtKind.NEW, orig=Flow(CLIENT_IP, sport + 1, VIP, 81)), "NEW")
    close = tracer.wait_for(ct(CtKind.UPDATE, of=new, state=TcpState.CLOSE), "SYN_SENT -> CLOSE")
    destroy = tracer.wait_for(ct(CtKind.DESTROY, of=new), "DESTROY")
    assert tracer.events.index(close) < tracer.events.index(destroy)
    stats = bpf.stats()
    assert stats.lost == 0 and stats.extra["kretprobe_misses"] == 0
