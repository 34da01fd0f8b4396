"""What the bpf source costs the traffic it watches: lab connection rate with its probes ÷ without.

This machine's kernel has no kprobes, so this runs in the VM tier's guest:
one of Debian's kernels the VM tier names (6.1, 6.12) booted once under
virtme-ng with TCG emulation
(tests/vm/run_vm_tier.py boots it; the guest sees this repository and its
venv). Host side, :func:`run_in_vm` boots it and reads the result the guest
left in the shared directory; guest side (``python -m bench.bpf_overhead
guest --out DIR``), :func:`measure`:

* a lab node (:class:`cttrace.lab.Lab`) with bench/storm.py's client and web
  pods behind a kube-proxy-style DNAT Service, the storm client opening
  connections to the VIP as fast as it goes (50 in flight), each answered
  and closed by the server;
* the bpf source compiled once (``BpfSource(netns_ino=<node>)``: the programs
  ``cttrace watch --source bpf --netns <node>`` loads), with the correlator
  and the runtime loop draining its buffer as ``watch`` does;
* rounds without and with the probes attached, alternating in the same boot
  (:meth:`BpfSource.detach` / :meth:`~BpfSource.attach`: no recompile),
  starting and ending without, so that each round with probes sits between
  two without and a slow drift of the machine cancels; the ratio of each
  with-round to the mean of its two neighbours, and their median. Rounds
  with probes come in two kinds: ``with`` (the reader drains the ring buffer
  during the storm, as ``watch`` does: the headline figure) and
  ``probes-only`` (the reader is held until the storm is over, so the round
  pays only for the kernel side: probes, maps, ring buffer writes; shorter,
  so that its records fit in the ring buffer, and between two rounds without
  probes of the same size);
* the source's kernel-side counts per with-round: records emitted (and
  delivered to userspace, by kind), entries kept and reported, entries and
  state changes filtered in the kernel, records lost, kretprobe misses, and
  each BPF program's runs (``kernel.bpf_stats_enabled``: probe hits by hook);
  then rounds with the conntrack hooks switched to their kprobe variant (what
  a kernel without BTF, or an agent without CAP_SYS_ADMIN, runs), between
  rounds without, for the same figures;
  one more storm straight to the pod's IP (no NAT), where the kernel filters
  every entry; and one storm each watched by the netlink source and by
  ``conntrack -E`` instead, for their CPU seconds.

Each connection's whole conntrack life happens inside its round: the node's
TIME_WAIT timeout is set to 1 s and the table is flushed before and after
each round, so the destroy of every entry (and its probe) is part of what is
measured rather than left for the next round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULT_NAME = "bpf_overhead.json"
#: Modules the probes need loaded before attaching (as tests/vm/guest.sh).
MODULES = ("nf_conntrack", "nf_nat", "iptable_nat", "nf_conntrack_netlink", "veth",
           "br_netfilter")
#: Connections in a probes-only round at most, so that whatever records they send wait in the
#: ring buffer (256 pages: ~8,000 records) until it ends, even were each to send 6.
PROBES_ONLY_MAX = 1200
#: One boot: ~14-55 s boot, ~2-7 min BCC compile (longer while other work shares the host),
#: the rounds, the netlink and ``conntrack -E`` storms; killed after this.
VM_TIMEOUT_S = 1500.0


# -- guest side -----------------------------------------------------------------------------------


class _CountingSource:
    """The bpf source as the runtime loop sees it, counting what :meth:`read` delivered by kind."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.name = source.name
        self.kinds: Counter[str] = Counter()
        self.transitions: Counter[str] = Counter()  # UPDATEs by old->new state
        self.reads = 0  # wake-ups of the loop with something to read
        self.read_s = 0.0  # inside BpfSource.read(): buffer consume, decode, counter check

    def open(self) -> None:
        self.source.open()

    def fileno(self) -> int:
        return int(self.source.fileno())

    def read(self) -> list[Any]:
        t = time.perf_counter()
        events = self.source.read()
        self.read_s += time.perf_counter() - t
        self.reads += 1
        for ev in events:
            kind = getattr(getattr(ev, "kind", None), "name", None)  # CtEvent: NEW, UPDATE...
            self.kinds[f"{type(ev).__name__}.{kind}" if kind else type(ev).__name__] += 1
            if kind == "UPDATE":
                self.transitions[f"{_state(ev.old_tcp_state)}->{_state(ev.tcp_state)}"] += 1
        return list(events)

    def stats(self) -> Any:
        return self.source.stats()

    def close(self) -> None:
        self.source.close()

    def delivered(self) -> int:
        return sum(n for k, n in self.kinds.items() if k != "Lost")


