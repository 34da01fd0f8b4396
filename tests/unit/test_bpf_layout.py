"""The userspace mirror of bpf/cttrace.h matches the C layout, and decodes real records.

Layout: gcc compiles a small program against bpf/cttrace.h that prints the
offset and size of every field the ctypes mirrors declare, the size of each
struct and the value of each constant; they must match the mirrors exactly
(clang's BPF target lays these hand-padded structs out as gcc's x86-64 does).

Decoding: tests/unit/data/bpf/*.json hold raw records written by the real
programs in the VM tier (tests/vm/run_vm_tier.py --record), each with what the
scenario that produced it says it contains (not what a decoder said). They
go through the same :func:`decode` as production.
"""

from __future__ import annotations

import ctypes
import json
import socket
import subprocess
from pathlib import Path

import pytest

from cttrace.events import CtEvent, CtKind, CtStatus, Flow, SockConnect, TcpReset
from cttrace.sources import bpf_layout
from cttrace.sources.bpf_layout import (
    CttConnectEvent,
    CttCtEvent,
    CttFlow,
    CttHeader,
    CttResetEvent,
    CttTracked,
    DecodeError,
    decode,
    tracked_events,
)

REPO = Path(__file__).resolve().parents[2]
HEADER = REPO / "src" / "cttrace" / "bpf" / "cttrace.h"
SAMPLES = Path(__file__).parent / "data" / "bpf"
EXPECTED_SAMPLES = {
    "ct_new", "ct_update_syn_recv", "ct_destroy", "connect", "reset_sent", "reset_received",
}

MIRRORS: dict[str, type[ctypes.Structure]] = {
    "ctt_flow": CttFlow,
    "ctt_header": CttHeader,
    "ctt_ct_event": CttCtEvent,
    "ctt_connect_event": CttConnectEvent,
    "ctt_reset_event": CttResetEvent,
    "ctt_tracked": CttTracked,
}
CONSTANTS = {
    "CTT_EV_CT_NEW": bpf_layout.EV_CT_NEW,
    "CTT_EV_CT_UPDATE": bpf_layout.EV_CT_UPDATE,
    "CTT_EV_CT_DESTROY": bpf_layout.EV_CT_DESTROY,
    "CTT_EV_CONNECT": bpf_layout.EV_CONNECT,
    "CTT_EV_RESET": bpf_layout.EV_RESET,
    "CTT_CNT_LOST": bpf_layout.CNT_LOST,
    "CTT_CNT_FILTERED": bpf_layout.CNT_FILTERED,
    "CTT_CNT_NOT_ACCEPTED": bpf_layout.CNT_NOT_ACCEPTED,
    "CTT_CNT_STASH_FULL": bpf_layout.CNT_STASH_FULL,
    "CTT_CNT_FILTERED_TRANSITION": bpf_layout.CNT_FILTERED_TRANSITION,
    "CTT_CNT_EMITTED": bpf_layout.CNT_EMITTED,
    "CTT_CNT_TRACKED": bpf_layout.CNT_TRACKED,
    "CTT_CNT_REPORTED": bpf_layout.CNT_REPORTED,
    "CTT_CNT_UNSEEN_DELETE": bpf_layout.CNT_UNSEEN_DELETE,
    "CTT_CNT_QUIET": bpf_layout.CNT_QUIET,
    "CTT_NR_COUNTERS": bpf_layout.NR_COUNTERS,
}


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """``{"struct.field.offset": n, "struct.field.size": n, "struct.size": n, CONST: v}``,
    printed by a program gcc compiled against bpf/cttrace.h."""
    lines = ["#include <stddef.h>", "#include <stdio.h>", f'#include "{HEADER}"',
             "int main(void) {"]
    for c_name, mirror in MIRRORS.items():
        lines.append(f'printf("{c_name}.size %zu\\n", sizeof(struct {c_name}));')
        for field, *_ in mirror._fields_:
            lines.append(
                f'printf("{c_name}.{field}.offset %zu\\n", offsetof(struct {c_name}, {field}));'
            )
            lines.append(
                f'printf("{c_name}.{field}.size %zu\\n", sizeof(((struct {c_name} *)0)->{field}));'
            )
    for name in CONSTANTS:
        lines.append(f'printf("{name} %d\\n", {name});')
    lines.append("return 0; }")
    work = tmp_path_factory.mktemp("layout")
    source, binary = work / "layout.c", work / "layout"
    source.write_text("\n".join(lines) + "\n")
    subprocess.run(["gcc", "-Wall", "-Werror", "-o", str(binary), str(source)], check=True)
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    return {key: int(value) for key, value in (line.split() for line in output.splitlines())}


