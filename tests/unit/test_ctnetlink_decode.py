"""The ctnetlink decoder on messages recorded from the real kernel, and on hand-made edge cases.

Recorded data: tests/unit/data/ctnetlink/ (README.md there says how it was made).
"""

from __future__ import annotations

import errno
import json
import random
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from cttrace.errors import NotRootError, SourceError
from cttrace.events import NAT_MASK, CtEvent, CtKind, CtStatus, Flow, TcpState, _AddressTexts
from cttrace.netns import NetnsError, netns_path
from cttrace.sources import ctnetlink as ct
from cttrace.sources.netlink import _socket_error

DATA = Path(__file__).parent / "data" / "ctnetlink" / "messages.jsonl"
RECORDS: list[dict[str, Any]] = [json.loads(line) for line in DATA.read_text().splitlines()]
GROUP_KIND = {"NEW": CtKind.NEW, "UPDATE": CtKind.UPDATE, "DESTROY": CtKind.DESTROY}


def datagrams(phase: str) -> list[tuple[str, bytes]]:
    return [(r["group"], bytes.fromhex(r["hex"])) for r in RECORDS if r["phase"] == phase]


def decode_phase(phase: str) -> list[CtEvent]:
    events: list[CtEvent] = []
    for _group, data in datagrams(phase):
        events.extend(ct.decode_messages(data, 1.0).events)
    return events


# --- recorded kernel messages ------------------------------------------------


@pytest.mark.parametrize("phase", ["tcp4-dnat", "tcp6-dnat", "for-dump", "tcp4-dnat-zone7-mark42"])
def test_each_event_decodes_to_the_kind_of_the_group_it_was_delivered_to(phase: str) -> None:
    for group, data in datagrams(phase):
        decoded = ct.decode_messages(data, 7.5)
        assert (decoded.filtered, decoded.malformed, decoded.errno) == (0, 0, 0)
        assert [e.kind for e in decoded.events] == [GROUP_KIND[group]]
        assert decoded.events[0].ts == 7.5


def test_ipv4_dnat_connection_lifecycle() -> None:
    events = decode_phase("tcp4-dnat")
    assert [e.tcp_state for e in events] == [
        TcpState.SYN_SENT,
        TcpState.SYN_RECV,
        TcpState.ESTABLISHED,
        TcpState.FIN_WAIT,
        TcpState.LAST_ACK,
        TcpState.TIME_WAIT,
    ]
    assert len({e.entry_id for e in events}) == 1 and events[0].entry_id != 0
    new, established = events[0], events[2]
    # nf_nat_setup_info sets IPS_DST_NAT before __nf_conntrack_confirm: NEW already says DNAT.
    assert new.status & CtStatus.DST_NAT and new.status & CtStatus.CONFIRMED
    assert not new.status & CtStatus.SEEN_REPLY
    assert established.status & CtStatus.SEEN_REPLY and established.status & CtStatus.ASSURED
    for e in events:
        assert e.orig.src == "10.244.0.1" and e.orig.dst == "10.96.0.1" and e.orig.dport == 80
        assert e.target == ("127.0.0.1", 8080)
        assert e.reply == Flow("127.0.0.1", 8080, "10.244.0.1", e.orig.sport)
        assert (e.zone, e.mark, e.old_tcp_state, e.source) == (0, 0, None, "netlink")


def test_ipv6_dnat_addresses_and_target() -> None:
    events = decode_phase("tcp6-dnat")
    assert [e.kind for e in events] == [CtKind.NEW] + [CtKind.UPDATE] * 5
    for e in events:
        assert (e.orig.src, e.orig.dst, e.orig.dport) == ("fd00:244::1", "fd00:96::1", 80)
        assert e.target == ("::1", 8080)
        assert e.status & NAT_MASK


def test_zone_and_mark() -> None:
    events = decode_phase("tcp4-dnat-zone7-mark42")
    assert events and all((e.zone, e.mark) == (7, 0x42) for e in events)
    assert events[0].target == ("127.0.0.1", 8081)


@pytest.mark.parametrize("phase", ["tcp4-plain", "udp4-dnat"])
def test_unnated_tcp_and_nated_udp_are_counted_as_filtered(phase: str) -> None:
    for _group, data in datagrams(phase):
        decoded = ct.decode_messages(data, 1.0)
        assert decoded.events == [] and decoded.filtered == 1 and decoded.malformed == 0


