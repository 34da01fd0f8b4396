"""Userspace mirror of bpf/cttrace.h, and the decoder from raw records to events.

The BPF programs write fixed C structs into a ring or perf buffer; this module
reads them back with ctypes Structures that mirror the header field for field
(tests/unit/test_bpf_layout.py compiles the header with gcc and compares every
size and offset, and decodes raw records recorded from the real programs).
It does not import bcc: the decoder is plain Python, usable and testable
anywhere.
"""

from __future__ import annotations

import ctypes
import socket

from cttrace.events import CtEvent, CtKind, CtStatus, Event, Flow, SockConnect, TcpReset, TcpState

# ctt_header.kind
EV_CT_NEW = 1
EV_CT_UPDATE = 2
EV_CT_DESTROY = 3
EV_CONNECT = 4
EV_RESET = 5

# Slots of the per-CPU counter map ctt_counters.
CNT_LOST = 0
CNT_FILTERED = 1
CNT_NOT_ACCEPTED = 2
CNT_STASH_FULL = 3
CNT_FILTERED_TRANSITION = 4
CNT_EMITTED = 5
CNT_TRACKED = 6
CNT_REPORTED = 7
CNT_UNSEEN_DELETE = 8
CNT_QUIET = 9
NR_COUNTERS = 10

_CT_KINDS = {EV_CT_NEW: CtKind.NEW, EV_CT_UPDATE: CtKind.UPDATE, EV_CT_DESTROY: CtKind.DESTROY}


class CttFlow(ctypes.Structure):
    _fields_ = (
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("sport_be", ctypes.c_uint16),
        ("dport_be", ctypes.c_uint16),
    )


class CttHeader(ctypes.Structure):
    _fields_ = (
        ("ts_ns", ctypes.c_uint64),
        ("kind", ctypes.c_uint32),
        ("netns_ino", ctypes.c_uint32),
    )