@pytest.mark.parametrize("c_name", sorted(MIRRORS))
def test_mirror_matches_the_c_layout(c_layout: dict[str, int], c_name: str) -> None:
    mirror = MIRRORS[c_name]
    assert ctypes.sizeof(mirror) == c_layout[f"{c_name}.size"]
    for field, *_ in mirror._fields_:
        descriptor = getattr(mirror, field)
        assert descriptor.offset == c_layout[f"{c_name}.{field}.offset"], field
        assert descriptor.size == c_layout[f"{c_name}.{field}.size"], field


def test_constants_match_the_header(c_layout: dict[str, int]) -> None:
    assert {name: c_layout[name] for name in CONSTANTS} == CONSTANTS


def _samples() -> dict[str, dict[str, object]]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(SAMPLES.glob("*.json"))}


def test_every_record_kind_has_a_recorded_sample() -> None:
    missing = EXPECTED_SAMPLES - set(_samples())
    assert not missing, f"record them: python tests/vm/run_vm_tier.py --record ({missing})"


def _flow(value: object) -> Flow:
    assert isinstance(value, list)
    src, sport, dst, dport = value
    return Flow(src, sport, dst, dport)


@pytest.mark.parametrize("name", sorted(EXPECTED_SAMPLES))
def test_recorded_record_decodes_to_what_the_scenario_did(name: str) -> None:
    sample = _samples()[name]
    raw = bytes.fromhex(str(sample["raw_hex"]))
    expect = sample["expect"]
    assert isinstance(expect, dict)
    event = decode(raw)
    assert type(event).__name__ == expect["type"]
    if isinstance(event, CtEvent):
        assert event.kind is CtKind[expect["kind"]]
        assert event.orig == _flow(expect["orig"])
        assert event.reply == _flow(expect["reply"])
        assert event.tcp_state == expect["tcp_state"]
        assert event.old_tcp_state == expect["old_tcp_state"]
        for bit in expect["status_has"]:
            assert event.status & CtStatus[bit], bit
        assert (event.zone, event.mark, event.source) == (expect["zone"], expect["mark"], "bpf")
    elif isinstance(event, SockConnect):
        assert event.flow == _flow(expect["flow"])
        assert (event.pid, event.comm, event.netns_ino) == (
            expect["pid"], expect["comm"], expect["netns_ino"]
        )
    else:
        assert isinstance(event, TcpReset)
        assert event.flow == _flow(expect["flow"])
        assert event.sent is expect["sent"]


def test_records_of_one_entry_decode_to_one_entry_id() -> None:
    samples = _samples()
    ids = {
        decode(bytes.fromhex(str(s["raw_hex"]))).entry_id  # type: ignore[union-attr]
        for s in samples.values()
        if isinstance(s["expect"], dict) and s["expect"].get("entry") == "flow1"
    }
    assert len(ids) == 1
    entry_id = ids.pop()
    # A kernel address (struct nf_conn *): upper canonical half, slab-aligned.
    assert entry_id >> 63 == 1 and entry_id % 8 == 0


def test_timestamps_move_from_the_monotonic_to_the_wall_clock() -> None:
    raw = bytes.fromhex(str(_samples()["ct_new"]["raw_hex"]))
    ts_ns = int.from_bytes(raw[:8], "little")
    assert decode(raw).ts == ts_ns / 1e9
    assert decode(raw, mono_to_wall=1_700_000_000.0).ts == ts_ns / 1e9 + 1_700_000_000.0


def test_short_and_unknown_records_are_refused() -> None:
    raw = bytes.fromhex(str(_samples()["ct_new"]["raw_hex"]))
    with pytest.raises(DecodeError, match="shorter than its header"):
        decode(raw[:10])
    with pytest.raises(DecodeError, match="expected 120"):
        decode(raw[:100])
    unknown = raw[:8] + (99).to_bytes(4, "little") + raw[12:]
    with pytest.raises(DecodeError, match="unknown kind 99"):
        decode(unknown)


