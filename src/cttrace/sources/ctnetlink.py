"""ctnetlink wire format: decode conntrack messages, build the dump request and the socket filter.

Pure functions over bytes, no sockets, so that the decoder is unit-tested
against messages recorded from a real kernel (tests/unit/data/ctnetlink/) and
benchmarked on its own (bench/bench_decode.py).

It is hand-written rather than pyroute2's generic ``nfct_msg`` parser because
it runs once per kernel event on the hot path: it reads only the attributes
cttrace uses, checks the cheap NAT/TCP filter before it builds any strings,
and allocates nothing per attribute beyond ``struct.unpack_from``'s tuple.
Events of TCP entries outside a conntrack zone, nearly all of a Kubernetes
node's, take a fast path: ctnetlink writes each kind of them in one fixed
layout, so two ``unpack_from`` calls check the layout and read every value at
once, instead of a Python loop over some 20 attributes; everything else takes
the general path. bench/bench_decode.py measures both paths against pyroute2,
bench/pipeline.py the decoder's share of the pipeline.

Layout reminders (include/uapi/linux/netlink.h, netfilter/nfnetlink.h,
netfilter/nfnetlink_conntrack.h): each message is a ``struct nlmsghdr`` (host
byte order) + ``struct nfgenmsg`` + netlink attributes. Attribute headers are
host byte order; ctnetlink puts every integer *value* in network byte order
(``nla_put_be16/be32``), except the u8 protocol number and TCP state.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from struct import Struct
from typing import Any, NamedTuple

from cttrace.events import NAT_MASK, CtEvent, CtKind, Flow, TcpState, address_text
from cttrace.rules import UNREPLIED_TCP_STATES, WANTED_TCP_STATES

# --- netlink (include/uapi/linux/netlink.h) ---------------------------------
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLA_TYPE_MASK = 0x3FFF  # strips NLA_F_NESTED / NLA_F_NET_BYTEORDER
NLMSG_HDRLEN = 16

# --- nfnetlink (include/uapi/linux/netfilter/nfnetlink.h) -------------------
NFNETLINK_V0 = 0
NFNL_SUBSYS_CTNETLINK = 1
NFGENMSG_LEN = 4
#: Offset of the first attribute in a ctnetlink message.
ATTRS_OFFSET = NLMSG_HDRLEN + NFGENMSG_LEN

#: Multicast groups (enum nfnetlink_groups) the event socket joins.
NFNLGRP_CONNTRACK_NEW = 1
NFNLGRP_CONNTRACK_UPDATE = 2
NFNLGRP_CONNTRACK_DESTROY = 3

# --- ctnetlink (include/uapi/linux/netfilter/nfnetlink_conntrack.h) ---------
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
MSG_CT_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
MSG_CT_GET = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
MSG_CT_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
_ENTRY_MESSAGES = frozenset((MSG_CT_NEW, MSG_CT_DELETE))

CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_STATUS = 3
CTA_PROTOINFO = 4
CTA_TIMEOUT = 7
CTA_MARK = 8
CTA_ID = 12
CTA_ZONE = 18

CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC = 1
CTA_IP_V4_DST = 2
CTA_IP_V6_SRC = 3
CTA_IP_V6_DST = 4
_SRC_ADDRS = frozenset((CTA_IP_V4_SRC, CTA_IP_V6_SRC))
_DST_ADDRS = frozenset((CTA_IP_V4_DST, CTA_IP_V6_DST))
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_STATE = 1

IPPROTO_TCP = 6
NLA_F_NESTED = 0x8000  # set by nla_nest_start on every nest the kernel writes

_NLMSGHDR = Struct("=IHHII")  # nlmsg_len, nlmsg_type, nlmsg_flags, nlmsg_seq, nlmsg_pid
_NLMSGHDR_START = Struct("=IHH")  # nlmsg_len, nlmsg_type, nlmsg_flags: what decoding reads
_NFGENMSG = Struct("=BBH")  # nfgen_family, version, res_id (already big-endian: 0 here)
_NLA = Struct("=HH")  # nla_len, nla_type
_ERRNO = Struct("=i")  # struct nlmsgerr.error: 0 (ACK) or -errno
_U8 = Struct("B")
_BE16 = Struct(">H")
_BE32 = Struct(">I")

_nlmsghdr = _NLMSGHDR_START.unpack_from
_nla = _NLA.unpack_from
_u8 = _U8.unpack_from
_be16 = _BE16.unpack_from
_be32 = _BE32.unpack_from
_AF_INET = socket.AF_INET
_AF_INET6 = socket.AF_INET6


class Decoded(NamedTuple):
    """What one buffer of netlink messages held."""

    events: list[CtEvent]  # relevant entries (TCP with a NAT status bit), in buffer order
    filtered: int  # well-formed conntrack messages dropped: not TCP, or no NAT bit
    malformed: int  # messages skipped because truncated or inconsistent
    done: bool  # NLMSG_DONE seen: a dump finished
    errno: int  # first error from an NLMSG_ERROR (positive errno); 0 when none


_NEW, _UPDATE, _DESTROY, _DUMP = CtKind.NEW, CtKind.UPDATE, CtKind.DESTROY, CtKind.DUMP


def decode_messages(
    buf: bytes | bytearray | memoryview, ts: float, *, dump: bool = False
) -> Decoded:
    """Decode every netlink message in ``buf`` (one or more ``recv()`` results laid end to end).

    Event messages become NEW (``IPCTNL_MSG_CT_NEW`` with ``NLM_F_CREATE``, set
    by ctnetlink_conntrack_event for IPCT_NEW/IPCT_RELATED), UPDATE (CT_NEW
    without it) or DESTROY (``IPCTNL_MSG_CT_DELETE``). With ``dump=True`` the
    CT_NEW replies of a table dump become :attr:`CtKind.DUMP`. Every event of
    the buffer gets the same ``ts``. Messages are stepped over at their
    NLMSG_ALIGN'ed length, so a caller may pad between datagrams.
    """
    events: list[CtEvent] = []
    filtered = malformed = error = 0
    done = False
    end = len(buf)
    off = 0
    while off + NLMSG_HDRLEN <= end:
        mlen, mtype, mflags = _nlmsghdr(buf, off)
        if mlen < NLMSG_HDRLEN or off + mlen > end:
            break  # a truncated tail: nothing after it can be trusted
        if mtype in _ENTRY_MESSAGES:
            if mtype == MSG_CT_DELETE:
                kind = _DESTROY
            elif dump:
                kind = _DUMP
            elif mflags & NLM_F_CREATE:
                kind = _NEW
            else:
                kind = _UPDATE
            event = _decode_fast(buf, off + ATTRS_OFFSET, off + mlen, kind, ts)
            if event is None:  # not in the fast path's layout
                event = _decode_entry(buf, off + ATTRS_OFFSET, off + mlen, kind, ts)
            if not isinstance(event, int):
                events.append(event)
            elif event == _FILTERED:
                filtered += 1
            else:
                malformed += 1
        elif mtype == NLMSG_DONE:
            done = True
        elif mtype == NLMSG_ERROR:
            if mlen < NLMSG_HDRLEN + 4:
                malformed += 1
            else:
                code = -_ERRNO.unpack_from(buf, off + NLMSG_HDRLEN)[0]
                if code and not error:
                    error = code
        off += (mlen + 3) & ~3
    if off < end:
        malformed += 1
    return Decoded(events, filtered, malformed, done, error)


# Outcomes of the helpers below other than a decoded value (ints: no allocation).
_FILTERED = 0  # well formed but irrelevant (not TCP, no NAT bit)
_MALFORMED = 1  # truncated or missing what ctnetlink always sends


# --- fast path: a TCP event in the layout ctnetlink always writes -------------
#
# ctnetlink_conntrack_event() writes an entry's attributes in a fixed order,
# each at its fixed size, so a NEW or UPDATE event of an IPv4 TCP entry
# outside any conntrack zone and without a connmark is always this (offsets
# from the first attribute; each nla header is (nla_len, nla_type) in host
# order, values are big-endian, every attribute is padded to 4 bytes):
#
#     0  CTA_TUPLE_ORIG, nested (52)       ctnetlink_dump_tuples()
#     4    CTA_TUPLE_IP, nested (20)
#     8      CTA_IP_V4_SRC (8)             12: address
#    16      CTA_IP_V4_DST (8)             20: address
#    24    CTA_TUPLE_PROTO, nested (28)
#    28      CTA_PROTO_NUM (5)             32: u8 IPPROTO_TCP
#    36      CTA_PROTO_SRC_PORT (6)        40: be16
#    44      CTA_PROTO_DST_PORT (6)        48: be16
#    52  CTA_TUPLE_REPLY, nested (52): the same layout
#   104  CTA_ID (8)                       108: be32
#   112  CTA_STATUS (8)                   116: be32
#   120  CTA_TIMEOUT (8)
#   128  CTA_PROTOINFO, nested (48)
#   132    CTA_PROTOINFO_TCP, nested (44)  tcp_to_nlattr(): the state first,
#   136      CTA_PROTOINFO_TCP_STATE (5)   140: u8
#   144      window scales and flags       (not read)
#   176  end of message
#
# A DESTROY is the same with only the state in CTA_PROTOINFO_TCP (tcp_to_nlattr
# with destroy=true: nests of 16 and 12, 144 bytes in all), and an IPv6 entry
# the same with 16-byte addresses (CTA_IP_V6_SRC/DST of 20, tuples of 76).
# Each of these four layouts has its own length, which picks the layout; one
# unpack_from then reads every header of it (and the protocol number) to
# compare them with the layout, a second reads the values. A zone (CTA_ZONE
# before CTA_ID), a connmark (CTA_MARK at the end), a table dump (another
# order) or anything else that differs goes to the general path, which gives
# the same result for messages in these layouts (tests/unit/test_ctnetlink_decode.py
# checks that both paths agree on recorded and mutated kernel messages).


class _FastLayout(NamedTuple):
    """One exact layout of a TCP event message's attributes, as described above."""

    headers: Callable[..., tuple[int, ...]]  # unpack_from: the headers, host order
    expected: tuple[int, ...]  # what ``headers`` must return
    values: Callable[..., tuple[Any, ...]]  # unpack_from: 4 addresses, 4 ports, id, status, state
    size: int  # bytes of attributes: the message's length less its headers


