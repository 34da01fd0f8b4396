"""Userspace pipeline on one core: decode + correlate a synthetic ctnetlink stream.

Why it exists: every event the kernel filter lets through is decoded and fed to
the correlator on one thread; if that thread is slower than the node's
connection rate, the socket's buffer overflows and events are lost. This
measures what that thread sustains, and what each tracked entry costs.

The stream is what a busy node's NATed TCP traffic looks like through the
netlink source: ctnetlink messages byte-for-byte in the kernel's layout (the
recorded tests/unit/data/ctnetlink messages, with addresses, ports, ids and
states patched in), in read() batches, from clients that are pods of a 10k-pod
cluster to Service VIPs DNATed to their endpoints. Each ordinary connection is
NEW SYN_SENT, UPDATE SYN_RECV, ESTABLISHED, TIME_WAIT, then DESTROY (5 events:
the socket filter drops the FIN_WAIT and LAST_ACK updates in the kernel; the
kernel keeps TIME_WAIT 120 s, shortened to 5 s here so that the table reaches a
steady size within the stream). One connection in 1000
is answered only after 3.2 s (``late-establish``), and one in 10 of those goes
to an IP that changed pods meanwhile (``wrong-pod``), so rules really fire.

    .venv/bin/python -m bench.pipeline [--events 1000000] [--runs 3]
"""

from __future__ import annotations

import argparse
import gc
import heapq
import json
import os
import random
import statistics
import struct
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench import bench_identity as ident
from cttrace.correlator import Correlator
from cttrace.events import CtEvent, CtStatus, TcpState
from cttrace.identity.index import IdentityIndex
from cttrace.runtime import tune_gc
from cttrace.sources.ctnetlink import MSG_CT_DELETE, MSG_CT_NEW, decode_messages

ROOT = Path(__file__).resolve().parent.parent
RECORDED = ROOT / "tests/unit/data/ctnetlink/messages.jsonl"

PODS = 10_000
FLOWS_PER_S = 10_000.0  # simulated connection rate (sets how many entries are live at once)
BATCH = 256  # messages per read(): what one recv loop of the netlink source hands over
T0 = 2000.0  # the stream starts here; the cluster exists from t=1000 (bench_identity)
TICK_S = 0.1  # the runtime calls Correlator.tick this often

_NEW_FLAGS = 0x600  # NLM_F_CREATE | NLM_F_EXCL, as the kernel sends a NEW event
_CONFIRMED_DNAT = int(CtStatus.CONFIRMED | CtStatus.DST_NAT | CtStatus.DST_NAT_DONE
                      | CtStatus.SRC_NAT_DONE)
_REPLIED = _CONFIRMED_DNAT | int(CtStatus.SEEN_REPLY)
_ASSURED = _REPLIED | int(CtStatus.ASSURED)

#: (seconds after the SYN, message type, TCP state, status) of an ordinary connection.
LIFECYCLE: tuple[tuple[float, int, int, int], ...] = (
    (0.0, MSG_CT_NEW, TcpState.SYN_SENT, _CONFIRMED_DNAT),
    (0.0003, MSG_CT_NEW, TcpState.SYN_RECV, _REPLIED),
    (0.0006, MSG_CT_NEW, TcpState.ESTABLISHED, _ASSURED),
    (0.0206, MSG_CT_NEW, TcpState.TIME_WAIT, _ASSURED),
    (5.0206, MSG_CT_DELETE, TcpState.TIME_WAIT, _ASSURED),
)
LATE_REPLY_S = 3.2
LATE_EVERY = 1000  # one connection in this many is answered late
WRONG_POD_EVERY = 10  # one late connection in this many reaches a recycled IP


def _template() -> bytes:
    """A recorded IPv4 DNAT NEW event (196 bytes): the layout every message here reuses."""
    for line in RECORDED.read_text().splitlines():
        rec = json.loads(line)
        if rec["phase"] == "tcp4-dnat" and rec["group"] == "NEW":
            data = bytes.fromhex(rec["hex"])
            if len(data) == 196:
                return data
    raise SystemExit(f"no 196-byte tcp4-dnat NEW message in {RECORDED}")


