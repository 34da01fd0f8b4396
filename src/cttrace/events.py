"""The one event model every source produces and the correlator consumes.

Sources (ctnetlink, BCC) see different kernel facts; they all boil down to
these few records so that the correlator never knows where an event came from.
Records are NamedTuples rather than frozen dataclasses: they are immutable and
typed all the same, and they are built on the hot path (one per kernel event),
where a NamedTuple costs about a third of a frozen dataclass to construct
(see bench/).

Times are wall-clock seconds (``time.time()`` scale) everywhere, so that kernel
events and identity changes (stamped when cttrace reads them) share one axis.
"""

from __future__ import annotations

import socket
import sys
from enum import IntEnum, IntFlag
from typing import NamedTuple


class TcpState(IntEnum):
    """``enum tcp_conntrack`` (include/uapi/linux/netfilter/nf_conntrack_tcp.h).

    ``ct->proto.tcp.state`` and ctnetlink's CTA_PROTOINFO_TCP_STATE carry these.
    """

    NONE = 0
    SYN_SENT = 1
    SYN_RECV = 2
    ESTABLISHED = 3
    FIN_WAIT = 4
    CLOSE_WAIT = 5
    LAST_ACK = 6
    TIME_WAIT = 7
    CLOSE = 8
    SYN_SENT2 = 9  # TCP_CONNTRACK_LISTEN is an alias of this value


class CtStatus(IntFlag):
    """``enum ip_conntrack_status`` bits (include/uapi/linux/netfilter/nf_conntrack_common.h)."""

    EXPECTED = 1 << 0
    SEEN_REPLY = 1 << 1
    ASSURED = 1 << 2
    CONFIRMED = 1 << 3
    SRC_NAT = 1 << 4
    DST_NAT = 1 << 5
    SEQ_ADJUST = 1 << 6
    SRC_NAT_DONE = 1 << 7
    DST_NAT_DONE = 1 << 8
    DYING = 1 << 9
    FIXED_TIMEOUT = 1 << 10
    TEMPLATE = 1 << 11
    UNTRACKED = 1 << 12
    HELPER = 1 << 13
    OFFLOAD = 1 << 14
    HW_OFFLOAD = 1 << 15


#: IPS_NAT_MASK: the entry was source- or destination-NATed.
NAT_MASK = int(CtStatus.SRC_NAT | CtStatus.DST_NAT)

#: Short names used in JSON and the live view, in bit order.
STATUS_NAMES: tuple[tuple[int, str], ...] = (
    (int(CtStatus.SEEN_REPLY), "SEEN_REPLY"),
    (int(CtStatus.ASSURED), "ASSURED"),
    (int(CtStatus.CONFIRMED), "CONFIRMED"),
    (int(CtStatus.SRC_NAT), "SNAT"),
    (int(CtStatus.DST_NAT), "DNAT"),
    (int(CtStatus.DYING), "DYING"),
)


def status_names(status: int) -> list[str]:
    """Readable names of the interesting status bits set in ``status``."""
    return [name for bit, name in STATUS_NAMES if status & bit]


def state_name(state: int | None) -> str:
    """``SYN_SENT`` for 1, ``-`` for unknown, ``STATE_<n>`` for values newer than this table."""
    if state is None:
        return "-"
    try:
        return TcpState(state).name
    except ValueError:
        return f"STATE_{state}"


class _AddressTexts(dict[bytes, str]):
    """Packed IPv4/IPv6 address -> its ``inet_ntop`` text, the same ``str`` object every time.

    Sources see the same few hundred addresses (the node's pods, the Service
    VIPs) in event after event. Looking the packed bytes up here costs a dict
    hit instead of an ``inet_ntop``, and every Flow of one address shares one
    string, so tracked entries don't each carry copies. The text is
    ``sys.intern``-ed: the identity index interns the addresses it parses the
    same way, so the two share it too. Bounded: emptied when full.
    """

    max_size = 16_384

    def __missing__(self, packed: bytes) -> str:
        family = socket.AF_INET if len(packed) == 4 else socket.AF_INET6
        text = sys.intern(socket.inet_ntop(family, packed))  # ValueError for other lengths
        if len(self) >= self.max_size:
            self.clear()
        self[packed] = text
        return text


#: ``address_text[packed]``: the text of a 4- or 16-byte address (see _AddressTexts).
address_text = _AddressTexts()


class Flow(NamedTuple):
    """One direction of a conntrack tuple. Addresses are text (IPv4 or IPv6), as
    :data:`address_text` makes them."""

    src: str
    sport: int
    dst: str
    dport: int

    def to_json(self) -> dict[str, object]:
        return {"src": self.src, "sport": self.sport, "dst": self.dst, "dport": self.dport}


class CtKind(IntEnum):
    NEW = 1  # entry confirmed (ctnetlink IPCTNL_MSG_CT_NEW with NLM_F_CREATE; bpf: confirm)
    UPDATE = 2  # state or status changed on an existing entry
    DESTROY = 3  # entry gone (timeout, RST, flush, delete)
    DUMP = 4  # entry seen in a table dump while resynchronising after lost events


class CtEvent(NamedTuple):
    """A conntrack fact about one entry.

    ``reply.src:reply.sport`` is where the DNAT sent the flow (the backend
    pod); ``orig`` is what the client asked for (the Service VIP).
    """

    kind: CtKind
    ts: float
    entry_id: int
    orig: Flow
    reply: Flow
    tcp_state: int | None  # TcpState after the change; None when the source does not know
    status: int  # CtStatus bits
    old_tcp_state: int | None = None  # state before the change (bpf source only)
    zone: int = 0
    mark: int = 0
    source: str = "netlink"

    @property
    def target(self) -> tuple[str, int]:
        """The DNAT target (backend) as ``(ip, port)``."""
        return (self.reply.src, self.reply.sport)


class SockConnect(NamedTuple):
    """A socket's ``connect()`` with its source port bound (bpf source: tcp_connect entry,
    before its SYN leaves)."""

    ts: float
    flow: Flow  # local addr:port -> remote addr:port as the socket sees it (before NAT)
    pid: int
    comm: str
    cgroup_id: int
    netns_ino: int
    sock_id: int  # kernel socket address: distinguishes two sockets on one tuple


class TcpReset(NamedTuple):
    """A TCP RST sent or received by a local socket (tcp:tcp_send_reset / tcp_receive_reset)."""

    ts: float
    flow: Flow  # the RST's own addresses: src sent it to dst
    sent: bool
    pid: int = 0
    comm: str = ""


class Lost(NamedTuple):
    """The source knows it missed ``missed`` events (ENOBUFS, perf buffer overrun)."""

    ts: float
    source: str
    missed: int
    reason: str


class ResyncDone(NamedTuple):
    """A table dump after lost events finished; ``entry_ids`` are all entries that exist now."""

    ts: float
    source: str
    entry_ids: frozenset[int]


Event = CtEvent | SockConnect | TcpReset | Lost | ResyncDone