def _fast_layout(src: int, dst: int, addr_len: int, *, destroy: bool) -> _FastLayout:
    ip_len = 4 + 2 * (4 + addr_len)  # CTA_TUPLE_IP holding two addresses
    tuple_len = 4 + ip_len + 28  # CTA_TUPLE_ORIG/REPLY: CTA_TUPLE_IP and CTA_TUPLE_PROTO
    tcp_len = 12 if destroy else 44  # CTA_PROTOINFO_TCP: the state, or all five attributes

    def tuple_layout(outer: int) -> tuple[int, ...]:
        return (
            tuple_len, outer | NLA_F_NESTED,
            ip_len, CTA_TUPLE_IP | NLA_F_NESTED,
            4 + addr_len, src,
            4 + addr_len, dst,
            28, CTA_TUPLE_PROTO | NLA_F_NESTED,
            5, CTA_PROTO_NUM, IPPROTO_TCP,
            6, CTA_PROTO_SRC_PORT,
            6, CTA_PROTO_DST_PORT,
        )  # fmt: skip

    expected = tuple_layout(CTA_TUPLE_ORIG) + tuple_layout(CTA_TUPLE_REPLY) + (
        8, CTA_ID,
        8, CTA_STATUS,
        8, CTA_TIMEOUT,
        4 + tcp_len, CTA_PROTOINFO | NLA_F_NESTED,
        tcp_len, CTA_PROTOINFO_TCP | NLA_F_NESTED,
        5, CTA_PROTOINFO_TCP_STATE,
    )  # fmt: skip
    a = f"{addr_len}"
    rest = f"{tcp_len - 12}x"  # what follows the state in CTA_PROTOINFO_TCP
    tuple_headers = "HH" "HH" f"HH{a}x" f"HH{a}x" "HH" "HHB3x" "HH4x" "HH4x"
    tuple_values = "4x" "4x" f"4x{a}s" f"4x{a}s" "4x" "8x" "4xH2x" "4xH2x"
    headers = Struct("=" + tuple_headers * 2 + "HH4x" "HH4x" "HH4x" "HH" "HH" "HH4x" + rest)
    values = Struct(">" + tuple_values * 2 + "4xI" "4xI" "8x" "4x" "4x" "4xB3x" + rest)
    assert headers.size == values.size
    return _FastLayout(headers.unpack_from, expected, values.unpack_from, headers.size)