def test_destroy_of_flushed_entries() -> None:
    events = decode_phase("flush")
    assert events and all(e.kind is CtKind.DESTROY for e in events)
    assert all(e.status & CtStatus.DYING for e in events)
    live = {e.entry_id for e in decode_phase("for-dump")}
    assert live <= {e.entry_id for e in events}


def test_dump_buffer_holds_several_entries_then_done() -> None:
    (_, first), (_, last) = datagrams("dump")
    decoded = ct.decode_messages(first, 2.0, dump=True)
    assert decoded.malformed == 0 and not decoded.done
    assert decoded.filtered == 1  # the un-NATed 127.0.0.1 connection
    assert all(e.kind is CtKind.DUMP for e in decoded.events)
    ids = {e.entry_id for e in decoded.events}
    # Every NATed connection made before the dump is in it, under its event-stream id.
    expected = {e.entry_id for p in ("tcp4-dnat", "tcp6-dnat", "for-dump") for e in decode_phase(p)}
    assert ids == expected
    end = ct.decode_messages(last, 2.0, dump=True)
    assert end.done and end.events == [] and end.errno == 0


def test_many_datagrams_in_one_buffer_decode_like_one_by_one() -> None:
    singles: list[CtEvent] = []
    parts = []
    for rec in RECORDS:
        if rec["phase"] != "dump":
            data = bytes.fromhex(rec["hex"])
            singles.extend(ct.decode_messages(data, 3.0).events)
            parts.append(data + b"\0" * (-len(data) % 4))
    batch = ct.decode_messages(b"".join(parts), 3.0)
    assert batch.events == singles and batch.malformed == 0
    assert batch.filtered == sum(ct.decode_messages(p, 3.0).filtered for p in parts)


def test_memoryview_and_bytearray_inputs() -> None:
    _, data = datagrams("tcp4-dnat")[0]
    expected = ct.decode_messages(data, 1.0)
    assert ct.decode_messages(bytearray(data), 1.0) == expected
    assert ct.decode_messages(memoryview(bytearray(data)), 1.0) == expected


def test_dump_flag_turns_new_messages_into_dump_events() -> None:
    _, data = datagrams("tcp4-dnat")[0]  # a NEW with NLM_F_CREATE
    assert [e.kind for e in ct.decode_messages(data, 1.0, dump=True).events] == [CtKind.DUMP]


# --- truncation ----------------------------------------------------------------


def test_every_truncation_of_a_buffer_is_reported_never_misparsed() -> None:
    _, data = datagrams("tcp6-dnat")[0]
    for cut in range(1, len(data)):
        decoded = ct.decode_messages(data[:cut], 1.0)
        assert decoded.events == [] and decoded.malformed == 1, cut


def test_message_whose_attributes_overrun_its_own_length_is_malformed() -> None:
    _, data = datagrams("tcp4-dnat")[0]
    boundaries = set()  # where a message with fewer top-level attributes would end
    off = ct.ATTRS_OFFSET
    while off < len(data):
        boundaries.add(off)
        off += (struct.unpack_from("=H", data, off)[0] + 3) & ~3
    for cut in range(ct.ATTRS_OFFSET + 1, len(data)):
        # nlmsg_len says `cut`. Up to 3 bytes past an attribute boundary are
        # leftover padding (nla_parse tolerates them too): a valid message with
        # fewer attributes. Further in, the last attribute overruns the message.
        shortened = bytearray(data[:cut])
        struct.pack_into("=I", shortened, 0, cut)
        decoded = ct.decode_messages(bytes(shortened), 1.0)
        if cut - max(b for b in boundaries if b <= cut) < 4:
            assert decoded.malformed + decoded.filtered + len(decoded.events) == 1, cut
        else:
            assert (decoded.events, decoded.malformed) == ([], 1), cut


def test_truncated_message_after_a_good_one_keeps_the_good_one() -> None:
    (_, first), (_, second) = datagrams("tcp4-dnat")[:2]
    decoded = ct.decode_messages(first + second[:40], 1.0)
    assert [e.kind for e in decoded.events] == [CtKind.NEW] and decoded.malformed == 1


# --- hand-crafted messages ---------------------------------------------------------


def nla(atype: int, payload: bytes, nested: bool = False) -> bytes:
    flags = 0x8000 if nested else 0
    raw = struct.pack("=HH", 4 + len(payload), atype | flags) + payload
    return raw + b"\0" * (-len(raw) % 4)


