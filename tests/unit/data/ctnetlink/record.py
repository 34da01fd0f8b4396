"""Record raw ctnetlink messages from the real kernel for the decoder's unit tests.

Run as root from the repository root:

    .venv/bin/python tests/unit/data/ctnetlink/record.py tests/unit/data/ctnetlink/messages.jsonl

It makes a throw-away network namespace ``ctl-rec<random>``, generates known
traffic in phases (see PHASES), and writes one JSON line per datagram received
on an *unfiltered* NETLINK_NETFILTER socket subscribed to the three conntrack
event groups, plus the raw buffers of one table dump. Each line has the phase
label, the multicast group the kernel delivered it to (sockaddr_nl.nl_groups,
independent of any decoding), and the bytes in hex. The namespace is always
deleted.
"""

from __future__ import annotations

import json
import secrets
import select
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# Importable without installing: the repository's src/.
sys.path.insert(0, __file__.rsplit("/tests/", 1)[0] + "/src")

from cttrace.netns import entered_netns
from cttrace.sources.ctnetlink import dump_request

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
GROUP_NAMES = {1: "NEW", 2: "UPDATE", 4: "DESTROY"}  # nl_groups bit masks

VIP4, VIP6 = "10.96.0.1", "fd00:96::1"
CLIENT4, CLIENT6 = "10.244.0.1", "fd00:244::1"


def sh(ns: str, cmd: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "sh", "-ec", cmd], check=True)


@contextmanager
def lab() -> Iterator[str]:
    ns = f"ctl-rec{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        sh(
            ns,
            f"""
            ip link set lo up
            ip addr add {CLIENT4}/32 dev lo
            ip route add 10.96.0.0/12 dev lo src {CLIENT4}
            ip -6 addr add {CLIENT6}/128 dev lo nodad
            ip -6 route add fd00:96::/108 dev lo src {CLIENT6}
            iptables -t nat -A OUTPUT -d {VIP4} -p tcp --dport 80 -j DNAT --to 127.0.0.1:8080
            iptables -t nat -A OUTPUT -d {VIP4} -p udp --dport 53 -j DNAT --to 127.0.0.1:5353
            ip6tables -t nat -A OUTPUT -d {VIP6} -p tcp --dport 80 -j DNAT --to [::1]:8080
            # Port 81: the same DNAT in conntrack zone 7 with connmark 0x42.
            iptables -t nat -A OUTPUT -d {VIP4} -p tcp --dport 81 -j DNAT --to 127.0.0.1:8081
            iptables -t raw -A OUTPUT -d {VIP4} -p tcp --dport 81 -j CT --zone 7
            iptables -t raw -A OUTPUT -s 127.0.0.1 -p tcp --sport 8081 -j CT --zone 7
            iptables -t mangle -A OUTPUT -d {VIP4} -p tcp --dport 81 -j CONNMARK --set-mark 0x42
            """,
        )
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def tcp_roundtrip(
    family: socket.AddressFamily, listen: str, target: str, port: int, server_port: int = 8080
) -> None:
    with socket.socket(family) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((listen, server_port))
        srv.listen()
        with socket.create_connection((target, port), timeout=5) as cli:
            conn, _ = srv.accept()
            with conn:
                cli.sendall(b"ping")
                assert conn.recv(4) == b"ping"
                conn.sendall(b"pong")
                assert cli.recv(4) == b"pong"


def udp_roundtrip() -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as srv,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as cli,
    ):
        srv.bind(("127.0.0.1", 5353))
        cli.settimeout(5)
        cli.sendto(b"q", (VIP4, 53))
        _query, peer = srv.recvfrom(16)
        srv.sendto(b"a", peer)
        assert cli.recv(16) == b"a"


def drain(sock: socket.socket, phase: str, out: list[dict[str, Any]], quiet: float = 0.3) -> None:
    """Read until the socket has been idle for ``quiet`` seconds (a recording tool, not a test)."""
    while select.select([sock], [], [], quiet)[0]:
        data, (_pid, groups) = sock.recvfrom(65536)
        out.append(
            {"phase": phase, "group": GROUP_NAMES.get(groups, str(groups)), "hex": data.hex()}
        )


def record(path: str) -> None:
    lines: list[dict[str, Any]] = []
    with lab() as ns:
        with entered_netns(ns):
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            dump = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        sock.bind((0, 0))
        dump.bind((0, 0))
        for group in (1, 2, 3):
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        phases: list[tuple[str, Callable[[], None]]] = [
            ("tcp4-dnat", lambda: tcp_roundtrip(socket.AF_INET, "127.0.0.1", VIP4, 80)),
            ("tcp6-dnat", lambda: tcp_roundtrip(socket.AF_INET6, "::1", VIP6, 80)),
            ("tcp4-plain", lambda: tcp_roundtrip(socket.AF_INET, "127.0.0.1", "127.0.0.1", 8080)),
            ("udp4-dnat", udp_roundtrip),
            (
                "tcp4-dnat-zone7-mark42",
                lambda: tcp_roundtrip(socket.AF_INET, "127.0.0.1", VIP4, 81, 8081),
            ),
        ]
        for phase, traffic in phases:
            with entered_netns(ns):
                traffic()
            drain(sock, phase, lines)
            if phase == "tcp4-plain":
                # Leave entries for the dump: one NATed v4, one NATed v6, one plain.
                with entered_netns(ns):
                    tcp_roundtrip(socket.AF_INET, "127.0.0.1", VIP4, 80)
                    tcp_roundtrip(socket.AF_INET6, "::1", VIP6, 80)
                drain(sock, "for-dump", lines)
                dump.send(dump_request(1))
                done = False
                while not done:
                    data = dump.recv(65536)
                    lines.append({"phase": "dump", "group": "-", "hex": data.hex()})
                    done = _has_done(data)
        # Flush: DESTROY events for everything left.
        sh(ns, "conntrack -F -f ipv4 2>/dev/null; conntrack -F -f ipv6 2>/dev/null")
        drain(sock, "flush", lines)
    with open(path, "w", encoding="ascii") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    print(f"{len(lines)} datagrams -> {path}", file=sys.stderr)


def _has_done(data: bytes) -> bool:
    off = 0
    while off + 16 <= len(data):
        length = int.from_bytes(data[off : off + 4], sys.byteorder)
        mtype = int.from_bytes(data[off + 4 : off + 6], sys.byteorder)
        if mtype in (2, 3) or length < 16:  # NLMSG_ERROR, NLMSG_DONE
            return True
        off += (length + 3) & ~3
    return False


if __name__ == "__main__":
    record(sys.argv[1] if len(sys.argv) > 1 else "messages.jsonl")