#: The layouts by their length, which differs for each.
_FAST_LAYOUTS: dict[int, _FastLayout] = {
    layout.size: layout
    for layout in (
        _fast_layout(CTA_IP_V4_SRC, CTA_IP_V4_DST, 4, destroy=False),
        _fast_layout(CTA_IP_V4_SRC, CTA_IP_V4_DST, 4, destroy=True),
        _fast_layout(CTA_IP_V6_SRC, CTA_IP_V6_DST, 16, destroy=False),
        _fast_layout(CTA_IP_V6_SRC, CTA_IP_V6_DST, 16, destroy=True),
    )
}
assert len(_FAST_LAYOUTS) == 4
_make = tuple.__new__  # _make(NamedTupleClass, (every field, in order))


def translated(status: int, orig: Flow, reply: Flow) -> bool:
    """Whether an entry's destination was translated: a NAT status bit (iptables/nftables
    DNAT, nf_nat), or a reply that comes from another address than the one the client
    connected to. The second is IPVS with ``net.ipv4.vs.conntrack=1`` (kube-proxy's IPVS
    mode): ip_vs_update_conntrack() rewrites the reply tuple with nf_conntrack_alter_reply()
    and sets no NAT status bit."""
    return bool(status & NAT_MASK) or orig.dst != reply.src