def tuple_v4(
    src: str, sport: int, dst: str, dport: int, proto: int = 6, extra: bytes = b""
) -> bytes:
    ip = nla(ct.CTA_IP_V4_SRC, socket.inet_aton(src)) + nla(ct.CTA_IP_V4_DST, socket.inet_aton(dst))
    l4 = (
        nla(ct.CTA_PROTO_NUM, bytes([proto]))
        + nla(ct.CTA_PROTO_SRC_PORT, struct.pack(">H", sport))
        + nla(ct.CTA_PROTO_DST_PORT, struct.pack(">H", dport))
        + extra
    )
    return nla(ct.CTA_TUPLE_IP, ip, True) + nla(ct.CTA_TUPLE_PROTO, l4, True)


def message(attrs: bytes, msg_type: int = ct.MSG_CT_NEW, flags: int = 0, family: int = 2) -> bytes:
    body = struct.pack("=BBH", family, 0, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), msg_type, flags, 1, 0) + body


def entry_attrs(
    status: int = int(CtStatus.DST_NAT | CtStatus.CONFIRMED), proto: int = 6, extra: bytes = b"",
    reply_src: tuple[str, int] = ("10.244.1.5", 8443),
) -> bytes:
    return (
        nla(ct.CTA_TUPLE_ORIG, tuple_v4("10.0.0.1", 40000, "10.96.0.10", 443, proto), True)
        + nla(ct.CTA_TUPLE_REPLY, tuple_v4(*reply_src, "10.0.0.1", 40000, proto), True)
        + nla(ct.CTA_STATUS, struct.pack(">I", status))
        + nla(ct.CTA_ID, struct.pack(">I", 0xDEADBEEF))
        + extra
    )


def test_handmade_entry_without_protoinfo_has_unknown_state() -> None:
    # ctnetlink_conntrack_event adds CTA_PROTOINFO only for IPCT_PROTOINFO events.
    decoded = ct.decode_messages(message(entry_attrs()), 1.0)
    (event,) = decoded.events
    assert event.kind is CtKind.UPDATE and event.tcp_state is None
    assert event.entry_id == 0xDEADBEEF and event.target == ("10.244.1.5", 8443)


def test_unknown_attributes_are_skipped_at_every_level() -> None:
    unknown = nla(200, b"\x01\x02\x03") + nla(201, nla(1, b"xyzw"), True)
    protoinfo = nla(
        ct.CTA_PROTOINFO,
        nla(99, b"\0" * 5) + nla(ct.CTA_PROTOINFO_TCP, nla(9, b"\x07") + nla(1, b"\x03"), True),
        True,
    )
    attrs = unknown + nla(
        ct.CTA_TUPLE_ORIG,
        tuple_v4("10.0.0.1", 40000, "10.96.0.10", 443, extra=nla(77, b"\x11\x22"))
        + nla(3, b"\0\x07"),
        True,
    )
    attrs += nla(ct.CTA_TUPLE_REPLY, tuple_v4("10.244.1.5", 8443, "10.0.0.1", 40000), True)
    attrs += unknown + nla(ct.CTA_STATUS, struct.pack(">I", int(CtStatus.SRC_NAT))) + protoinfo
    (event,) = ct.decode_messages(message(attrs, flags=ct.NLM_F_CREATE | ct.NLM_F_EXCL), 1.0).events
    assert event.kind is CtKind.NEW and event.tcp_state == TcpState.ESTABLISHED
    assert event.orig == Flow("10.0.0.1", 40000, "10.96.0.10", 443)


def test_handmade_missing_reply_tuple_is_malformed() -> None:
    attrs = nla(ct.CTA_TUPLE_ORIG, tuple_v4("10.0.0.1", 1, "10.0.0.2", 2), True)
    attrs += nla(ct.CTA_STATUS, struct.pack(">I", NAT_MASK))
    decoded = ct.decode_messages(message(attrs), 1.0)
    assert decoded.events == [] and decoded.malformed == 1


def test_other_netlink_messages_are_ignored_and_errors_reported() -> None:
    expectation = message(b"", msg_type=(2 << 8) | 0)  # NFNL_SUBSYS_CTNETLINK_EXP
    ack = struct.pack("=IHHIIi", 36, ct.NLMSG_ERROR, 0, 1, 0, 0) + b"\0" * 16
    eperm = struct.pack("=IHHIIi", 36, ct.NLMSG_ERROR, 0, 1, 0, -errno.EPERM) + b"\0" * 16
    done = struct.pack("=IHHIIi", 20, ct.NLMSG_DONE, ct.NLM_F_MULTI, 1, 0, 0)
    decoded = ct.decode_messages(expectation + ack + eperm + done, 1.0)
    assert decoded == ct.Decoded([], 0, 0, True, errno.EPERM)