TEMPLATE = _template()
# Offsets in TEMPLATE (nlmsghdr 16, nfgenmsg 4, then CTA_TUPLE_ORIG, CTA_TUPLE_REPLY,
# CTA_ID, CTA_STATUS, CTA_TIMEOUT, CTA_PROTOINFO); checked by check_encoder().
_TYPE, _FLAGS = 4, 6
_O_SRC, _O_DST, _O_SPORT, _O_DPORT = 32, 40, 60, 68
_R_SRC, _R_DST, _R_SPORT, _R_DPORT = 84, 92, 112, 120
_ID, _STATUS, _STATE = 128, 136, 160
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_HDR = struct.Struct("=HH")


def encode(mtype: int, flags: int, entry_id: int, client: bytes, sport: int, vip: bytes,
           dport: int, pod: bytes, pport: int, state: int, status: int) -> bytes:
    """One ctnetlink event message as the kernel would send it."""
    buf = bytearray(TEMPLATE)
    _HDR.pack_into(buf, _TYPE, mtype, flags)
    buf[_O_SRC:_O_SRC + 4] = client
    buf[_O_DST:_O_DST + 4] = vip
    _U16.pack_into(buf, _O_SPORT, sport)
    _U16.pack_into(buf, _O_DPORT, dport)
    buf[_R_SRC:_R_SRC + 4] = pod
    buf[_R_DST:_R_DST + 4] = client
    _U16.pack_into(buf, _R_SPORT, pport)
    _U16.pack_into(buf, _R_DPORT, sport)
    _U32.pack_into(buf, _ID, entry_id)
    _U32.pack_into(buf, _STATUS, status)
    buf[_STATE] = state
    return bytes(buf)


def _ip(text: str) -> bytes:
    return bytes(int(x) for x in text.split("."))


def check_encoder() -> None:
    msg = encode(MSG_CT_NEW, _NEW_FLAGS, 77, _ip("10.0.0.5"), 40000, _ip("172.20.0.9"), 80,
                 _ip("10.0.0.90"), 8080, TcpState.SYN_SENT, _CONFIRMED_DNAT)
    (ev,) = decode_messages(msg, 1.0).events
    got = (ev.kind.name, ev.entry_id, tuple(ev.orig), tuple(ev.reply), ev.tcp_state, ev.status)
    want = ("NEW", 77, ("10.0.0.5", 40000, "172.20.0.9", 80),
            ("10.0.0.90", 8080, "10.0.0.5", 40000), 1, _CONFIRMED_DNAT)
    if got != want:
        raise SystemExit(f"bench encoder is off: {got} != {want}")


# -- the cluster and the stream ------------------------------------------------------------------


@dataclass(slots=True)
class Stream:
    batches: list[tuple[float, bytes]]  # (read time, messages laid end to end)
    events: int
    flows: int
    late: int
    wrong_pod: int


def cluster(pods: int, recycles: list[tuple[int, float]]) -> IdentityIndex:
    """bench_identity's cluster (10 pods per Service) plus IPs handed to new pods at given times."""
    index = IdentityIndex()
    for event, ts in ident.cluster_events(pods, random.Random(1)):
        index.apply(event, ts)
    for i, t in recycles:
        index.apply(ident.pod_event(i, 0, "DELETED"), t)
        index.apply(ident.pod_event(i, 7), t)  # a new uid, not in the Service's slice
    return index


Flows = list[tuple[int, int, int, float]]