def _decode_fast(
    buf: bytes | bytearray | memoryview, start: int, end: int, kind: CtKind, ts: float
) -> CtEvent | int | None:
    """The fast path: a CtEvent or _FILTERED, or None when the message is not in its layouts."""
    layout = _FAST_LAYOUTS.get(end - start)
    if layout is None or layout.headers(buf, start) != layout.expected:
        return None
    o_src, o_dst, o_sport, o_dport, r_src, r_dst, r_sport, r_dport, entry_id, status, state = (
        layout.values(buf, start)
    )
    if not status & NAT_MASK and o_dst == r_src:
        return _FILTERED  # neither NATed nor translated by IPVS (see translated())
    text = address_text
    # CtEvent(kind, ts, entry_id, orig, reply, tcp_state, status, old_tcp_state=None, zone=0,
    # mark=0, source="netlink"), as _decode_entry makes it but without the NamedTuples'
    # Python-level __new__ (a third of the cost of making them).
    return _make(CtEvent, (
        kind, ts, entry_id,
        _make(Flow, (text[o_src], o_sport, text[o_dst], o_dport)),
        _make(Flow, (text[r_src], r_sport, text[r_dst], r_dport)),
        state, status, None, 0, 0, "netlink",
    ))  # fmt: skip


# --- general path: any attribute order and size --------------------------------