@pytest.mark.parametrize(
    ("msg_type", "flags", "kind"),
    [
        (ct.MSG_CT_NEW, ct.NLM_F_CREATE | ct.NLM_F_EXCL, CtKind.NEW),
        (ct.MSG_CT_NEW, 0, CtKind.UPDATE),
        (ct.MSG_CT_DELETE, 0, CtKind.DESTROY),
    ],
)
def test_kind_from_type_and_flags(msg_type: int, flags: int, kind: CtKind) -> None:
    (event,) = ct.decode_messages(message(entry_attrs(), msg_type, flags), 1.0).events
    assert event.kind is kind


@pytest.mark.parametrize(
    ("status", "proto"),
    [(int(CtStatus.CONFIRMED | CtStatus.SEEN_REPLY), 6), (NAT_MASK, 17), (NAT_MASK, 1)],
)
def test_handmade_irrelevant_entries_are_filtered(status: int, proto: int) -> None:
    # The un-NATed entry is also untranslated: the reply comes from where the client connected.
    reply_src = ("10.244.1.5", 8443) if status & NAT_MASK else ("10.96.0.10", 443)
    decoded = ct.decode_messages(message(entry_attrs(status, proto, reply_src=reply_src)), 1.0)
    assert (decoded.events, decoded.filtered, decoded.malformed) == ([], 1, 0)


def test_an_ipvs_translated_entry_without_nat_bits_is_kept() -> None:
    # IPVS (net.ipv4.vs.conntrack=1) rewrites the reply tuple and sets no NAT status bit.
    status = int(CtStatus.CONFIRMED | CtStatus.SEEN_REPLY)
    decoded = ct.decode_messages(message(entry_attrs(status)), 1.0)
    assert decoded.filtered == 0
    (event,) = decoded.events
    assert (event.orig.dst, event.reply.src, event.reply.sport) == ("10.96.0.10", "10.244.1.5",
                                                                     8443)
    assert not event.status & NAT_MASK


# --- requests and the socket filter ---------------------------------------------------


def test_dump_request_layout() -> None:
    req = ct.dump_request(42)
    length, mtype, flags, seq, pid = struct.unpack_from("=IHHII", req)
    assert (length, mtype, seq, pid) == (len(req), ct.MSG_CT_GET, 42, 0)
    assert flags == ct.NLM_F_REQUEST | ct.NLM_F_DUMP
    assert req[16:] == bytes([socket.AF_UNSPEC, 0, 0, 0])


def test_socket_filter_program_is_well_formed() -> None:
    prog = ct.nat_tcp_filter()
    insns = [struct.unpack_from("=HBBI", prog, i) for i in range(0, len(prog), 8)]
    assert len(prog) % 8 == 0 and len(insns) < 4096  # BPF_MAXINSNS
    assert insns[-2] == (0x06, 0, 0, 0xFFFFFFFF) and insns[-1] == (0x06, 0, 0, 0)
    for pc, (code, jt, jf, _k) in enumerate(insns):
        if code & 0x07 == 0x05:  # BPF_JMP: both targets inside the program
            assert pc + 1 + max(jt, jf) < len(insns)


# --- user-facing errors --------------------------------------------------------------


def test_permission_errors_say_run_as_root() -> None:
    err = _socket_error(PermissionError(errno.EPERM, "Operation not permitted"), "joining groups")
    assert isinstance(err, NotRootError) and "root" in str(err)


@pytest.mark.parametrize("code", [errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT])
def test_missing_ctnetlink_says_modprobe(code: int) -> None:
    err = _socket_error(OSError(code, "x"), "socket(AF_NETLINK, NETLINK_NETFILTER)")
    assert isinstance(err, SourceError) and "modprobe nf_conntrack_netlink" in str(err)


def test_dump_rejected_with_einval_says_modprobe() -> None:
    err = _socket_error(OSError(errno.EINVAL, "Invalid argument"), "conntrack table dump")
    assert "modprobe nf_conntrack_netlink" in str(err)