#: (client, VIP, pod) per family, as the kernel's tuples hold them.
_ADDRS = {
    socket.AF_INET: ("10.0.0.2", "10.96.0.10", "10.244.0.7"),
    socket.AF_INET6: ("fd00:10::2", "fd00:96::10", "fd00:244::7"),
}


def _set_flow(flow: CttFlow, src: str, sport: int, dst: str, dport: int) -> None:
    flow.saddr[:], flow.daddr[:] = bpf_layout.addr_key(src), bpf_layout.addr_key(dst)
    flow.sport_be, flow.dport_be = socket.htons(sport), socket.htons(dport)


def _tracked(replied_ns: int, state: int, creator_pid: int = 0,
             family: int = socket.AF_INET) -> CttTracked:
    client, vip, pod = _ADDRS[family]
    t = CttTracked()
    t.created_ns, t.replied_ns, t.state, t.l3num = 10_000_000_000, replied_ns, state, family
    t.status = int(CtStatus.CONFIRMED | CtStatus.DST_NAT | CtStatus.SEEN_REPLY)
    _set_flow(t.orig, client, 40000, vip, 80)
    _set_flow(t.reply, pod, 8080, client, 40000)
    if creator_pid:
        t.creator.hdr.kind, t.creator.hdr.ts_ns = bpf_layout.EV_CONNECT, 9_999_000_000
        t.creator.pid, t.creator.sock_ptr = creator_pid, 0xFFFF888000001000
        t.creator.family = family
        _set_flow(t.creator.flow, client, 40000, vip, 80)
    return t


def test_a_kept_entry_replays_as_the_records_it_would_have_sent() -> None:
    """What userspace reads of a kept entry (a newly watched target) becomes the events the
    kernel would have sent: the creator's connect, NEW at confirm (unanswered), first reply."""
    events = tracked_events(0xFFFF888012345600, _tracked(10_050_000_000, 3, creator_pid=42),
                            mono_to_wall=1000.0)
    connect, new, reply = events
    assert isinstance(connect, SockConnect) and connect.pid == 42
    assert connect.flow == Flow("10.0.0.2", 40000, "10.96.0.10", 80)
    assert isinstance(new, CtEvent) and new.kind is CtKind.NEW and new.ts == 1010.0
    assert new.reply.src == "10.244.0.7" and new.tcp_state == 1  # SYN_SENT
    assert not new.status & CtStatus.SEEN_REPLY
    assert isinstance(reply, CtEvent) and reply.kind is CtKind.UPDATE
    assert (reply.old_tcp_state, reply.tcp_state) == (1, 3)  # SYN_SENT -> ESTABLISHED
    assert reply.ts == pytest.approx(1010.05) and reply.status & CtStatus.SEEN_REPLY
    assert new.entry_id == reply.entry_id == 0xFFFF888012345600


def test_an_ipv6_kept_entry_replays_with_ipv6_tuples_and_socket() -> None:
    """IPv6 entries (l3num AF_INET6) and IPv6 sockets (family AF_INET6) carry all 16 bytes
    of their addresses; the socket's flow is the entry's original tuple."""
    connect, new, reply = tracked_events(1, _tracked(10_050_000_000, 3, creator_pid=42,
                                                     family=socket.AF_INET6))
    assert isinstance(connect, SockConnect)
    assert connect.flow == Flow("fd00:10::2", 40000, "fd00:96::10", 80)
    assert isinstance(new, CtEvent) and isinstance(reply, CtEvent)
    assert new.orig == connect.flow == reply.orig
    assert new.reply == Flow("fd00:244::7", 8080, "fd00:10::2", 40000)
    assert new.target == ("fd00:244::7", 8080)


def test_a_connect_record_decodes_by_its_family() -> None:
    """The same record layout carries an IPv4 socket (first 4 bytes) and an IPv6 one."""
    for family, (client, vip, _) in _ADDRS.items():
        record = CttConnectEvent()
        record.hdr.kind, record.family, record.pid = bpf_layout.EV_CONNECT, family, 7
        record.comm = b"curl"
        _set_flow(record.flow, client, 40001, vip, 443)
        event = decode(bytes(record))
        assert isinstance(event, SockConnect)
        assert event.flow == Flow(client, 40001, vip, 443)
        assert (event.pid, event.comm) == (7, "curl")


def test_an_unanswered_kept_entry_replays_as_new_only() -> None:
    (new,) = tracked_events(1, _tracked(0, 1))
    assert isinstance(new, CtEvent) and new.kind is CtKind.NEW
