"""Decode throughput on one core: cttrace's ctnetlink decoder vs pyroute2's ``nfct_msg`` parser.

Why it exists: the netlink source decodes every event the kernel filter lets
through, so a decoder that is too slow turns into ENOBUFS loss. This justifies
(or not) keeping a hand-written decoder instead of pyroute2's.

A third row runs cttrace's decoder with its fast path (the kernel's usual
layout of a TCP event, read with two ``unpack_from`` calls) turned off, to
show what that path buys.

Both sides start from the same bytes (the kernel messages recorded in
tests/unit/data/ctnetlink/messages.jsonl, laid end to end as one ``read()``
batch) and end with the same list of :class:`cttrace.events.CtEvent` for the
NATed TCP entries; the script checks that the two lists are equal.

    .venv/bin/python bench/bench_decode.py [--batches N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from pyroute2.netlink.marshal import Marshal  # noqa: E402
from pyroute2.netlink.nfnetlink.nfctsocket import AsyncNFCTSocket  # noqa: E402

from cttrace.events import NAT_MASK, CtEvent, CtKind, Flow  # noqa: E402
from cttrace.sources import ctnetlink  # noqa: E402
from cttrace.sources.ctnetlink import (  # noqa: E402
    MSG_CT_DELETE,
    NLM_F_CREATE,
    decode_messages,
)

RECORDED = ROOT / "tests/unit/data/ctnetlink/messages.jsonl"


def load(only_relevant: bool) -> list[bytes]:
    """Recorded event datagrams (dump buffers left out: they hold several messages)."""
    out = []
    for line in RECORDED.read_text().splitlines():
        rec = json.loads(line)
        if rec["phase"] == "dump":
            continue
        data = bytes.fromhex(rec["hex"])
        if only_relevant and not decode_messages(data, 0.0).events:
            continue
        out.append(data)
    return out


class _NfctMarshal(Marshal):  # type: ignore[misc]
    msg_map = AsyncNFCTSocket.policy


def _flow(tup: Any) -> Flow:
    ip = tup.get_attr("CTA_TUPLE_IP")
    proto = tup.get_attr("CTA_TUPLE_PROTO")
    src = ip.get_attr("CTA_IP_V4_SRC") or ip.get_attr("CTA_IP_V6_SRC")
    dst = ip.get_attr("CTA_IP_V4_DST") or ip.get_attr("CTA_IP_V6_DST")
    return Flow(
        src, proto.get_attr("CTA_PROTO_SRC_PORT"), dst, proto.get_attr("CTA_PROTO_DST_PORT")
    )


def pyroute2_decode(buf: bytes, ts: float) -> list[CtEvent]:
    """The same job done with pyroute2: parse, then filter and build CtEvents from the attrs."""
    events = []
    for msg in _NfctMarshal().parse(buf):
        status = msg.get_attr("CTA_STATUS") or 0
        orig = msg.get_attr("CTA_TUPLE_ORIG")
        if orig is None or not status & NAT_MASK:
            continue
        if orig.get_attr("CTA_TUPLE_PROTO").get_attr("CTA_PROTO_NUM") != 6:
            continue
        mtype = msg["header"]["type"]
        if mtype == MSG_CT_DELETE:
            kind = CtKind.DESTROY
        elif msg["header"]["flags"] & NLM_F_CREATE:
            kind = CtKind.NEW
        else:
            kind = CtKind.UPDATE
        protoinfo = msg.get_attr("CTA_PROTOINFO")
        tcp = protoinfo.get_attr("CTA_PROTOINFO_TCP") if protoinfo is not None else None
        state = tcp.get_attr("CTA_PROTOINFO_TCP_STATE") if tcp is not None else None
        events.append(
            CtEvent(
                kind,
                ts,
                msg.get_attr("CTA_ID") or 0,
                _flow(orig),
                _flow(msg.get_attr("CTA_TUPLE_REPLY")),
                state,
                status,
                None,
                msg.get_attr("CTA_ZONE") or 0,
                msg.get_attr("CTA_MARK") or 0,
            )
        )
    return events


def ours(buf: bytes, ts: float) -> list[CtEvent]:
    return decode_messages(buf, ts).events


def general_path_only(buf: bytes, ts: float) -> list[CtEvent]:
    """cttrace's decoder with its fast path for the kernel's usual layout turned off."""
    fast = ctnetlink._decode_fast
    ctnetlink._decode_fast = lambda *args: None
    try:
        return decode_messages(buf, ts).events
    finally:
        ctnetlink._decode_fast = fast


def rate(
    fn: Callable[[bytes, float], list[CtEvent]], buf: bytes, n_msgs: int, batches: int
) -> float:
    """Messages per second, best of 5 runs of ``batches`` decodes of ``buf``."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(batches):
            fn(buf, 1.0)
        best = min(best, time.perf_counter() - start)
    return n_msgs * batches / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20, help="decodes of the batch per run")
    parser.add_argument("--batch-size", type=int, default=1000, help="messages per batch")
    args = parser.parse_args()

    print(
        f"{args.batch_size} messages per batch (one read()), best of 5 x {args.batches} batches\n"
    )
    print("| messages | decoder | msgs/s | µs/msg | speed-up |")
    print("|---|---|---:|---:|---:|")
    for label, only_relevant in (
        ("all recorded (NAT TCP + filtered)", False),
        ("NATed TCP only", True),
    ):
        datagrams = load(only_relevant)
        picked = [datagrams[i % len(datagrams)] for i in range(args.batch_size)]
        buf = b"".join(picked)  # ctnetlink messages are 4-byte aligned already
        mine, theirs = ours(buf, 1.0), pyroute2_decode(buf, 1.0)
        if mine != theirs or general_path_only(buf, 1.0) != theirs:
            raise SystemExit("decoders disagree on the recorded messages")
        slow = rate(pyroute2_decode, buf, len(picked), max(1, args.batches // 10))
        general = rate(general_path_only, buf, len(picked), args.batches)
        fast = rate(ours, buf, len(picked), args.batches)
        for name, r in (
            ("pyroute2 nfct_msg", slow),
            ("cttrace ctnetlink, general path only", general),
            ("cttrace ctnetlink", fast),
        ):
            print(f"| {label} | {name} | {r:,.0f} | {1e6 / r:.2f} | {r / slow:.1f}x |")


if __name__ == "__main__":
    main()