def plan(events: int, seed: int = 7) -> tuple[Flows, list[tuple[int, float]]]:
    """Flows as (client pod, service, endpoint pod, SYN time); the IP recycles wrong-pod needs."""
    rng = random.Random(seed)
    services = PODS // ident.PODS_PER_SERVICE
    n_flows = events // len(LIFECYCLE) + 1
    flows, recycles = [], []
    for f in range(n_flows):
        s = rng.randrange(services)
        target = s * ident.PODS_PER_SERVICE + rng.randrange(ident.PODS_PER_SERVICE)
        t = T0 + f / FLOWS_PER_S
        flows.append((rng.randrange(PODS), s, target, t))
        if f % LATE_EVERY == LATE_EVERY - 1 and (f // LATE_EVERY) % WRONG_POD_EVERY == 0:
            recycles.append((target, t + 1.0))
    return flows, recycles


def build_stream(events: int) -> tuple[Stream, IdentityIndex]:
    flows, recycles = plan(events)
    recycled = {t for t, _ in recycles}
    index = cluster(PODS, recycles)
    heap: list[tuple[float, int, bytes]] = []
    seq = 0
    batches: list[tuple[float, bytes]] = []
    pending: list[bytes] = []
    emitted = late = wrong = 0
    sport = 1024

    def flush_until(t: float) -> None:
        nonlocal emitted
        while heap and heap[0][0] <= t and emitted < events:
            ts, _, msg = heapq.heappop(heap)
            pending.append(msg)
            emitted += 1
            if len(pending) == BATCH:
                batches.append((ts, b"".join(pending)))
                pending.clear()

    for f, (client, s, target, t) in enumerate(flows):
        flush_until(t)
        if emitted >= events:
            break
        sport = sport + 1 if sport < 65535 else 1024
        is_late = f % LATE_EVERY == LATE_EVERY - 1
        late += is_late
        wrong += is_late and target in recycled
        cip, vip, pip = _ip(ident.pod_ip(client)), _ip(ident.vip(s)), _ip(ident.pod_ip(target))
        for k, (off, mtype, state, status) in enumerate(LIFECYCLE):
            if is_late and k > 0:
                off += LATE_REPLY_S
            flags = _NEW_FLAGS if k == 0 else 0
            msg = encode(mtype, flags, f + 1, cip, sport, vip, 80, pip, 8080, state, status)
            seq += 1
            heapq.heappush(heap, (t + off, seq, msg))
    flush_until(float("inf"))
    if pending:
        batches.append((batches[-1][0] if batches else T0, b"".join(pending)))
    return Stream(batches, emitted, len(flows), late, wrong), index


# -- measurements --------------------------------------------------------------------------------


@dataclass(slots=True)
class RunResult:
    seconds: float
    decode_s: float
    correlate_s: float
    events: int
    findings: Counter[str]
    tracked_max: int
    gc_s: float = 0.0  # of ``seconds``, in the cyclic GC (triggered in decode or correlate)


def run_once(stream: Stream, index: IdentityIndex) -> RunResult:
    corr = Correlator(identity=index)
    findings: Counter[str] = Counter()
    decode_s = corr_s = 0.0
    n = 0
    tracked_max = 0
    next_tick = T0
    clock = time.perf_counter
    gc_s = 0.0
    gc_start = 0.0

    def gc_time(phase: str, info: dict[str, int]) -> None:
        nonlocal gc_s, gc_start
        if phase == "start":
            gc_start = clock()
        else:
            gc_s += clock() - gc_start

    gc.collect()
    gc.callbacks.append(gc_time)
    start = clock()
    for ts, buf in stream.batches:
        a = clock()
        evs = decode_messages(buf, ts).events
        b = clock()
        feed = corr.feed
        for ev in evs:
            for fnd in feed(ev, ts):
                findings[fnd.rule] += 1
        if ts >= next_tick:
            for fnd in corr.tick(ts):
                findings[fnd.rule] += 1
            next_tick = ts + TICK_S
            tracked_max = max(tracked_max, len(corr.entries))
        c = clock()
        decode_s += b - a
        corr_s += c - b
        n += len(evs)
    for fnd in corr.tick(stream.batches[-1][0] + 10.0):
        findings[fnd.rule] += 1
    total = clock() - start
    gc.callbacks.remove(gc_time)
    return RunResult(total, decode_s, corr_s, n, findings, tracked_max, gc_s)


def per_entry_bytes(index: IdentityIndex, entries: int = 20_000) -> dict[str, float]:
    """Retained bytes per tracked entry (tracemalloc), for unreplied and established entries.

    The events come from the decoder, so each entry holds the strings and ints the
    decoder made, as in production.
    """
    out = {}
    rng = random.Random(3)
    services = PODS // ident.PODS_PER_SERVICE
    for label, states in (("established", 3), ("unreplied (SYN_SENT)", 1)):
        bufs = []
        for f in range(entries):
            s = rng.randrange(services)
            target = s * ident.PODS_PER_SERVICE + rng.randrange(ident.PODS_PER_SERVICE)
            args = (f + 1, _ip(ident.pod_ip(rng.randrange(PODS))), 1024 + f % 64000,
                    _ip(ident.vip(s)), 80, _ip(ident.pod_ip(target)), 8080)
            for k in range(states if states == 1 else 3):
                _, mtype, state, status = LIFECYCLE[k]
                bufs.append(encode(mtype, _NEW_FLAGS if k == 0 else 0, *args, state, status))
        corr = Correlator(identity=index)
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        t = T0
        for i in range(0, len(bufs), BATCH):
            evs = decode_messages(b"".join(bufs[i:i + BATCH]), t)
            for ev in evs.events:
                corr.feed(ev, t)
            del evs
        corr.tick(t)
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        assert len(corr.entries) == entries, len(corr.entries)
        out[label] = used / entries
        del corr, bufs
    return out


def jsonl_flows_rate(stream: Stream, limit: int = 100_000) -> float:
    """``--flows`` JSON lines: events/s the sink encodes and writes (to /dev/null)."""
    from cttrace.sinks.jsonl import JsonLinesSink

    evs: list[CtEvent] = []
    for ts, buf in stream.batches:
        evs.extend(e for e in decode_messages(buf, ts).events if isinstance(e, CtEvent))
        if len(evs) >= limit:
            break
    with open(os.devnull, "wb") as out:
        sink = JsonLinesSink(out, flows=True)
        start = time.perf_counter()
        for ev in evs:
            sink.event(ev)
        return len(evs) / (time.perf_counter() - start)


def pin_one_core() -> int | None:
    """Run on one CPU (the last one) so that rates are per core."""
    try:
        cpu = max(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return cpu
    except (AttributeError, OSError):
        return None


@dataclass(slots=True)
class PipelineResult:
    events: int
    flows: int
    runs: list[RunResult]
    per_entry: dict[str, float]
    jsonl_rate: float
    cpu: int | None

    def median(self, attr: str) -> float:
        return float(statistics.median(self.events / float(getattr(r, attr)) for r in self.runs))


def measure(events: int = 1_000_000, runs: int = 3) -> PipelineResult:
    check_encoder()
    tune_gc()  # what cttrace's event loop does at start (cttrace.runtime.tune_gc)
    allowed = os.sched_getaffinity(0)
    cpu = pin_one_core()
    try:
        stream, index = build_stream(events)
        results = [run_once(stream, index) for _ in range(runs)]
        per_entry = per_entry_bytes(index)
        jrate = jsonl_flows_rate(stream)
    finally:
        os.sched_setaffinity(0, allowed)
    return PipelineResult(stream.events, stream.flows, results, per_entry, jrate, cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    opts = parser.parse_args()
    res = measure(opts.events, opts.runs)
    print(f"{res.events:,} events ({res.flows:,} connections) on cpu {res.cpu}")
    for r in res.runs:
        print(f"  {r.events / r.seconds:,.0f} ev/s total, decode {r.events / r.decode_s:,.0f}, "
              f"correlate {r.events / r.correlate_s:,.0f}; {1e6 * r.seconds / r.events:.2f} "
              f"us/event, of which GC {1e6 * r.gc_s / r.events:.2f}; tracked max "
              f"{r.tracked_max:,}; findings {dict(r.findings)}")
    print(f"median decode+correlate {res.median('seconds'):,.0f} events/s")
    print(f"bytes per tracked entry: {res.per_entry}")
    print(f"--flows JSON lines: {res.jsonl_rate:,.0f} events/s")


if __name__ == "__main__":
    main()
