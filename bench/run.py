"""``make bench``: run every benchmark, write bench/RESULTS.md and the README's results table.

    .venv/bin/python -m bench.run [--quick] [--skip-lab] [--skip-vm] [--no-readme]
                                  [--only SECTION ...]

What runs (the goals are in docs/DESIGN.md), each measured side by side in one run where there is a
comparison, and quoted as medians:

1. userspace pipeline (bench/pipeline.py): decode + correlate 1M synthetic
   ctnetlink events on one core; bytes per tracked entry; the ``--flows`` JSON sink;
2. identity index (bench/bench_identity.py): bytes per pod at 10k and 100k pods;
3. decoder (bench/bench_decode.py): the hand-written ctnetlink decoder vs pyroute2's;
4. lab storms (bench/storm.py, root): cttrace's netlink source vs ``conntrack -E``
   on the same storm at increasing rates: events delivered vs lost, CPU;
5. detection latency (bench/storm.py): first reply -> finding -> Alertmanager;
6. the bpf source's overhead (bench/bpf_overhead.py): one boot of each of the VM tier's kernels
   under emulation, lab connection rate with the probes attached / without,
   alternating rounds; records emitted and filtered in the kernel.

``--only`` runs just the named sections and leaves RESULTS.md and README.md alone
(the partial RESULTS.md goes to the work directory).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import bench_decode, bench_identity, bpf_overhead, pipeline, storm

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
README = ROOT / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
SECTIONS = ("pipeline", "identity", "decoder", "lab", "bpf")


def log(text: str) -> None:
    print(text, flush=True)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    return (f"{cpu}, {os.cpu_count()} cores; kernel {platform.release()}; "
            f"Python {platform.python_version()}; {when}; commit {commit}")


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


# -- sections -------------------------------------------------------------------------------------


def decoder_rates(runs: int) -> list[tuple[str, float, float]]:
    """(messages, pyroute2 msgs/s, cttrace msgs/s): medians of ``runs`` timings."""
    out = []
    for label, relevant in (("all recorded", False), ("NATed TCP only", True)):
        datagrams = bench_decode.load(relevant)
        buf = b"".join(datagrams[i % len(datagrams)] for i in range(1000))
        if bench_decode.ours(buf, 1.0) != bench_decode.pyroute2_decode(buf, 1.0):
            raise SystemExit("decoders disagree on the recorded messages")
        rates = []
        for fn, batches in ((bench_decode.pyroute2_decode, 2), (bench_decode.ours, 20)):
            samples = []
            for _ in range(runs):
                t = time.perf_counter()
                for _ in range(batches):
                    fn(buf, 1.0)
                samples.append(1000 * batches / (time.perf_counter() - t))
            rates.append(statistics.median(samples))
        out.append((label, rates[0], rates[1]))
    return out


def identity_rows(sizes: list[int]) -> list[tuple[int, float, float]]:
    """(pods, bytes/pod retained, apply events/s)."""
    rows = []
    for pods in sizes:
        per_pod = bench_identity.retained_bytes(pods) / pods
        _, apply_rate = bench_identity.build(pods)
        rows.append((pods, per_pod, apply_rate))
    return rows


def can_run_lab() -> str | None:
    """Why the lab storms cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "iptables", "conntrack"):
        if not any(Path(d, tool).exists() for d in os.environ.get("PATH", "").split(":")):
            return f"`{tool}` is not installed"
    return None


# -- report ---------------------------------------------------------------------------------------