def _decode_entry(
    buf: bytes | bytearray | memoryview, start: int, end: int, kind: CtKind, ts: float
) -> CtEvent | int:
    """One conntrack entry's attributes as a CtEvent, or _FILTERED / _MALFORMED."""
    orig = reply = protoinfo = -1
    orig_end = reply_end = protoinfo_end = 0
    status = entry_id = zone = mark = 0
    has_status = False
    a = start
    while a + 4 <= end:
        alen, atype = _nla(buf, a)
        if alen < 4 or a + alen > end:
            return _MALFORMED
        atype &= NLA_TYPE_MASK
        if atype == CTA_TUPLE_ORIG:
            orig, orig_end = a + 4, a + alen
        elif atype == CTA_TUPLE_REPLY:
            reply, reply_end = a + 4, a + alen
        elif atype == CTA_STATUS and alen >= 8:
            status = _be32(buf, a + 4)[0]
            has_status = True
        elif atype == CTA_PROTOINFO:
            protoinfo, protoinfo_end = a + 4, a + alen
        elif atype == CTA_ID and alen >= 8:
            entry_id = _be32(buf, a + 4)[0]
        elif atype == CTA_ZONE and alen >= 6:
            zone = _be16(buf, a + 4)[0]
        elif atype == CTA_MARK and alen >= 8:
            mark = _be32(buf, a + 4)[0]
        a += (alen + 3) & ~3
    if orig < 0 or reply < 0:
        return _MALFORMED
    if not has_status:
        return _FILTERED
    orig_flow = _decode_tuple(buf, orig, orig_end)
    if isinstance(orig_flow, int):
        return orig_flow
    reply_flow = _decode_tuple(buf, reply, reply_end)
    if isinstance(reply_flow, int):
        return _MALFORMED  # the reply tuple of a TCP entry is TCP too
    if not translated(status, orig_flow, reply_flow):
        return _FILTERED
    tcp_state = _tcp_state(buf, protoinfo, protoinfo_end) if protoinfo >= 0 else None
    return CtEvent(kind, ts, entry_id, orig_flow, reply_flow, tcp_state, status, None, zone, mark)


def _decode_tuple(buf: bytes | bytearray | memoryview, start: int, end: int) -> Flow | int:
    """A CTA_TUPLE_* nest as a Flow, or _FILTERED (not TCP) / _MALFORMED."""
    src = dst = -1  # offsets of the address bytes; converted only for TCP
    addr_len = 0
    sport = dport = proto = -1
    a = start
    while a + 4 <= end:
        alen, atype = _nla(buf, a)
        if alen < 4 or a + alen > end:
            return _MALFORMED
        atype &= NLA_TYPE_MASK
        b = a + 4
        nest_end = a + alen
        if atype == CTA_TUPLE_IP:
            while b + 4 <= nest_end:
                blen, btype = _nla(buf, b)
                if blen < 4 or b + blen > nest_end:
                    return _MALFORMED
                btype &= NLA_TYPE_MASK
                if btype in _SRC_ADDRS:
                    src = b + 4
                    addr_len = blen - 4
                elif btype in _DST_ADDRS:
                    dst = b + 4
                b += (blen + 3) & ~3
        elif atype == CTA_TUPLE_PROTO:
            while b + 4 <= nest_end:
                blen, btype = _nla(buf, b)
                if blen < 4 or b + blen > nest_end:
                    return _MALFORMED
                btype &= NLA_TYPE_MASK
                if btype == CTA_PROTO_NUM and blen >= 5:
                    proto = _u8(buf, b + 4)[0]
                elif btype == CTA_PROTO_SRC_PORT and blen >= 6:
                    sport = _be16(buf, b + 4)[0]
                elif btype == CTA_PROTO_DST_PORT and blen >= 6:
                    dport = _be16(buf, b + 4)[0]
                b += (blen + 3) & ~3
        a += (alen + 3) & ~3
    if proto != IPPROTO_TCP:
        return _FILTERED if proto >= 0 else _MALFORMED
    # A TCP tuple always carries both addresses and both ports (ctnetlink_dump_tuples).
    if src < 0 or dst < 0 or sport < 0 or dport < 0:
        return _MALFORMED
    if addr_len != 4 and addr_len != 16:
        return _MALFORMED
    return Flow(
        address_text[bytes(buf[src : src + addr_len])],
        sport,
        address_text[bytes(buf[dst : dst + addr_len])],
        dport,
    )


