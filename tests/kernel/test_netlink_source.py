"""The netlink source against the real kernel, in a network namespace of its own.

Each test gets ``ctl-nl<random>``: ``lo`` up with a client address 10.244.0.1,
a route for the Service range 10.96.0.0/12 over ``lo``, and kube-proxy-like
DNAT rules in ``nat OUTPUT``: TCP 10.96.0.1:80 -> 127.0.0.1:8080 and UDP
10.96.0.1:53 -> 127.0.0.1:5353. Nothing leaves the namespace. Waiting is
always "poll the source's fd until the expected event arrives or a deadline".
"""

from __future__ import annotations

import os
import re
import secrets
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cttrace.errors import UserError
from cttrace.events import CtEvent, CtKind, CtStatus, Event, Lost, ResyncDone, TcpState
from cttrace.netns import entered_netns
from cttrace.sources.netlink import NetlinkSource

pytestmark = pytest.mark.kernel

CLIENT = "10.244.0.1"
VIP = "10.96.0.1"
BACKEND = ("127.0.0.1", 8080)
DEADLINE = 10.0


@dataclass
class Lab:
    ns: str
    server: socket.socket
    keep: list[socket.socket] = field(default_factory=list)

    def sh(self, cmd: str) -> str:
        return subprocess.run(
            ["ip", "netns", "exec", self.ns, "sh", "-ec", cmd],
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    def connect(self, host: str, port: int) -> socket.socket:
        """A TCP connection made inside the lab, accepted and kept open; returns the client side."""
        with entered_netns(self.ns):
            client = socket.create_connection((host, port), timeout=5)
        conn, _ = self.server.accept()
        self.keep += [client, conn]
        return client

    def udp_exchange(self) -> None:
        with entered_netns(self.ns):
            srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with srv, cli:
            srv.bind(("127.0.0.1", 5353))
            cli.settimeout(5)
            cli.sendto(b"q", (VIP, 53))
            _query, peer = srv.recvfrom(16)
            srv.sendto(b"a", peer)
            assert cli.recv(16) == b"a"

    def source(self, **kwargs: object) -> NetlinkSource:
        src = NetlinkSource(self.ns, **kwargs)  # type: ignore[arg-type]
        src.open()
        return src


@pytest.fixture
def lab() -> Iterator[Lab]:
    assert os.geteuid() == 0, "kernel tests need root (network namespaces, iptables, conntrack)"
    ns = f"ctl-nl{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    server = None
    try:
        subprocess.run(
            ["ip", "netns", "exec", ns, "sh", "-ec", _LAB_SETUP.format(client=CLIENT, vip=VIP)],
            check=True,
        )
        with entered_netns(ns):
            server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(BACKEND)
        server.listen(256)
        lab = Lab(ns, server)
        yield lab
        for s in lab.keep:
            s.close()
    finally:
        if server is not None:
            server.close()
        subprocess.run(["ip", "netns", "del", ns], check=False)


_LAB_SETUP = """
ip link set lo up
ip addr add {client}/32 dev lo
ip route add 10.96.0.0/12 dev lo src {client}
iptables -t nat -A OUTPUT -d {vip} -p tcp --dport 80 -j DNAT --to-destination 127.0.0.1:8080
iptables -t nat -A OUTPUT -d {vip} -p udp --dport 53 -j DNAT --to-destination 127.0.0.1:5353
"""


def collect(src: NetlinkSource, until: Callable[[list[Event]], bool]) -> list[Event]:
    """Read the source until ``until(all events so far)`` holds; fail at the deadline."""
    events: list[Event] = []
    deadline = time.monotonic() + DEADLINE
    while not until(events):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; got {events!r}"
        if select.select([src.fileno()], [], [], left)[0]:
            events += src.read()
    return events


def ct_events(events: list[Event], sport: int | None = None) -> list[CtEvent]:
    return [
        e for e in events if isinstance(e, CtEvent) and (sport is None or e.orig.sport == sport)
    ]


def has(kind: CtKind, sport: int, **attrs: object) -> Callable[[list[Event]], bool]:
    def check(events: list[Event]) -> bool:
        return any(
            e.kind is kind and all(getattr(e, k) == v for k, v in attrs.items())
            for e in ct_events(events, sport)
        )

    return check


def test_open_dumps_the_table_first(lab: Lab) -> None:
    before = lab.connect(VIP, 80)  # exists before the source
    src = NetlinkSource(f"/var/run/netns/{lab.ns}")  # --netns also takes a path
    src.open()
    try:
        events = src.read()
        assert isinstance(events[-1], ResyncDone)
        (dumped,) = ct_events(events)
        assert dumped.kind is CtKind.DUMP and dumped.orig.sport == before.getsockname()[1]
        assert events[-1].entry_ids == frozenset({dumped.entry_id})
        assert src.stats().resyncs == 1
    finally:
        src.close()


def test_nated_tcp_connection_from_new_to_destroy(lab: Lab) -> None:
    src = lab.source()
    try:
        (initial,) = src.read()  # the table is empty
        assert isinstance(initial, ResyncDone) and initial.entry_ids == frozenset()
        client = lab.connect(VIP, 80)
        sport = client.getsockname()[1]
        client.sendall(b"hello")
        events = collect(src, has(CtKind.UPDATE, sport, tcp_state=TcpState.ESTABLISHED))
        mine = ct_events(events, sport)
        new = mine[0]
        assert new.kind is CtKind.NEW and new.tcp_state == TcpState.SYN_SENT
        # nf_nat_setup_info runs before __nf_conntrack_confirm: NEW already carries DST_NAT.
        assert new.status & CtStatus.DST_NAT and not new.status & CtStatus.SEEN_REPLY
        assert new.orig.src == CLIENT and (new.orig.dst, new.orig.dport) == (VIP, 80)
        assert new.target == BACKEND and new.reply.dport == sport
        established = next(e for e in mine if e.tcp_state == TcpState.ESTABLISHED)
        assert established.kind is CtKind.UPDATE
        assert established.status & CtStatus.SEEN_REPLY and established.status & CtStatus.ASSURED
        assert {e.entry_id for e in mine} == {new.entry_id}

        lab.sh(f"conntrack -D -p tcp --orig-port-src {sport}")
        events = collect(src, has(CtKind.DESTROY, sport))
        destroy = next(e for e in ct_events(events, sport) if e.kind is CtKind.DESTROY)
        assert destroy.entry_id == new.entry_id and destroy.target == BACKEND
        assert src.stats().lost == 0
    finally:
        src.close()


def test_kernel_filter_drops_unnated_tcp_and_udp_before_the_socket(lab: Lab) -> None:
    """Both sources see the same traffic; only the one without the BPF filter has to filter."""
    kernel = lab.source()
    userspace = lab.source(kernel_filter=False)
    try:
        for src in (kernel, userspace):
            src.read()  # the initial dumps
        lab.connect(*BACKEND).close()  # plain TCP to 127.0.0.1:8080: no NAT bit
        lab.udp_exchange()  # NATed, but UDP
        marker = lab.connect(VIP, 80).getsockname()[1]  # NATed TCP, generated last
        lab.sh(f"conntrack -D -p tcp --orig-port-src {marker}")
        seen = {src: collect(src, has(CtKind.DESTROY, marker)) for src in (kernel, userspace)}
        for events in seen.values():
            assert {e.orig.sport for e in ct_events(events)} == {marker}
            assert all(e.orig.dst == VIP and e.orig.dport == 80 for e in ct_events(events))
        # The plain TCP NEW and the UDP NEW reached the unfiltered socket before the
        # marker's events; on the filtered socket nothing had to be dropped in userspace.
        assert userspace.stats().filtered >= 2
        assert kernel.stats().filtered == 0
        assert kernel.stats().extra["kernel_filter"] == 1
    finally:
        kernel.close()
        userspace.close()


def test_kernel_filter_keeps_entries_translated_without_a_nat_bit(lab: Lab) -> None:
    """IPVS (kube-proxy's IPVS mode, net.ipv4.vs.conntrack=1) rewrites an entry's reply tuple
    with nf_conntrack_alter_reply() and sets no NAT status bit. Such an entry, made here with
    ctnetlink as IPVS leaves it, passes the kernel filter; an untranslated one does not."""
    src = lab.source()
    try:
        src.read()  # the initial dump
        insert = ("conntrack -I -p tcp -s {c} -d 10.96.0.7 --sport {p} --dport 80 {reply}"
                  " --state SYN_SENT -t 60")
        lab.sh(insert.format(c=CLIENT, p=40998, reply=""))  # untranslated, no NAT bit
        lab.sh(insert.format(c=CLIENT, p=40999, reply=f"-r 10.244.0.9 -q {CLIENT} "
                             "--reply-port-src 8080 --reply-port-dst 40999"))
        events = collect(src, has(CtKind.NEW, 40999))
        (ipvs,) = ct_events(events)
        assert (ipvs.orig.dst, ipvs.reply.src, ipvs.reply.sport) == ("10.96.0.7", "10.244.0.9",
                                                                     8080)
        assert not ipvs.status & (CtStatus.SRC_NAT | CtStatus.DST_NAT)
        assert src.stats().filtered == 0  # the untranslated one never reached the socket
    finally:
        src.close()


def test_kernel_filter_drops_only_the_closing_states_of_a_fin_close(lab: Lab) -> None:
    """FIN_WAIT/CLOSE_WAIT/LAST_ACK never reach the filtered socket; what the rules read does."""
    kernel = lab.source()
    userspace = lab.source(kernel_filter=False)
    try:
        for src in (kernel, userspace):
            src.read()
        client = lab.connect(VIP, 80)
        server_side = lab.keep[-1]
        sport = client.getsockname()[1]
        client.close()  # FIN from the client, then from the server: the entry ends in TIME_WAIT
        server_side.close()
        seen = {src: collect(src, has(CtKind.UPDATE, sport, tcp_state=TcpState.TIME_WAIT))
                for src in (kernel, userspace)}
        states = {src: [e.tcp_state for e in ct_events(events, sport)]
                  for src, events in seen.items()}
        assert TcpState.FIN_WAIT in states[userspace]  # the kernel did go through them
        assert states[kernel] == [s for s in states[userspace]
                                  if s not in (TcpState.FIN_WAIT, TcpState.CLOSE_WAIT,
                                               TcpState.LAST_ACK)]
        assert states[kernel] == [TcpState.SYN_SENT, TcpState.SYN_RECV,
                                  TcpState.ESTABLISHED, TcpState.TIME_WAIT]
        assert kernel.stats().filtered == 0
    finally:
        kernel.close()
        userspace.close()


def test_overflow_counts_loss_and_resyncs_with_the_live_entries(lab: Lab) -> None:
    src = lab.source(rcvbuf=1)  # the kernel raises it to its minimum: a couple of messages
    try:
        src.read()
        clients = [lab.connect(VIP, 80) for _ in range(40)]  # far more events than fit
        events = collect(src, lambda evs: any(isinstance(e, ResyncDone) for e in evs))
        lost = [e for e in events if isinstance(e, Lost)]
        assert lost and lost[0].reason == "ENOBUFS" and lost[0].source == "netlink"
        stats = src.stats()
        # lost counts the messages the kernel dropped (its socket's sk_drops), not overflows:
        # what the Lost events reported, and any drop after the last of them too
        assert stats.lost >= sum(e.missed for e in lost) >= len(lost) >= 1
        assert stats.extra["dropped_messages"] == stats.lost  # the kernel's own count
        done_at = next(i for i, e in enumerate(events) if isinstance(e, ResyncDone))
        done = events[done_at]
        assert isinstance(done, ResyncDone)
        assert events.index(lost[0]) < done_at
        dumped = [e for e in ct_events(events[:done_at]) if e.kind is CtKind.DUMP]
        assert {e.orig.sport for e in dumped} == {c.getsockname()[1] for c in clients}
        assert done.entry_ids == {e.entry_id for e in dumped}
        # The ids are the kernel's own: `conntrack -L -o id` lists the same set.
        listed = lab.sh(f"conntrack -L -p tcp -d {VIP} -o id 2>/dev/null")
        assert done.entry_ids == {int(i) for i in re.findall(r"id=(\d+)", listed)}

        # And it keeps running: the next connection arrives as a plain NEW.
        sport = lab.connect(VIP, 80).getsockname()[1]
        collect(src, has(CtKind.NEW, sport))
    finally:
        src.close()


def test_missing_netns_is_a_clear_error(lab: Lab) -> None:
    missing = f"ctl-nl-missing{secrets.token_hex(3)}"
    with pytest.raises(UserError) as info:
        NetlinkSource(missing).open()
    message = str(info.value)
    assert f"{missing!r} not found" in message and "ip netns list" in message
    assert lab.ns in message  # the listing is the real one


def test_without_privileges_the_error_says_run_as_root(lab: Lab) -> None:
    # A child in the lab namespace as nobody: joining the ctnetlink groups needs
    # CAP_NET_ADMIN (nfnetlink has no NL_CFG_F_NONROOT_RECV), so open() must fail cleanly.
    script = (
        "from cttrace.errors import NotRootError\n"
        "from cttrace.sources.netlink import NetlinkSource\n"
        "try:\n"
        "    NetlinkSource().open()\n"
        "except NotRootError as exc:\n"
        "    print(exc)\n"
        "    raise SystemExit(0)\n"
        "raise SystemExit('opened without privileges')\n"
    )
    result = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            lab.ns,
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")},
    )
    assert result.returncode == 0, result.stderr
    assert "needs root" in result.stdout and "netlink source" in result.stdout