class CttCtEvent(ctypes.Structure):
    _fields_ = (
        ("hdr", CttHeader),
        ("ct_ptr", ctypes.c_uint64),
        ("created_ns", ctypes.c_uint64),
        ("orig", CttFlow),
        ("reply", CttFlow),
        ("status", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("zone", ctypes.c_uint16),
        ("l3num", ctypes.c_uint16),
        ("tcp_state", ctypes.c_uint8),
        ("old_tcp_state", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 2),
    )


class CttConnectEvent(ctypes.Structure):
    _fields_ = (
        ("hdr", CttHeader),
        ("sock_ptr", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("flow", CttFlow),
        ("family", ctypes.c_uint16),
        ("_pad", ctypes.c_uint16),
        ("comm", ctypes.c_char * 16),
    )


class CttResetEvent(ctypes.Structure):
    _fields_ = (
        ("hdr", CttHeader),
        ("sock_ptr", ctypes.c_uint64),
        ("flow", CttFlow),
        ("family", ctypes.c_uint16),
        ("sent", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8),
    )


class CttTracked(ctypes.Structure):
    """What the kernel keeps of one NATed TCP entry (map ctt_tracked), read on request."""

    _fields_ = (
        ("created_ns", ctypes.c_uint64),
        ("replied_ns", ctypes.c_uint64),
        ("orig", CttFlow),
        ("reply", CttFlow),
        ("netns_ino", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("zone", ctypes.c_uint16),
        ("l3num", ctypes.c_uint16),
        ("status", ctypes.c_uint32),
        ("state", ctypes.c_uint64),
        ("reported", ctypes.c_uint64),
        ("creator", CttConnectEvent),
    )


#: Record type per kind, for size checks.
RECORDS: dict[int, type[ctypes.Structure]] = {
    EV_CT_NEW: CttCtEvent,
    EV_CT_UPDATE: CttCtEvent,
    EV_CT_DESTROY: CttCtEvent,
    EV_CONNECT: CttConnectEvent,
    EV_RESET: CttResetEvent,
}


class DecodeError(ValueError):
    """A record that is not one the programs in bpf/ write (short, or of unknown kind)."""


def addr_key(ip: str) -> bytes:
    """An address as union nf_inet_addr's 16 bytes (IPv4 in the first 4): the kernel's keys."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return socket.inet_pton(family, ip).ljust(16, b"\0")


def _addr(raw: bytes, family: int) -> str:
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw)
    return socket.inet_ntop(socket.AF_INET, raw[:4])


def _flow(flow: CttFlow, family: int) -> Flow:
    return Flow(
        _addr(bytes(flow.saddr), family),
        socket.ntohs(flow.sport_be),
        _addr(bytes(flow.daddr), family),
        socket.ntohs(flow.dport_be),
    )


def decode(raw: bytes, mono_to_wall: float = 0.0) -> Event:
    """One record from the BPF programs as an event.

    ``mono_to_wall`` is added to the record's CLOCK_MONOTONIC seconds
    (bpf_ktime_get_ns) to put it on the ``time.time()`` axis.
    Raises :class:`DecodeError` for records this decoder does not know.
    """
    if len(raw) < ctypes.sizeof(CttHeader):
        raise DecodeError(f"record of {len(raw)} bytes is shorter than its header")
    hdr = CttHeader.from_buffer_copy(raw)
    record = RECORDS.get(hdr.kind)
    if record is None:
        raise DecodeError(f"record of unknown kind {hdr.kind}")
    if len(raw) < ctypes.sizeof(record):
        raise DecodeError(
            f"kind {hdr.kind} record is {len(raw)} bytes, expected {ctypes.sizeof(record)}"
        )
    ts = hdr.ts_ns / 1e9 + mono_to_wall
    if record is CttCtEvent:
        ct = CttCtEvent.from_buffer_copy(raw)
        kind = _CT_KINDS[hdr.kind]
        return CtEvent(
            kind=kind,
            ts=ts,
            entry_id=ct.ct_ptr,
            orig=_flow(ct.orig, ct.l3num),
            reply=_flow(ct.reply, ct.l3num),
            tcp_state=ct.tcp_state,
            status=ct.status,
            old_tcp_state=ct.old_tcp_state if kind is CtKind.UPDATE else None,
            zone=ct.zone,
            mark=ct.mark,
            source="bpf",
        )
    if record is CttConnectEvent:
        return _connect(CttConnectEvent.from_buffer_copy(raw), ts)
    rst = CttResetEvent.from_buffer_copy(raw)
    return TcpReset(ts=ts, flow=_flow(rst.flow, rst.family), sent=bool(rst.sent))


_UNANSWERED = ~(int(CtStatus.SEEN_REPLY) | int(CtStatus.ASSURED))


def tracked_events(ct_ptr: int, t: CttTracked, mono_to_wall: float = 0.0) -> list[Event]:
    """The history of a tracked entry as the records it would have sent: the creating
    socket's connect, a NEW at its confirm, and its first reply when it had one.

    The same replay the kernel sends when an entry becomes interesting
    (``ctt_report_entry`` in bpf/conntrack.bpf.c); userspace builds it when it asks
    for the entries toward a DNAT target.
    """
    out: list[Event] = []
    if t.creator.hdr.kind == EV_CONNECT:
        out.append(_connect(t.creator, t.creator.hdr.ts_ns / 1e9 + mono_to_wall))
    orig, reply = tracked_flows(t)
    status = t.status & _UNANSWERED
    out.append(CtEvent(kind=CtKind.NEW, ts=t.created_ns / 1e9 + mono_to_wall, entry_id=ct_ptr,
                       orig=orig, reply=reply, tcp_state=int(TcpState.SYN_SENT), status=status,
                       zone=t.zone, mark=t.mark, source="bpf"))
    if t.replied_ns and t.state != TcpState.SYN_SENT:
        out.append(CtEvent(kind=CtKind.UPDATE, ts=t.replied_ns / 1e9 + mono_to_wall,
                           entry_id=ct_ptr, orig=orig, reply=reply, tcp_state=t.state,
                           status=status | int(CtStatus.SEEN_REPLY),
                           old_tcp_state=int(TcpState.SYN_SENT), zone=t.zone, mark=t.mark,
                           source="bpf"))
    return out


def tracked_flows(t: CttTracked) -> tuple[Flow, Flow]:
    """A kept entry's original and reply tuples."""
    return _flow(t.orig, t.l3num), _flow(t.reply, t.l3num)


def _connect(conn: CttConnectEvent, ts: float) -> SockConnect:
    return SockConnect(
        ts=ts,
        flow=_flow(conn.flow, conn.family),
        pid=conn.pid,
        comm=conn.comm.decode(errors="replace"),
        cgroup_id=conn.cgroup_id,
        netns_ino=conn.hdr.netns_ino,
        sock_id=conn.sock_ptr,
    )