def test_missing_netns_lists_what_ip_netns_list_has(tmp_path: Path) -> None:
    (tmp_path / "node-a").touch()
    (tmp_path / "node-b").touch()
    with pytest.raises(NetnsError) as info:
        netns_path("nope", str(tmp_path))
    assert "'nope' not found" in str(info.value) and "node-a, node-b" in str(info.value)
    assert netns_path("node-a", str(tmp_path)) == str(tmp_path / "node-a")


# --- the fast path ------------------------------------------------------------------


def _entry_bounds(data: bytes) -> tuple[int, int, CtKind]:
    """Where the attributes of the single message ``data`` start and end, and its kind."""
    mlen, mtype, mflags = struct.unpack_from("=IHH", data)
    if mtype == ct.MSG_CT_DELETE:
        kind = CtKind.DESTROY
    else:
        kind = CtKind.NEW if mflags & ct.NLM_F_CREATE else CtKind.UPDATE
    return ct.ATTRS_OFFSET, min(mlen, len(data)), kind


@pytest.mark.parametrize("phase", ["tcp4-dnat", "tcp6-dnat", "tcp4-plain", "for-dump"])
def test_recorded_tcp_events_take_the_fast_path(phase: str) -> None:
    # The layout documented in ctnetlink.py is the one this kernel writes; if it ever
    # stops matching, decoding stays right but slow, and this says so.
    for group, data in datagrams(phase):
        start, end, kind = _entry_bounds(data)
        assert ct._decode_fast(data, start, end, kind, 1.0) is not None, group


def test_recorded_tcp_destroy_events_take_the_fast_path_unless_zoned() -> None:
    fast = 0
    for _group, data in datagrams("flush"):
        start, end, kind = _entry_bounds(data)
        general = ct._decode_entry(data, start, end, kind, 1.0)
        if general == ct._FILTERED:
            continue  # the UDP entry
        assert isinstance(general, CtEvent)
        if general.zone == 0:
            assert ct._decode_fast(data, start, end, kind, 1.0) == general
            fast += 1
        else:
            assert ct._decode_fast(data, start, end, kind, 1.0) is None
    assert fast >= 4


def test_zone_and_dump_messages_take_the_general_path() -> None:
    for _group, data in datagrams("tcp4-dnat-zone7-mark42"):
        start, end, kind = _entry_bounds(data)
        assert ct._decode_fast(data, start, end, kind, 1.0) is None


def _mutations(seed: int, count: int) -> list[bytes]:
    """Recorded messages with a few bytes changed (headers, lengths, values) or cut short."""
    rng = random.Random(seed)
    singles = [bytes.fromhex(r["hex"]) for r in RECORDS if r["phase"] != "dump"]
    out = []
    for _ in range(count):
        data = bytearray(rng.choice(singles))
        for _ in range(rng.choice((1, 1, 2, 3))):
            pos = rng.randrange(ct.ATTRS_OFFSET, len(data))
            if rng.random() < 0.5:
                data[pos] ^= 1 << rng.randrange(8)
            else:
                data[pos] = rng.choice((0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 0x80, 0xFF))
        if rng.random() < 0.2:
            data = data[: rng.randrange(ct.ATTRS_OFFSET, len(data) + 1)]
        out.append(bytes(data))
    return out


def test_fast_path_agrees_with_the_general_path() -> None:
    cases = [bytes.fromhex(r["hex"]) for r in RECORDS if r["phase"] != "dump"]
    cases += _mutations(seed=7, count=3000)
    taken = 0
    for data in cases:
        start, end, kind = _entry_bounds(data)
        fast = ct._decode_fast(data, start, end, kind, 1.0)
        if fast is None:
            continue
        taken += 1
        assert fast == ct._decode_entry(data, start, end, kind, 1.0), data.hex()
        if isinstance(fast, CtEvent):
            assert type(fast.orig) is type(fast.reply) is Flow
    assert taken > 500  # the mutations exercise the fast path, not only its refusals


def test_addresses_are_shared_strings() -> None:
    events = decode_phase("tcp4-dnat") + decode_phase("tcp6-dnat")
    assert events[0].orig.src is events[1].orig.src is events[0].reply.dst
    assert events[-1].target[0] is events[-2].target[0] == "::1"


def test_address_texts_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = _AddressTexts()
    monkeypatch.setattr(texts, "max_size", 3)
    for i in range(10):
        assert texts[bytes((10, 0, 0, i))] == f"10.0.0.{i}"
        assert len(texts) <= 3
    assert texts[socket.inet_pton(socket.AF_INET6, "fd00::1")] == "fd00::1"
    with pytest.raises(ValueError):
        texts[b"\x01\x02"]