def _state(value: int | None) -> str:
    from cttrace.events import TcpState

    try:
        return TcpState(value).name
    except ValueError:
        return str(value)


class _NullSink:
    """The sinks' share of the work is not what is measured here."""

    def finding(self, finding: Any) -> None:
        pass

    def event(self, event: Any) -> None:
        pass

    def status(self, status: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _kernel_counts(stats: Any) -> dict[str, int]:
    extra = stats.extra
    return {"filtered_entries": stats.filtered,
            "filtered_transitions": extra.get("filtered_transitions", 0),
            "lost": stats.lost,
            "records_emitted": extra.get("records_emitted", 0),
            "entries_tracked": extra.get("entries_tracked", 0),
            "entries_reported": extra.get("entries_reported", 0),
            "kept_in_kernel": extra.get("kept_in_kernel", 0),
            "entry_map_evictions": extra.get("entry_map_evictions", 0),
            "kprobe_misses": extra.get("kprobe_misses", 0),
            "kretprobe_misses": extra.get("kretprobe_misses", 0),
            "trampoline_misses": extra.get("trampoline_misses", 0)}


#: Counters that start again with each attach (tracefs' counts of the probes it creates).
_PER_ATTACH = ("kprobe_misses", "kretprobe_misses")


class _Attached:
    """The probes attached from ``with`` to its end, and ``watch``'s loop draining them:
    from the start (``reader``), or only from :meth:`drain` on (what the probes alone cost
    the traffic, their records waiting in the ring buffer until the round is over)."""

    def __init__(self, source: _CountingSource, *, reader: bool = True) -> None:
        self.source = source
        self.reader = reader
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.counts: dict[str, Any] = {}

    def __enter__(self) -> _Attached:
        self.before = _kernel_counts(self.source.stats())
        self.kinds_before = Counter(self.source.kinds)
        self.transitions_before = Counter(self.source.transitions)
        self.reads0, self.read_s0 = self.source.reads, self.source.read_s
        self.cpu0 = _cpu_self()
        self.runs0 = self.source.source.program_runs()
        self.source.source.attach()
        if self.reader:
            self._start_reader()
        return self

    def _start_reader(self) -> None:
        from cttrace.correlator import Correlator
        from cttrace.runtime import Pipeline

        pipeline = Pipeline(self.source, Correlator(), [_NullSink()], status_s=10.0)
        self.thread = threading.Thread(target=pipeline.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def drain(self, quiet_s: float = 0.5, deadline_s: float = 60.0) -> None:
        """Wait until nothing was delivered for ``quiet_s``."""
        if self.thread is None:
            self._start_reader()
        end = time.monotonic() + deadline_s
        last, since = -1, time.monotonic()
        while time.monotonic() < end:
            now = sum(self.source.kinds.values())
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=30)
        misses = _kernel_counts(self.source.stats())  # tracefs' misses go with the probes
        runs = self.source.source.program_runs()
        self.source.source.detach()
        self.source.read()  # whatever was written before the probes came off
        after = _kernel_counts(self.source.stats())
        after["kprobe_misses"], after["kretprobe_misses"] = (misses["kprobe_misses"],
                                                             misses["kretprobe_misses"])
        kinds = Counter(self.source.kinds)
        kinds.subtract(self.kinds_before)
        transitions = Counter(self.source.transitions)
        transitions.subtract(self.transitions_before)
        self.counts = {
            "delivered": {k: n for k, n in sorted(kinds.items()) if n},
            "transitions": {k: n for k, n in sorted(transitions.items()) if n},
            # kprobe misses are the round's own probes' (created at attach); the other
            # counters, trampoline misses included, count from the load: this round's share.
            "kernel": {k: after[k] if k in _PER_ATTACH else after[k] - self.before[k]
                       for k in after},
            "reader_cpu_s": round(_cpu_self() - self.cpu0, 3),
            "reads": self.source.reads - self.reads0,
            "read_s": round(self.source.read_s - self.read_s0, 3),
            # Runs of each BPF program and their time in the program itself (not the
            # kprobe or trampoline around it), from kernel.bpf_stats_enabled.
            "programs": {name: [n - self.runs0.get(name, (0, 0))[0],
                                ns - self.runs0.get(name, (0, 0))[1]]
                         for name, (n, ns) in sorted(runs.items())},
        }


def _netlink_cpu(node: str, storm_round: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The netlink source (ctnetlink events in the node namespace) drained by the runtime
    loop and correlator during one storm round: this process's CPU seconds."""
    from cttrace.correlator import Correlator
    from cttrace.runtime import Pipeline
    from cttrace.sources.netlink import NetlinkSource

    source = NetlinkSource(netns=node)
    source.open()
    stop = threading.Event()
    pipeline = Pipeline(source, Correlator(), [_NullSink()], status_s=10.0)
    cpu0 = _cpu_self()
    thread = threading.Thread(target=pipeline.run, args=(stop,), daemon=True)
    thread.start()
    try:
        res = storm_round()
        _quiet(lambda: source.stats().events)
    finally:
        stop.set()
        thread.join(timeout=30)
        source.close()
    res["agent_cpu_s"] = round(_cpu_self() - cpu0, 3)
    res["events"] = source.stats().events
    return res


def _conntrack_cpu(node: str, storm_round: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``conntrack -E`` in the node namespace (output discarded) during one storm round:
    its CPU seconds, from wait4's rusage once it is stopped."""
    proc = subprocess.Popen(["ip", "netns", "exec", node, "conntrack", "-E", "-p", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        res = storm_round()
        time.sleep(1.0)  # let it print the round's last events
    finally:
        proc.terminate()
        _, _, usage = os.wait4(proc.pid, 0)
        proc.returncode = 0
    res["agent_cpu_s"] = round(usage.ru_utime + usage.ru_stime, 3)
    return res


def _quiet(count: Callable[[], int], quiet_s: float = 0.5, deadline_s: float = 60.0) -> None:
    """Wait until ``count()`` did not move for ``quiet_s``."""
    end = time.monotonic() + deadline_s
    last, since = -1, time.monotonic()
    while time.monotonic() < end:
        now = count()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.1)


def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def measure(*, pairs: int, seconds: float, log: Callable[[str], None]) -> dict[str, Any]:
    """The guest's whole measurement (root, Debian's kernel with kprobes); the result dict."""
    from bench import storm
    from cttrace.lab.node import Lab
    from cttrace.lab.plumbing import run, sysctl
    from cttrace.sources.bpf import BpfSource
    from cttrace.sources.select import netns_inode

    subprocess.run(["modprobe", "-a", *MODULES], check=True)
    # Per-program run counts and run time (fdinfo run_cnt/run_time_ns): probe hits by hook.
    Path("/proc/sys/kernel/bpf_stats_enabled").write_text("1\n")
    work = Path("/tmp/cttrace-bench-bpf")
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"kernel": platform.release(), "cpus": os.cpu_count(),
                              "pairs": pairs, "round_seconds": seconds}
    with Lab() as lab:
        b = storm._Bench(lab, work)
        try:
            client, web = storm.storm_pods(b)
            node = lab.node_netns
            sysctl(node, {"net.netfilter.nf_conntrack_tcp_timeout_time_wait": 1})

            def flush() -> None:
                run(["ip", "netns", "exec", node, "conntrack", "-F"])

            def storm_round(name: str, count: int, dst: str = storm.STORM_VIP,
                            port: int = 80) -> dict[str, Any]:
                flush()
                res = b.client(client.netns, name, dst, rate=0, count=count, port=port)
                flush()
                return res

            t = time.monotonic()
            log(f"bpf-overhead: compiling the bpf source for {node}")
            source = _CountingSource(BpfSource(netns_ino=netns_inode(node)))
            source.open()
            result["compile_and_attach_s"] = round(time.monotonic() - t, 1)
            result["hooks"] = {fn: list(how) for fn, how in source.source.hooks().items()}
            source.source.detach()
            try:
                # Warm-up (the first storm after the compile runs slow), then size the
                # rounds to about ``seconds`` each.
                warm = storm_round("warmup", 300)
                calib = storm_round("calibrate", 500)
                count = max(300, int(calib["rate"] * seconds))
                result["connections_per_round"] = count
                log(f"bpf-overhead: warm-up {warm['rate']:.0f} conn/s, then "
                    f"{calib['rate']:.0f} conn/s; rounds of {count} connections")

                def run_rounds(prefix: str, modes: list[str]) -> list[dict[str, Any]]:
                    """A storm round per mode: ``without*`` with no probes, the others
                    attached (``probes-only``: the reader held until the storm is over)."""
                    out: list[dict[str, Any]] = []
                    for i, mode in enumerate(modes):
                        n = min(count, PROBES_ONLY_MAX) if mode in SHORT_MODES else count
                        if mode.startswith("without"):
                            res = storm_round(f"{prefix}{i}", n)
                        else:
                            with _Attached(source, reader=mode != "probes-only") as attached:
                                res = storm_round(f"{prefix}{i}", n)
                                attached.drain()
                            res.update(attached.counts)
                        res["mode"] = mode
                        out.append(res)
                        log(f"bpf-overhead: {prefix} {i} {mode}: {res['rate']:.0f} conn/s "
                            f"({res['completed']} done, {res['failed']} failed)"
                            + (f"; delivered {res['delivered']}, UPDATEs "
                               f"{res['transitions']}, kernel {res['kernel']}, reader "
                               f"{res['reader_cpu_s']} s CPU"
                               if not mode.startswith("without") else ""))
                    return out

                rounds = run_rounds("round", round_modes(pairs))
                result["rounds"] = rounds
                with _Attached(source) as attached:
                    direct = storm_round("direct", max(300, count // 4), dst=web.ip,
                                         port=storm.STORM_PORT)
                    attached.drain()
                direct.update(attached.counts)
                result["direct"] = direct
                log(f"bpf-overhead: straight to the pod IP with probes: delivered "
                    f"{direct['delivered']}, kernel {direct['kernel']}")
                # The conntrack hooks' fallback (the kprobe variant, compiled with the rest)
                # on the same storm: its rate ratio and probe hits beside the trampolines'.
                source.source.attach(module_kprobes=True)
                result["hooks_kprobes"] = {fn: list(how)
                                           for fn, how in source.source.hooks().items()}
                source.source.detach()
                kprobe_rounds = run_rounds("kprobe variant round",
                                           ["without"] + ["with-kprobes", "without"] * pairs)
                result["kprobe_rounds"] = kprobe_rounds
                # The same storm watched by the other ways to follow conntrack.
                result["netlink"] = _netlink_cpu(node, lambda: storm_round("netlink", count))
                result["conntrack_e"] = _conntrack_cpu(
                    node, lambda: storm_round("conntrack-e", count))
                log(f"bpf-overhead: netlink {result['netlink']['agent_cpu_s']} s CPU, "
                    f"conntrack -E {result['conntrack_e']['agent_cpu_s']} s CPU")
            finally:
                source.close()
        finally:
            b.stop_all()
    for mode, key in (("with", "ratios"), ("probes-only", "probes_only_ratios")):
        result[key] = [round(x, 4) for x in neighbour_ratios(rounds, mode)]
    result["ratio_median"] = round(statistics.median(result["ratios"]), 4)
    result["kprobe_ratios"] = [round(x, 4) for x in neighbour_ratios(kprobe_rounds,
                                                                      "with-kprobes")]
    return result


def neighbour_ratios(rounds: list[dict[str, Any]], mode: str) -> list[float]:
    """Each ``mode`` round's rate divided by the mean of the rounds on either side."""
    return [r["rate"] / statistics.mean([rounds[i - 1]["rate"], rounds[i + 1]["rate"]])
            for i, r in enumerate(rounds) if r["mode"] == mode]


#: Rounds of PROBES_ONLY_MAX connections at most (their records wait in the ring buffer).
SHORT_MODES = ("probes-only", "without-short")


def round_modes(pairs: int) -> list[str]:
    """``pairs`` each of ``with`` (probes attached, the reader draining them as ``watch``
    does) and ``probes-only`` (probes attached, the reader held until the round is over),
    each between two rounds without probes of its own size: ``without`` for ``with``,
    ``without-short`` (PROBES_ONLY_MAX connections) for ``probes-only``, so that the
    start and end of a storm weigh the same on both sides of a ratio."""
    modes = ["without"]
    for _ in range(pairs):
        modes += ["with", "without", "without-short", "probes-only", "without-short",
                  "without"]
    return modes


def guest_main(out: Path, pairs: int, seconds: float) -> int:
    """Run :func:`measure`; write its result, or the error, to ``out``/RESULT_NAME."""
    started = time.monotonic()
    uptime = float(Path("/proc/uptime").read_text().split()[0])

    def log(text: str) -> None:
        print(f"[{time.monotonic() - started:5.0f} s] {text}", flush=True)

    try:
        result = measure(pairs=pairs, seconds=seconds, log=log)
    except Exception as exc:  # reported to the host, which says why in the table
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}".strip()[:500]}
    result["guest_up_s"] = uptime
    result["guest_s"] = round(time.monotonic() - started, 1)
    (out / RESULT_NAME).write_text(json.dumps(result, indent=1))
    return 0 if "error" not in result else 1


# -- host side ------------------------------------------------------------------------------------


@dataclass
class BpfOverhead:
    """What the guest measured (see the module docstring)."""

    kernel: str
    cpus: int
    pairs: int
    round_seconds: float
    connections_per_round: int
    compile_and_attach_s: float
    rounds: list[dict[str, Any]]
    direct: dict[str, Any]
    ratios: list[float]
    probes_only_ratios: list[float]
    ratio_median: float
    hooks: dict[str, list[str]] = field(default_factory=dict)
    """How each kernel function was hooked, and why: {function: [mode, why]}."""
    kprobe_rounds: list[dict[str, Any]] = field(default_factory=list)
    """Rounds with the conntrack hooks switched to their kprobe variant (the fallback),
    between rounds without probes."""
    kprobe_ratios: list[float] = field(default_factory=list)
    hooks_kprobes: dict[str, list[str]] = field(default_factory=dict)
    netlink: dict[str, Any] = field(default_factory=dict)
    conntrack_e: dict[str, Any] = field(default_factory=dict)
    guest_up_s: float = 0.0
    guest_s: float = 0.0
    wall_s: float = 0.0
    host_load: list[float] = field(default_factory=list)
    """The host's 1-minute load average when the VM started and when it finished (2 cores:
    above ~2, other work competed with the guest)."""

    def rounds_of(self, mode: str) -> list[dict[str, Any]]:
        return [r for r in self.rounds if r["mode"] == mode]

    def per_connection(self, rounds: list[dict[str, Any]]) -> dict[str, float]:
        """Records delivered, filtered, lost per connection, summed over ``rounds``."""
        conns = sum(r["completed"] + r["failed"] for r in rounds) or 1
        total: Counter[str] = Counter()
        for r in rounds:
            total.update(r["delivered"])
            total.update({f"kernel.{k}": v for k, v in r["kernel"].items()})
        return {k: v / conns for k, v in total.items()}


    def transitions_per_connection(self, rounds: list[dict[str, Any]]) -> dict[str, float]:
        """UPDATEs delivered per connection by old -> new state, most frequent first."""
        conns = sum(r["completed"] + r["failed"] for r in rounds) or 1
        total: Counter[str] = Counter()
        for r in rounds:
            total.update(r.get("transitions", {}))
        return {k: v / conns for k, v in total.most_common()}


def vm_kernels() -> list[str]:
    """The kernels the VM tier boots (``KERNELS`` in tests/vm/run_vm_tier.py), by name."""
    sys.path.insert(0, str(ROOT))
    from tests.vm import run_vm_tier as vm

    return list(vm.KERNELS)


def run_in_vm(work: Path, *, kernel: str = "6.1", pairs: int = 3, seconds: float = 5.0,
              timeout: float = VM_TIMEOUT_S,
              log: Callable[[str], None] = print) -> BpfOverhead | str:
    """Boot the VM tier's kernel ``kernel`` (a name from vm_kernels()) once and run the guest
    side; the result, or why not."""
    sys.path.insert(0, str(ROOT))
    from tests.vm import run_vm_tier as vm

    try:
        image = vm.find_kernel(kernel)
        vng, env = vm.find_vng()
    except vm.SetupError as exc:
        return f"the VM cannot start: {exc}"
    out = work / f"bpf-vm-{kernel}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    guest = (f"cd {shlex.quote(str(ROOT))} && PYTHONDONTWRITEBYTECODE=1 "
             + shlex.join([sys.executable, "-m", "bench.bpf_overhead", "guest", "--out",
                           str(out), "--pairs", str(pairs), "--seconds", str(seconds)]))
    cmd = vm.vng_argv(vng, image, out, guest, "3G", 2)
    console = work / f"bpf-vm-{kernel}.log"
    load0 = os.getloadavg()[0]
    try:
        with console.open("wb") as f:
            wall = vm.boot_vm(cmd, image, env, timeout, output=f)
    except OSError as exc:
        return f"the VM cannot start: {exc}"
    if wall is None:
        return f"the VM did not finish within {timeout:.0f} s (console in {console})"
    path = out / RESULT_NAME
    if not path.exists():
        tail = console.read_text(errors="replace").strip().splitlines()[-1:] or ["(empty)"]
        return f"the guest wrote no result (console in {console}: {tail[0][:200]})"
    data = json.loads(path.read_text())
    if "error" in data:
        return f"the guest failed: {data['error']} (console in {console})"
    return BpfOverhead(**data, wall_s=round(wall, 1),
                       host_load=[round(load0, 2), round(os.getloadavg()[0], 2)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("guest", help="inside the VM: measure, write DIR/" + RESULT_NAME)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p = sub.add_parser("vm", help="boot the VM, run the guest side, print the result")
    p.add_argument("--kernel", default="6.1", help="the VM tier's kernel to boot (6.1, 6.12)")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--work", type=Path, default=Path("/tmp/cttrace-bench"))
    opts = parser.parse_args()
    if opts.mode == "guest":
        sys.exit(guest_main(opts.out, opts.pairs, opts.seconds))
    opts.work.mkdir(parents=True, exist_ok=True)
    res = run_in_vm(opts.work, kernel=opts.kernel, pairs=opts.pairs, seconds=opts.seconds)
    print(json.dumps(asdict(res), indent=1) if isinstance(res, BpfOverhead) else res)


if __name__ == "__main__":
    main()