def render(info: str, sections: dict[str, object], cmd: str) -> tuple[str, str]:
    """(RESULTS.md text, the README's table)."""
    goals: list[tuple[str, str, str, str]] = []
    body: list[str] = []
    p = sections.get("pipeline")
    if isinstance(p, pipeline.PipelineResult):
        rate = p.median("seconds")
        dec, cor = p.median("decode_s"), p.median("correlate_s")
        est = p.per_entry["established"]
        goals.append(("pipeline: decode + correlate, one core", "≥ 500,000 events/s",
                      f"{_n(rate)} events/s", _verdict(rate >= 500_000)))
        goals.append(("correlator memory per tracked entry", "≤ 300 B",
                      f"{_n(est)} B (established), {_n(p.per_entry['unreplied (SYN_SENT)'])} B "
                      f"(unreplied)", _verdict(est <= 300)))
        r0 = p.runs[0]
        body += [
            "## Userspace pipeline (one core)", "",
            f"{p.events:,} ctnetlink events ({p.flows:,} connections of "
            f"{len(pipeline.LIFECYCLE)} events; 1 in "
            f"{pipeline.LATE_EVERY} answered late, 1 in {pipeline.WRONG_POD_EVERY} of those by a "
            f"recycled IP) in read() batches of {pipeline.BATCH}, through `decode_messages` and "
            f"`Correlator.feed`/`tick` with a {pipeline.PODS:,}-pod identity index; pinned to "
            f"CPU {p.cpu}; median of {len(p.runs)} runs. Findings per run: "
            + ", ".join(f"{k} {v}" for k, v in sorted(r0.findings.items())) + "; "
            f"tracked entries peak {r0.tracked_max:,}.", "",
            "| stage | events/s (median) | µs/event |", "|---|---:|---:|",
            f"| decode | {_n(dec)} | {1e6 / dec:.2f} |",
            f"| correlate | {_n(cor)} | {1e6 / cor:.2f} |",
            f"| decode + correlate | {_n(rate)} | {1e6 / rate:.2f} |",
            f"| `--flows` JSON lines sink (extra, when on) | {_n(p.jsonl_rate)} | "
            f"{1e6 / p.jsonl_rate:.2f} |", "",
            "Bytes retained per tracked entry (tracemalloc, 20,000 entries decoded from "
            "ctnetlink bytes, so the strings and ints the decoder made are counted): "
            + ", ".join(f"{k} {_n(v)} B" for k, v in p.per_entry.items()) + ".", "",
        ]
    ident = sections.get("identity")
    if isinstance(ident, list):
        body += ["## Identity index", "",
                 "bench_identity's cluster: 10 pods per Service and EndpointSlice, 10% of IPs "
                 "recycled. Bytes retained per pod (tracemalloc), including its share of "
                 "Services and slices.", "",
                 "| pods | bytes/pod | apply events/s |", "|---:|---:|---:|"]
        body += [f"| {pods:,} | {_n(b)} | {_n(r)} |" for pods, b, r in ident]
        body.append("")
        for pods, b, _ in ident:
            goals.append((f"identity index at {pods:,} pods", "(reported)",
                          f"{_n(b)} B/pod, {b * pods / 2**20:,.0f} MiB", "n/a"))
    dec_rows = sections.get("decoder")
    if isinstance(dec_rows, list):
        body += ["## Decoder: hand-written vs pyroute2", "",
                 "The same 1,000 recorded kernel messages in one buffer, to the same list of "
                 "`CtEvent` (checked equal); median of runs.", "",
                 "| messages | pyroute2 msgs/s | cttrace msgs/s | ratio |", "|---|---:|---:|---:|"]
        body += [f"| {label} | {_n(a)} | {_n(b)} | {b / a:.1f}x |" for label, a, b in dec_rows]
        body.append("")
    lab = sections.get("lab")
    if isinstance(lab, storm.LabResult):
        body += ["## Netlink source vs `conntrack -E` under a connection storm", "",
                 "Both listen to the same lab node (network namespaces, kube-proxy-style DNAT "
                 "Service) during the same storm: a Python client opening connections to the "
                 "VIP at the requested rate (max: as fast as it goes, 50 in flight), each "
                 "answered and closed by the server. cttrace: the netlink source with its "
                 "socket filter and 32 MiB buffer, the correlator and the runtime loop; "
                 "`conntrack -E`: all event groups, default buffer. Delivered = events "
                 "received / connections made (a few more NEW than connections: a source "
                 "port reused at once, whose old TIME_WAIT entry the kernel replaces); CPU = "
                 "the listener's user+sys seconds for the storm.", "",
                 "| requested conn/s | achieved conn/s | connections | cttrace NEW | "
                 "cttrace first reply | cttrace CPU s | `conntrack -E` NEW | "
                 "`conntrack -E` first reply | `conntrack -E` ENOBUFS | `conntrack -E` CPU s | "
                 "CPU ratio |",
                 "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in lab.steps:
            made = s.client["completed"] + s.client["failed"]
            c, a = s.cttrace, s.anchor

            def pct(x: int, total: int) -> str:
                return f"{x:,} ({100 * x / total:.1f}%)" if total else str(x)

            ratio = c["cpu_s"] / a["cpu_s"] if a["cpu_s"] else float("nan")
            body.append(
                f"| {'max' if s.target <= 0 else _n(s.target)} | {_n(s.client['rate'])} | "
                f"{made:,} | {pct(c['new'], made)} | {pct(c['replied'], s.connections)} | "
                f"{c['cpu_s']:.2f} | {pct(a['new'], made)} | {pct(a['replied'], s.connections)}"
                f" | {a['enobufs']} | {a['cpu_s']:.2f} | {ratio:.2f} |")
        body.append("")
        lossy = [s for s in lab.steps if s.anchor["new"] < s.client["completed"]]
        if lossy:
            s = lossy[-1]  # the fastest storm where the anchor lost events
            made = s.client["completed"] + s.client["failed"]
            ok = s.cttrace["new"] >= made and s.cttrace["replied"] >= s.connections
            goals.append(("netlink source: no lost NEW/first reply where `conntrack -E` loses",
                          "0 lost", f"lost {max(0, made - s.cttrace['new']):,} NEW, "
                          f"{max(0, s.connections - s.cttrace['replied']):,} replies at "
                          f"{_n(s.client['rate'])} conn/s (`conntrack -E` lost "
                          f"{made - s.anchor['new']:,} NEW)", _verdict(ok)))
        else:
            goals.append(("netlink source: no lost NEW/first reply where `conntrack -E` loses",
                          "0 lost", "`conntrack -E` lost nothing at the rates reached", "n/a"))
        top = max(lab.steps, key=lambda s: s.client["rate"]) if lab.steps else None
        if top is not None and top.anchor["cpu_s"]:
            ratio = top.cttrace["cpu_s"] / top.anchor["cpu_s"]
            goals.append(("netlink source CPU ÷ `conntrack -E` CPU, same storm", "≤ 0.5",
                          f"{ratio:.2f} at {_n(top.client['rate'])} conn/s",
                          _verdict(ratio <= 0.5)))
        fin, al = lab.latency_finding_ms, lab.latency_alert_ms
        if fin:
            body += ["## Detection latency", "",
                     f"{lab.latency_connections} connections to a pod that drops each first SYN "
                     "(answered on the retransmit, ~1 s later: a `late-establish` finding with "
                     "`--late-after 0.5`), netlink source, real Alertmanager (Debian's). From "
                     "the client's `connect()` completing (the SYN-ACK crossed the node's "
                     "conntrack one veth hop before) to the finding, and to the alert first "
                     "listed by Alertmanager's API (polled every 10 ms). A negative time: the "
                     "listener decided before the client process woke up.", "",
                     "| to | samples | p50 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|",
                     f"| finding | {len(fin)} | {storm.median(fin):.1f} | "
                     f"{storm.percentile(fin, 99):.1f} | {max(fin):.1f} |",
                     f"| Alertmanager | {len(al)} | {storm.median(al):.1f} | "
                     f"{storm.percentile(al, 99):.1f} | {max(al) if al else float('nan'):.1f} |",
                     ""]
            p99f = storm.percentile(fin, 99)
            goals.append(("latency p99, first reply → finding", "≤ 10 ms", f"{p99f:.1f} ms",
                          _verdict(p99f <= 10)))
            if al:
                p99a = storm.percentile(al, 99)
                goals.append(("latency p99, first reply → Alertmanager", "≤ 1,000 ms",
                              f"{p99a:.1f} ms", _verdict(p99a <= 1000)))
    elif isinstance(lab, str):
        body += ["## Lab storms and latency", "", f"Not run: {lab}.", ""]
        goals.append(("netlink source under a storm; latency", "see docs/DESIGN.md",
                      f"not run: {lab}", "n/a"))
    bpf_runs = sections.get("bpf")
    hits: list[str] = []
    for kernel, bpf in (bpf_runs.items() if isinstance(bpf_runs, dict) else [("", bpf_runs)]):
        bpf_goals, bpf_body = _bpf_section(bpf, kernel)
        goals += bpf_goals
        body += bpf_body
        if isinstance(bpf, bpf_overhead.BpfOverhead):
            hits += ["", *_probe_hits(bpf, bpf.rounds_of("with") + bpf.rounds_of("probes-only"))]
            hits += _kprobe_variant(bpf)[1]

    table = ["| what | goal | measured | |", "|---|---|---|---|"]
    table += [f"| {w} | {g} | {m} | {v} |" for w, g, m, v in goals]
    head = [f"Machine: {info}.", "", f"Reproduce: `{cmd}` (as root; {_elapsed(sections)}).", ""]
    readme = "\n".join(head + table + hits)
    results = "\n".join(["# Benchmark results", "",
                         "Written by `make bench` (bench/run.py); do not edit by hand.", "",
                         *head, "## Goals", "", *table, "", *body])
    return results + "\n", readme + "\n"


_KINDS = (("CtEvent.NEW", "conntrack NEW"), ("CtEvent.UPDATE", "conntrack UPDATE"),
          ("CtEvent.DESTROY", "conntrack DESTROY"), ("SockConnect", "connect"),
          ("TcpReset", "reset"))


def _bpf_section(bpf: object,
                 kernel: str) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """The goal rows and the RESULTS.md section for the bpf source's overhead on the VM
    tier's kernel ``kernel`` (its name; "" when none was booted)."""
    on = f" on {bpf.kernel if isinstance(bpf, bpf_overhead.BpfOverhead) else kernel}" \
        if kernel else ""
    what, goal = f"bpf source{on}: conn rate with probes ÷ without", "≥ 0.97"
    if not isinstance(bpf, bpf_overhead.BpfOverhead):
        why = bpf if isinstance(bpf, str) else "not run"
        return ([(what, goal, f"not measured: {why}", "n/a")],
                [f"## bpf source overhead{on} (VM tier)", "", f"Not measured: {why}.", ""])
    withs, only = bpf.rounds_of("with"), bpf.rounds_of("probes-only")
    attached = withs + only
    rate_off = statistics.median(r["rate"] for r in bpf.rounds_of("without"))
    rate_on = statistics.median(r["rate"] for r in withs)
    per = bpf.per_connection(attached)
    direct = bpf.per_connection([bpf.direct])
    emitted = sum(v for k, v in per.items() if not k.startswith("kernel.") and k != "Lost")
    ratio = bpf.ratio_median
    only_ratio = statistics.median(bpf.probes_only_ratios)
    lost = sum(r["kernel"]["lost"] for r in attached)
    filtered = per.get("kernel.filtered_entries", 0) + per.get("kernel.filtered_transitions", 0)
    measured = (f"{ratio:.3f} under TCG emulation ({_n(rate_off)} → {_n(rate_on)} conn/s; "
                f"probes alone, reader held: {only_ratio:.2f})")
    conns = sum(r["completed"] + r["failed"] for r in attached)
    records = (f"{emitted:.3f} ({sum(sum(r['delivered'].values()) for r in attached):,} "
               f"records for {conns:,} connections through the Service; {filtered:.1f} "
               f"filtered in the kernel per connection; {_n(lost)} lost)")
    cpu_10k = _cpu_per_10k(bpf, withs)
    kprobe_goal, kprobe_body = _kprobe_variant(bpf)
    goals = [(what, goal, measured, _verdict(ratio >= 0.97)), *kprobe_goal,
             (f"bpf source{on}: records to userspace per healthy connection", "≤ 0.01",
              records, _verdict(emitted <= 0.01)),
             (f"agent CPU s per 10,000 connections{on}: bpf / netlink / `conntrack -E`",
              "(reported)", " / ".join(cpu_10k) + " (the same storm, one boot)", "n/a")]
    body = [
        f"## bpf source overhead on {bpf.kernel} (VM tier, TCG emulation)", "",
        f"This machine's kernel has no kprobes, so this runs in the VM tier's guest: Debian's "
        f"{bpf.kernel} booted once by virtme-ng with TCG emulation ({bpf.cpus} vCPUs on this "
        "machine's cores, which other work shares), on this machine's root filesystem "
        "(bench/bpf_overhead.py). A lab node in the guest, bench/storm.py's client and web "
        "pods behind a kube-proxy-style DNAT Service; the storm client opens connections to "
        "the VIP as fast as it goes (50 in flight), each answered and closed by the server. "
        "The bpf source is compiled once (the programs `cttrace watch --source bpf --netns "
        f"<node>` loads; {bpf.compile_and_attach_s:.0f} s to compile and attach) and its "
        "probes are detached and attached again between rounds without recompiling; while "
        "attached, the correlator and the runtime loop drain its ring buffer in the same guest, "
        "as `watch` does. Rounds alternate without / with probes, starting and ending "
        f"without ({bpf.connections_per_round:,} connections each, sized to "
        f"~{bpf.round_seconds:g} s); each round with probes is divided by the mean of the two "
        "without-rounds beside it, so a slow drift of the machine cancels, and the median of "
        "those ratios is the result. Rounds with probes are of two kinds, taking turns: "
        "*with* (the reader drains the ring buffer during the storm, as `watch` does: the "
        "goal's figure) and *probes only* (the reader is held until the storm is over, its "
        "records waiting in the ring buffer: what the kernel side alone costs; "
        f"{bpf_overhead.PROBES_ONLY_MAX:,} connections, so that they fit, between two "
        "*without short* rounds of the same size). The node's "
        "TIME_WAIT timeout is 1 s and the table is flushed before and after each round, so "
        "every entry's whole life (and the delete probe) falls inside its round.", "",
        "**Measured under emulation, not on hardware.** TCG translates every guest "
        "instruction, so absolute rates are a small fraction of a real CPU's (the same storm "
        "client reaches thousands of connections/s on this machine's own kernel), and it does "
        "not slow all code alike: indirect jumps and calls, which the probes' path is made of "
        "(ftrace trampolines, BPF helper calls, the kretprobe return hook), cost an emulator "
        "far more than a CPU, so the per-packet cost of the probes is inflated relative to "
        "real hardware. And the userspace reader (Python) takes its CPU from the storm's own "
        "Python client and server on the same two emulated CPUs, one for one, where a real "
        "node has cores to spare. The ratio is what this emulated guest shows; it is the "
        "figure to compare between versions of the programs and the reader, measured the same "
        "way, not a prediction for a node.", "",
        "| round | probes | connections | seconds | conn/s | ratio to neighbours | reader CPU s "
        "| reader wake-ups |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = {"with": iter(bpf.ratios), "probes-only": iter(bpf.probes_only_ratios)}
    for i, r in enumerate(bpf.rounds):
        mode = r["mode"]
        row = (f"| {i} | {mode.replace('-', ' ')} | {r['completed'] + r['failed']:,} | "
               f"{r['seconds']:.2f} | {_n(r['rate'])} |")
        if mode in ratios:
            row += f" {next(ratios[mode]):.3f} | {r['reader_cpu_s']:.2f} | {r['reads']:,} |"
        else:
            row += " | | |"
        body.append(row)
    body += [
        "", f"Median ratio, with: **{ratio:.3f}** ("
        + ", ".join(f"{x:.3f}" for x in bpf.ratios) + f"); probes only: **{only_ratio:.3f}** ("
        + ", ".join(f"{x:.3f}" for x in bpf.probes_only_ratios) + "). Reader CPU is the "
        "guest process's CPU time from attach to detach (for probes only, the drain after "
        f"the storm). Guest up {bpf.guest_up_s:.0f} s "
        f"after boot; the guest's work took {bpf.guest_s:.0f} s, the VM {bpf.wall_s:.0f} s in "
        "all. The host's 1-minute load average was "
        + " and ".join(f"{x:.1f}" for x in bpf.host_load) + " when the VM started and "
        "finished (2 cores: above ~2, other work competed with the guest and the rounds are "
        "noisier).", "",
        "What the kernel side did, per connection (rounds with probes summed; a record is emitted "
        "into the ring buffer and delivered to userspace, or lost; filtered = dropped in the "
        "kernel before any record is written: entries that are not translated (DNAT or IPVS) "
        "TCP of the node's namespace, and state changes no rule needs). The last column is "
        "one more storm with the probes attached, straight to the web pod's IP (no Service, "
        "no NAT): every entry is filtered in the kernel.", "",
        "| per connection | through the Service | straight to the pod IP |",
        "|---|---:|---:|",
    ]
    for key, label in _KINDS:
        body.append(f"| emitted: {label} | {per.get(key, 0):.2f} | {direct.get(key, 0):.2f} |")
    records = sum(sum(r["delivered"].values()) for r in withs)
    cpu = sum(r["reader_cpu_s"] for r in withs)
    read_s = sum(r["read_s"] for r in withs)
    storm_s = sum(r["seconds"] for r in withs) or 1.0
    direct_emitted = sum(v for k, v in direct.items()
                         if not k.startswith("kernel.") and k != "Lost")
    body += [
        f"| **emitted, all** | **{emitted:.2f}** | **{direct_emitted:.2f}** |",
        f"| filtered: entries | {per.get('kernel.filtered_entries', 0):.2f} | "
        f"{direct.get('kernel.filtered_entries', 0):.2f} |",
        f"| filtered: state changes | {per.get('kernel.filtered_transitions', 0):.2f} | "
        f"{direct.get('kernel.filtered_transitions', 0):.2f} |",
        f"| lost (ring buffer full, stash full) | {per.get('kernel.lost', 0):.3f} | "
        f"{direct.get('kernel.lost', 0):.3f} |",
        "", "The UPDATEs, by conntrack state change, per connection through the Service: "
        + ", ".join(f"{k.replace('->', ' → ')} {v:.2f}"
                    for k, v in bpf.transitions_per_connection(attached).items()) + ".",
        "", f"Totals over the rounds with probes: "
        f"{sum(r['completed'] for r in attached):,} connections; lost {lost:,}; kretprobe "
        f"misses {sum(r['kernel']['kretprobe_misses'] for r in attached):,} (returns the "
        "kernel did not report to a kretprobe); kprobe misses "
        f"{sum(r['kernel']['kprobe_misses'] for r in attached):,}"
        + (f"; trampoline misses {sum(r['kernel']['trampoline_misses'] for r in attached):,}"
           " (runs the kernel skipped)"
           if all("trampoline_misses" in r["kernel"] for r in attached) else "")
        + f". In the with-rounds the reader woke {sum(r['reads'] for r in withs):,} times for "
        f"{records:,} records and used {cpu:.1f} s CPU between attach and detach, which "
        f"enclose {storm_s:.1f} s of storm (and the drain after each), "
        + (f"{1e6 * cpu / records:.0f} µs per record, of which "
           f"{1e6 * read_s / records:.0f} µs inside `BpfSource.read()` (ring buffer consume, "
           "one ctypes callback per record, decode, loss check) and the rest in the "
           "correlator and the loop." if records else
           f"{read_s:.2f} s of it inside `BpfSource.read()` and the rest in the correlator "
           "and the loop, with no record to handle."), "",
    ]
    body += _probe_hits(bpf, attached)
    body += kprobe_body
    body += ["", "Agent CPU seconds per 10,000 connections through the Service, the same "
             "storm watched three ways in the same boot (bpf: the with-rounds' reader, "
             "correlator and loop; netlink: the netlink source, correlator and loop; "
             "`conntrack -E`: the tool, output discarded):", "",
             "| | bpf | netlink | conntrack -E |", "|---|---:|---:|---:|",
             "| agent CPU s per 10,000 connections | " + " | ".join(cpu_10k) + " |", ""]
    return goals, body


#: BPF program -> the kernel function (or tracepoint) it hooks.
_PROGRAM_HOOKS = {
    "ctt_confirm_fexit": "__nf_conntrack_confirm",
    "ctt_tcp_packet_fexit": "nf_conntrack_tcp_packet", "ctt_ct_delete_fentry": "nf_ct_delete",
    "ctt_confirm_enter": "__nf_conntrack_confirm", "ctt_confirm_return": "__nf_conntrack_confirm",
    "ctt_tcp_packet_enter": "nf_conntrack_tcp_packet",
    "ctt_tcp_packet_return": "nf_conntrack_tcp_packet",
    "ctt_ct_delete": "nf_ct_delete", "ctt_connect_enter": "tcp_connect",
    "kfunc__tcp_connect": "tcp_connect", "ctt_send_reset_enter": "tcp_v4_send_reset",
    "ctt_send_reset6_enter": "tcp_v6_send_reset",
    "tracepoint__tcp__tcp_receive_reset": "tcp:tcp_receive_reset",
    "tracepoint__tcp__tcp_send_reset": "tcp:tcp_send_reset",
}


def _probe_hits(bpf: bpf_overhead.BpfOverhead, attached: list[dict[str, Any]],
                hooks: dict[str, list[str]] | None = None, variant: str = "") -> list[str]:
    """Probe hits per connection by hook and attach mode, over the rounds with probes
    (``hooks``: how each function was hooked in them, by default ``bpf.hooks``)."""
    hooks = hooks if hooks is not None else bpf.hooks
    conns = sum(int(r["completed"]) + int(r["failed"]) for r in attached) or 1
    runs: Counter[str] = Counter()
    run_ns: Counter[str] = Counter()
    for r in attached:
        for name, (n, ns) in r.get("programs", {}).items():
            runs[name] += n
            run_ns[name] += ns
    body = [f"Probe hits per connection through the Service on {bpf.kernel}{variant}, by hook "
            "(the BPF "
            "programs' own run counts, `kernel.bpf_stats_enabled`, over the rounds with "
            "probes), and the time inside each program per run (not the kprobe or trampoline "
            "around it):", "",
            "| kernel function | attached as | why | BPF program | hits per connection "
            "| ns per hit (program) |", "|---|---|---|---|---:|---:|"]
    for name in sorted(runs, key=lambda k: (_PROGRAM_HOOKS.get(k, k), k)):
        hook = _PROGRAM_HOOKS.get(name, "?")
        mode, why = hooks.get(hook, ["tracepoint" if ":" in hook else "?", ""])
        per_run = run_ns[name] / runs[name] if runs[name] else 0.0
        body.append(f"| {hook} | {mode} | {why} | {name} | {runs[name] / conns:.2f} | "
                    f"{per_run:,.0f} |")
    return body


def _kprobe_variant(bpf: bpf_overhead.BpfOverhead
                    ) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """The goal row and the probe-hits table of the rounds with the conntrack hooks as
    kprobes (the fallback), when the guest ran them."""
    rounds = [r for r in bpf.kprobe_rounds if r["mode"] == "with-kprobes"]
    if not rounds or not bpf.kprobe_ratios:
        return [], []
    ratio = statistics.median(bpf.kprobe_ratios)
    off = statistics.median(r["rate"] for r in bpf.kprobe_rounds if r["mode"] == "without")
    on = statistics.median(r["rate"] for r in rounds)
    goal = (f"bpf source on {bpf.kernel}, conntrack hooks as kprobes (the fallback): conn "
            "rate with probes ÷ without", "(reported)",
            f"{ratio:.3f} under TCG emulation ({_n(off)} → {_n(on)} conn/s; "
            + ", ".join(f"{x:.3f}" for x in bpf.kprobe_ratios) + ")", "n/a")
    body = _probe_hits(bpf, rounds, bpf.hooks_kprobes,
                       " with the conntrack hooks as kprobes (the fallback; same storm, "
                       "same boot, same compiled programs)")
    return [goal], ["", *body]


def _cpu_per_10k(bpf: bpf_overhead.BpfOverhead,
                 withs: list[dict[str, Any]]) -> tuple[str, str, str]:
    """Agent CPU seconds per 10,000 connections: bpf (the with-rounds' reader), netlink,
    ``conntrack -E``, each measured on the same storm in the same boot."""
    def per_10k(cpu_s: float, n: int) -> str:
        return f"{1e4 * cpu_s / n:.2f}" if n else "n/a"

    def of(res: dict[str, Any]) -> str:
        if not res:
            return "n/a"
        return per_10k(float(res["agent_cpu_s"]),
                       int(res.get("completed", 0)) + int(res.get("failed", 0)))

    bpf_conns = sum(int(r["completed"]) + int(r["failed"]) for r in withs)
    return (per_10k(sum(float(r["reader_cpu_s"]) for r in withs), bpf_conns),
            of(bpf.netlink), of(bpf.conntrack_e))


def _elapsed(sections: dict[str, object]) -> str:
    return f"took {sections.get('elapsed', 0):.0f} s"


def update_readme(table: str) -> None:
    text = README.read_text()
    block = f"{START}\n{table}{END}"
    if START in text and END in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text,
                      flags=re.S)
    else:
        section = ("## Benchmarks\n\n"
                   "`make bench` (as root, several minutes) runs every benchmark in `bench/`:\n"
                   "the userspace pipeline, the identity index, the decoder, the netlink\n"
                   "source against `conntrack -E` under a lab connection storm, detection\n"
                   "latency to a real Alertmanager, and the bpf source's cost to a lab storm in\n"
                   "one boot of each VM tier kernel (emulated; `--skip-vm` leaves it out).\n"
                   "It writes [bench/RESULTS.md](bench/RESULTS.md) (every table, with how each\n"
                   "was measured) and the summary below.\n"
                   f"\n{block}\n\n")
        anchor = "## Layout"
        text = text.replace(anchor, section + anchor, 1) if anchor in text else \
            text.rstrip("\n") + "\n\n" + section
    README.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (a smoke test)")
    parser.add_argument("--skip-lab", action="store_true", help="no lab storms or latency")
    parser.add_argument("--skip-vm", action="store_true",
                        help="no VM boot: the bpf source's overhead is not measured")
    parser.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                        help=f"run only these sections ({', '.join(SECTIONS)}); leaves "
                        "RESULTS.md and README.md alone")
    parser.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cttrace-bench"))
    opts = parser.parse_args()
    quick = opts.quick
    start = time.monotonic()
    sections: dict[str, object] = {}
    steps: list[tuple[str, Callable[[], object]]] = [
        ("pipeline", lambda: pipeline.measure(100_000 if quick else 1_000_000, 3)),
        ("identity", lambda: identity_rows([1_000] if quick else [10_000, 100_000])),
        ("decoder", lambda: decoder_rates(3 if quick else 5)),
    ]
    reason = "--skip-lab given" if opts.skip_lab else can_run_lab()
    if reason is None:
        steps.append(("lab", lambda: storm.run_storms(
            [2000, 8000, 0] if quick else [2000, 4000, 6000, 0], 4.0,
            10_000 if quick else 40_000, latency_conns=40 if quick else 200,
            work=opts.work, log=log)))
    else:
        sections["lab"] = reason
    if opts.skip_vm:
        sections["bpf"] = "--skip-vm given"
    else:
        steps.append(("bpf", lambda: {kernel: bpf_overhead.run_in_vm(
            opts.work, kernel=kernel, pairs=2 if quick else 3, seconds=3.0 if quick else 5.0,
            log=log) for kernel in bpf_overhead.vm_kernels()}))
    if opts.only:
        steps = [(name, fn) for name, fn in steps if name in opts.only]
        for name in SECTIONS:
            if name not in opts.only:
                sections.pop(name, None)
    opts.work.mkdir(parents=True, exist_ok=True)
    for name, fn in steps:
        log(f"bench: {name} ...")
        t = time.monotonic()
        sections[name] = fn()
        log(f"bench: {name} done in {time.monotonic() - t:.0f} s")
    sections["elapsed"] = time.monotonic() - start
    assert not tracemalloc.is_tracing()
    results, table = render(machine(), sections, "make bench")
    if opts.only:
        partial = opts.work / "RESULTS-partial.md"
        partial.write_text(results)
        log(f"bench: --only given: wrote {partial}, left RESULTS.md and README.md alone")
        sys.stdout.write(table)
        return
    RESULTS.write_text(results)
    log(f"bench: wrote {RESULTS.relative_to(ROOT)}")
    if not opts.no_readme:
        update_readme(table)
        log("bench: updated README.md's Benchmarks table")
    sys.stdout.write(table)


if __name__ == "__main__":
    main()