def _tcp_state(buf: bytes | bytearray | memoryview, start: int, end: int) -> int | None:
    """CTA_PROTOINFO > CTA_PROTOINFO_TCP > CTA_PROTOINFO_TCP_STATE, or None."""
    a = start
    while a + 4 <= end:
        alen, atype = _nla(buf, a)
        if alen < 4 or a + alen > end:
            return None
        if atype & NLA_TYPE_MASK == CTA_PROTOINFO_TCP:
            b = a + 4
            nest_end = a + alen
            while b + 4 <= nest_end:
                blen, btype = _nla(buf, b)
                if blen < 4 or b + blen > nest_end:
                    return None
                if btype & NLA_TYPE_MASK == CTA_PROTOINFO_TCP_STATE and blen >= 5:
                    state: int = _u8(buf, b + 4)[0]
                    return state
                b += (blen + 3) & ~3
            return None
        a += (alen + 3) & ~3
    return None


# --- requests ---------------------------------------------------------------


def dump_request(seq: int, family: int = socket.AF_UNSPEC) -> bytes:
    """``IPCTNL_MSG_CT_GET`` with ``NLM_F_DUMP``: every entry of the socket's netns.

    ``nfgen_family`` AF_UNSPEC dumps IPv4 and IPv6 alike (ctnetlink_dump_table
    skips an entry only when a family was asked for and differs).
    """
    length = NLMSG_HDRLEN + NFGENMSG_LEN
    return _NLMSGHDR.pack(length, MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + _NFGENMSG.pack(
        family, NFNETLINK_V0, 0
    )


def _attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to NLA_ALIGNTO (4)."""
    raw = _NLA.pack(4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _tuple_attr(flow: Flow) -> bytes:
    family = _AF_INET6 if ":" in flow.src else _AF_INET
    src_t, dst_t = (CTA_IP_V6_SRC, CTA_IP_V6_DST) if family == _AF_INET6 else (
        CTA_IP_V4_SRC, CTA_IP_V4_DST)
    ip = _attr(CTA_TUPLE_IP | NLA_F_NESTED,
              _attr(src_t, socket.inet_pton(family, flow.src))
              + _attr(dst_t, socket.inet_pton(family, flow.dst)))
    proto = _attr(CTA_TUPLE_PROTO | NLA_F_NESTED,
                 _attr(CTA_PROTO_NUM, bytes([IPPROTO_TCP]))
                 + _attr(CTA_PROTO_SRC_PORT, _BE16.pack(flow.sport))
                 + _attr(CTA_PROTO_DST_PORT, _BE16.pack(flow.dport)))
    return _attr(CTA_TUPLE_ORIG | NLA_F_NESTED, ip + proto)


def delete_request(seq: int, orig: Flow, *, entry_id: int, zone: int = 0) -> bytes:
    """``IPCTNL_MSG_CT_DELETE`` of exactly one TCP entry, acknowledged (NLM_F_ACK).

    ctnetlink_del_conntrack looks the entry up by its original tuple (and zone)
    and, when CTA_ID is given, refuses with ENOENT unless ``nf_ct_get_id(ct)``
    matches: a newer entry that reuses the tuple is never deleted by mistake.
    """
    family = _AF_INET6 if ":" in orig.src else _AF_INET
    attrs = _tuple_attr(orig) + _attr(CTA_ID, _BE32.pack(entry_id))
    if zone:
        attrs += _attr(CTA_ZONE, _BE16.pack(zone))
    body = _NFGENMSG.pack(family, NFNETLINK_V0, 0) + attrs
    return _NLMSGHDR.pack(NLMSG_HDRLEN + len(body), MSG_CT_DELETE,
                          NLM_F_REQUEST | _NLM_F_ACK, seq, 0) + body


_NLM_F_ACK = 0x4


# --- classic BPF socket filter ------------------------------------------------
# include/uapi/linux/filter.h and bpf_common.h
_BPF_LD, _BPF_LDX, _BPF_ST, _BPF_JMP, _BPF_RET, _BPF_MISC = 0x00, 0x01, 0x02, 0x05, 0x06, 0x07
_BPF_W, _BPF_B = 0x00, 0x10
_BPF_IMM, _BPF_ABS, _BPF_IND, _BPF_MEM = 0x00, 0x20, 0x40, 0x60
_BPF_JEQ, _BPF_JSET = 0x10, 0x40
_BPF_K, _BPF_X = 0x00, 0x08
_BPF_TAX = 0x00
_SKF_AD_OFF = -0x1000
_SKF_AD_NLATTR = 12  # A = offset of attr X, searched from offset A to the end (nla_find)
_SKF_AD_NLATTR_NEST = 16  # A = offset of attr X inside the nest at offset A (nla_find_nested)
_SOCK_FILTER = Struct("=HBBI")  # struct sock_filter: code, jt, jf, k

#: TCP conntrack states (enum tcp_conntrack) whose UPDATEs the kernel filter drops:
#: those no rule reads (cttrace.rules declares what each reads) and that are not
#: "no reply yet" (leaving those is the first reply). Today FIN_WAIT, CLOSE_WAIT and
#: LAST_ACK, the states of a connection being closed with FINs; the bpf programs do
#: not report them either (the same sets, as #defines: sources/bpf.py).
CLOSING_STATES = frozenset(
    int(s) for s in TcpState
) - WANTED_TCP_STATES - UNREPLIED_TCP_STATES

# struct nlmsghdr is in host byte order; BPF_B loads take single bytes, so these
# say which byte holds nlmsg_type's low half (the ctnetlink message) and which
# byte of nlmsg_flags holds NLM_F_CREATE (and that bit within it).
_LITTLE = sys.byteorder == "little"
_NLMSG_TYPE_LOW = 4 if _LITTLE else 5
_NLMSG_FLAGS_CREATE = (7, NLM_F_CREATE >> 8) if _LITTLE else (6, NLM_F_CREATE >> 8)

#: One instruction as nat_tcp_filter writes it: (code, jump-if-true label,
#: jump-if-false label, k); the labels become offsets when the program is packed.
_Insn = tuple[int, str | None, str | None, int]

#: Verdicts: a socket filter returns how many bytes of the message to keep.
_ACCEPT = 0xFFFFFFFF
_REJECT = 0


def nat_tcp_filter() -> bytes:
    """A classic BPF program (packed ``struct sock_filter[]``) for SO_ATTACH_FILTER.

    It runs in netlink_broadcast (do_one_broadcast -> sk_filter) *before* the
    message is charged to the receive buffer, so what it rejects can neither
    fill the buffer nor cause ENOBUFS. It rejects a conntrack event whose
    CTA_STATUS has no IPS_SRC_NAT/IPS_DST_NAT bit and whose reply source is
    its original destination (not translated: see :func:`translated`), or
    whose CTA_TUPLE_ORIG protocol is not TCP, using the kernel's netlink-attribute ancillary loads
    (bpf_skb_get_nlattr / bpf_skb_get_nlattr_nest, as libnetfilter_conntrack's
    nfct_filter does). Anything it cannot find it accepts: userspace decides
    and counts it, so the kernel filter can only ever drop what is certainly
    irrelevant.

    It also rejects UPDATE events into the states no rule reads
    (:data:`CLOSING_STATES`: FIN_WAIT, CLOSE_WAIT, LAST_ACK), as the bpf
    programs never report them: a connection closed with FINs then arrives
    as NEW, SYN_RECV, ESTABLISHED, TIME_WAIT and DESTROY: five events instead
    of seven or eight (bench/storm.py measures the CPU this saves). An UPDATE
    carries CTA_PROTOINFO only when its IPCT_PROTOINFO bit is set
    (ctnetlink_conntrack_event), i.e. when the state changed.
    """
    nlattr = (_SKF_AD_OFF + _SKF_AD_NLATTR) & 0xFFFFFFFF
    nlattr_nest = (_SKF_AD_OFF + _SKF_AD_NLATTR_NEST) & 0xFFFFFFFF
    ldx_imm = _BPF_LDX | _BPF_IMM
    ld_byte = _BPF_LD | _BPF_B | _BPF_ABS
    ld_byte_x = _BPF_LD | _BPF_B | _BPF_IND
    jeq = _BPF_JMP | _BPF_JEQ | _BPF_K
    jset = _BPF_JMP | _BPF_JSET | _BPF_K

    def find(*path: int) -> list[_Insn]:
        """X = offset of the attribute at ``path`` (top level first, then inside each
        nest in turn); the message is accepted when any of them is absent (A == 0)."""
        steps: list[_Insn] = [(_BPF_LD | _BPF_IMM, None, None, ATTRS_OFFSET)]
        for depth, attr in enumerate(path):
            steps += [
                (ldx_imm, None, None, attr),
                (_BPF_LD | _BPF_W | _BPF_ABS, None, None, nlattr_nest if depth else nlattr),
                (jeq, "accept", None, 0),
            ]
        return [*steps, (_BPF_MISC | _BPF_TAX, None, None, 0)]

    prog: list[_Insn | str] = [
        *find(CTA_STATUS),
        # BPF word loads are big-endian, as ctnetlink stores CTA_STATUS.
        (_BPF_LD | _BPF_W | _BPF_IND, None, None, 4),
        (jset, "tcp", None, NAT_MASK),
        # No NAT bit: keep it only if IPVS translated it (reply source != original
        # destination, see translated()); IPv6 entries have no V4 attributes: accepted.
        *find(CTA_TUPLE_ORIG, CTA_TUPLE_IP, CTA_IP_V4_DST),
        (_BPF_LD | _BPF_W | _BPF_IND, None, None, 4),
        (_BPF_ST, None, None, 0),  # M[0] = original destination
        *find(CTA_TUPLE_REPLY, CTA_TUPLE_IP, CTA_IP_V4_SRC),
        (_BPF_LD | _BPF_W | _BPF_IND, None, None, 4),  # A = reply source
        (_BPF_LDX | _BPF_MEM, None, None, 0),  # X = M[0]
        (_BPF_JMP | _BPF_JEQ | _BPF_X, "reject", None, 0),
        "tcp",
        *find(CTA_TUPLE_ORIG, CTA_TUPLE_PROTO, CTA_PROTO_NUM),
        (ld_byte_x, None, None, 4),  # A = protocol number (u8)
        (jeq, None, "reject", IPPROTO_TCP),
        # Only an UPDATE (CT_NEW without NLM_F_CREATE) goes on to the state check.
        (ld_byte, None, None, _NLMSG_TYPE_LOW),  # A = ctnetlink message (low byte)
        (jeq, None, "accept", IPCTNL_MSG_CT_NEW),
        (ld_byte, None, None, _NLMSG_FLAGS_CREATE[0]),
        (jset, "accept", None, _NLMSG_FLAGS_CREATE[1]),
        *find(CTA_PROTOINFO, CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE),
        (ld_byte_x, None, None, 4),  # A = TCP conntrack state (u8)
        *((jeq, "reject", None, state) for state in sorted(CLOSING_STATES)),
        "accept",
        (_BPF_RET | _BPF_K, None, None, _ACCEPT),
        "reject",
        (_BPF_RET | _BPF_K, None, None, _REJECT),
    ]
    insns: list[_Insn] = []
    labels: dict[str, int] = {}
    for item in prog:
        if isinstance(item, str):
            labels[item] = len(insns)  # a label names the instruction after it
        else:
            insns.append(item)
    out = bytearray()
    for pc, (code, jt, jf, k) in enumerate(insns):
        # Jump offsets are relative to the next instruction.
        jt_off = labels[jt] - pc - 1 if jt else 0
        jf_off = labels[jf] - pc - 1 if jf else 0
        out += _SOCK_FILTER.pack(code, jt_off, jf_off, k)
    return bytes(out)
