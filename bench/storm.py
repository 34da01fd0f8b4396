"""Lab connection storms: the netlink source vs ``conntrack -E`` under load, and detection latency.

Why it exists: a node agent that misses events under load is worse than none,
and users ask what it costs. Both listeners watch the same lab node's conntrack
table during the same storm, so the comparison holds however fast the machine is.

The lab (:class:`cttrace.lab.Lab`, namespaces ``ctl-<id>-*``): a client pod and
a server pod behind kube-proxy-style DNAT Services on a node namespace. The
processes this module runs as ``python -m bench.storm MODE`` inside them:

* ``server``: accept, write one line, close (the server closes first, as HTTP/1.0 does);
* ``client``: non-blocking connects to a VIP at a paced rate (or as fast as
  possible with 50 in flight, like ``ab -c 50``), each read to EOF, then closed;
* ``listen``: cttrace's netlink source, correlator and runtime loop (what ``cttrace
  watch --source netlink`` runs), counting what it was given; optionally with
  an Alertmanager sink and a record of when each finding was decided.

Latency: a second server pod drops the first SYN of every connection
(iptables ``hashlimit`` per source port), so each connection is answered on the
SYN retransmit, ~1 s after its entry was created: a ``late-establish`` finding
(``--late-after 0.5``) at every first reply. The clock starts when the client's
``connect()`` completes (the SYN-ACK has crossed the node's conntrack one veth
hop earlier, so this slightly under-states the latency) and stops when the
listener decides the finding, then when the alert first shows in a real
Alertmanager's ``/api/v2/alerts`` (polled every 10 ms).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

STORM_PORT = 8081  # the storm server's port in the server pod (the lab's own pod server is 8080)
STORM_VIP, PROBE_VIP, SLOW_VIP = "10.100.0.10", "10.100.0.11", "10.100.0.12"
SYN_RECV = 2  # the first reply: SYN_SENT -> SYN_RECV


# -- processes that run inside the lab's namespaces ---------------------------------------------


def serve(ip: str, port: int) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((ip, port))
    sock.listen(4096)
    print("listening", flush=True)
    while True:
        conn, _ = sock.accept()
        with contextlib.suppress(OSError):
            conn.send(b"ok\n")
        conn.close()


def storm(dst: str, port: int, *, rate: float, count: int, concurrency: int,
          record: Path | None, connect_timeout: float = 5.0) -> dict[str, Any]:
    """Open ``count`` connections at ``rate``/s (0: as fast as ``concurrency`` allows)."""
    sel = selectors.DefaultSelector()
    inflight: dict[int, tuple[socket.socket, float, list[float]]] = {}
    done = failed = started = 0
    connected: list[tuple[int, float]] = []
    start = time.monotonic()
    wall0 = time.time() - start
    while done + failed < count:
        now = time.monotonic()
        while started < count and len(inflight) < concurrency and (
            rate <= 0 or started < (now - start) * rate
        ):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            err = s.connect_ex((dst, port))
            started += 1
            if err not in (0, errno.EINPROGRESS):
                s.close()
                failed += 1
                continue
            inflight[s.fileno()] = (s, now, [])
            sel.register(s, selectors.EVENT_WRITE)
        if rate > 0 and started < count and len(inflight) < concurrency:
            timeout = max(0.0, start + started / rate - time.monotonic())
        else:
            timeout = 0.05
        for key, events in sel.select(min(timeout, 0.05)):
            s, t_start, state = inflight[key.fd]
            if events & selectors.EVENT_WRITE and not state:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    sel.unregister(s)
                    del inflight[key.fd]
                    s.close()
                    failed += 1
                    continue
                t = time.monotonic()
                state.append(t)
                if record is not None:
                    connected.append((s.getsockname()[1], wall0 + t))
                sel.modify(s, selectors.EVENT_READ)
                continue
            try:
                data = s.recv(64)
            except OSError:
                data = b""
            if data:
                continue  # the greeting; EOF follows
            sel.unregister(s)
            del inflight[key.fd]
            s.close()
            done += 1
        now = time.monotonic()
        for fd, (s, t_start, state) in list(inflight.items()):
            if not state and now - t_start > connect_timeout:
                sel.unregister(s)
                del inflight[fd]
                s.close()
                failed += 1
    seconds = time.monotonic() - start
    if record is not None:
        record.write_text(json.dumps(connected))
    return {"completed": done, "failed": failed, "seconds": seconds,
            "rate": done / seconds if seconds else 0.0}


def listen(netns: str, ready: Path, out: Path, progress: Path, vip: str,
           late_after: float | None, alertmanager: str | None) -> None:
    """cttrace's netlink source + correlator + runtime loop until SIGTERM; counts to ``out``."""
    from cttrace.correlator import Correlator, Settings
    from cttrace.events import CtEvent, CtKind, Event
    from cttrace.findings import Finding
    from cttrace.runtime import Periodic, Pipeline, Status
    from cttrace.sinks.alertmanager import AlertmanagerSink, tuple_text
    from cttrace.sources.netlink import NetlinkSource

    # Counted per event, not per entry id: a tuple reused at once can get its old id back.
    counts = {"events": 0, "new": 0, "replied": 0}
    decided: dict[str, float] = {}

    class Counter:
        def finding(self, finding: Finding) -> None:
            pass

        def event(self, ev: Event) -> None:
            counts["events"] += 1
            if not isinstance(ev, CtEvent) or ev.orig.dst != vip:
                return
            if ev.kind is CtKind.NEW:
                counts["new"] += 1
            elif ev.kind is CtKind.UPDATE and ev.tcp_state == SYN_RECV:
                counts["replied"] += 1

        def status(self, status: Status) -> None:
            pass

        def close(self) -> None:
            pass

    def on_finding(finding: Finding) -> None:
        decided.setdefault(tuple_text(finding.orig), time.time())

    def write_progress(now: float) -> list[Finding]:
        progress.write_text(str(counts["events"]))
        return []

    settings = Settings() if late_after is None else Settings(late_after=late_after)
    sinks: list[Any] = [Counter()]
    am = None
    if alertmanager:
        am = AlertmanagerSink([alertmanager], node="bench", generator_url="")
        am.start()
        sinks.append(am)
    source = NetlinkSource(netns)
    source.open()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    pipeline = Pipeline(source, Correlator(settings), sinks, on_finding=on_finding,
                        periodic=[Periodic(0.2, write_progress)])
    cpu0 = _cpu_self()
    summary = pipeline.run(stop, ready_file=ready)
    cpu = _cpu_self() - cpu0
    stats = source.stats()
    source.close()
    if am is not None:
        am.close(deadline_s=2.0)
    out.write_text(json.dumps({
        "new": counts["new"], "replied": counts["replied"], "events": summary.events,
        "enobufs": stats.lost, "dropped": stats.extra.get("dropped_messages", -1),
        "cpu_s": cpu, "findings": dict(summary.findings), "decided": decided,
    }))


def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# -- orchestration (runs in the root namespace, as root) ----------------------------------------


def _module(netns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", netns, PYTHON, "-m", "bench.storm", *args]


def _wait(cond: Callable[[], bool], what: str, deadline_s: float = 60.0) -> None:
    end = time.monotonic() + deadline_s
    while not cond():
        if time.monotonic() > end:
            raise RuntimeError(f"bench: {what} not within {deadline_s:g} s")
        time.sleep(0.02)


def _stable(paths: list[Path], quiet_s: float = 1.0, deadline_s: float = 60.0) -> None:
    """Wait until none of ``paths`` changed for ``quiet_s`` (the listeners drained their queue)."""
    end = time.monotonic() + deadline_s
    last: list[tuple[int, bytes]] = []
    since = time.monotonic()
    while time.monotonic() < end:
        now = [(p.stat().st_size, p.read_bytes() if p.stat().st_size < 64 else b"")
               if p.exists() else (0, b"") for p in paths]
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.05)


@dataclass
class Step:
    target: float  # requested connections/s; 0 = as fast as the machine goes
    client: dict[str, Any]
    cttrace: dict[str, Any]
    anchor: dict[str, Any]

    @property
    def connections(self) -> int:
        return int(self.client["completed"])


@dataclass
class LabResult:
    steps: list[Step] = field(default_factory=list)
    latency_finding_ms: list[float] = field(default_factory=list)
    latency_alert_ms: list[float] = field(default_factory=list)
    latency_connections: int = 0
    notes: list[str] = field(default_factory=list)


class _Bench:
    def __init__(self, lab: Any, work: Path) -> None:
        self.lab = lab
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str], name: str, **kw: Any) -> subprocess.Popen[bytes]:
        log = (self.work / f"{name}.log").open("ab")
        proc = subprocess.Popen(argv, stdout=kw.pop("stdout", log), stderr=log,
                                stdin=subprocess.DEVNULL, cwd=ROOT, **kw)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def serve(self, pod: Any) -> None:
        """The storm server in ``pod`` on STORM_PORT, listening when this returns."""
        srv = self.spawn(_module(pod.netns, "server", "--ip", pod.ip, "--port", str(STORM_PORT)),
                         f"server-{pod.name}", stdout=subprocess.PIPE)
        assert srv.stdout is not None
        if srv.stdout.readline().strip() != b"listening":
            raise RuntimeError("bench: storm server did not start")

    def client(self, netns: str, src_name: str, vip: str, *, rate: float, count: int,
               concurrency: int = 50, record: Path | None = None,
               port: int = 80) -> dict[str, Any]:
        out = self.work / f"client-{src_name}.json"
        args = ["client", "--dst", vip, "--port", str(port), "--rate", str(rate),
                "--count", str(count), "--concurrency", str(concurrency), "--out", str(out)]
        if record is not None:
            args += ["--record", str(record)]
        proc = self.spawn(_module(netns, *args), f"client-{src_name}")
        proc.wait(timeout=600)
        return dict(json.loads(out.read_text()))

    def listener(self, name: str, vip: str, **opts: Any) -> tuple[subprocess.Popen[bytes],
                                                                   Path, Path]:
        ready, out, progress = (self.work / f"{name}.{x}" for x in ("ready", "json", "progress"))
        for p in (ready, out, progress):
            p.unlink(missing_ok=True)
        args = ["listen", "--netns", self.lab.node_netns, "--ready", str(ready), "--out",
                str(out), "--progress", str(progress), "--vip", vip]
        for key, value in opts.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        proc = self.spawn([PYTHON, "-m", "bench.storm", *args], name)
        _wait(lambda: ready.exists() or proc.poll() is not None, f"{name} ready")
        if proc.poll() is not None:
            raise RuntimeError(f"bench: {name} exited: {(self.work / f'{name}.log').read_text()}")
        return proc, out, progress

    @staticmethod
    def finish_listener(proc: subprocess.Popen[bytes], out: Path) -> dict[str, Any]:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        return dict(json.loads(out.read_text()))


def _count_anchor(path: Path, log: Path, vip: str) -> tuple[int, int, int]:
    """NEW and first-reply lines for ``vip`` in ``conntrack -E`` output; its ENOBUFS warnings."""
    new = replied = 0
    enobufs = log.read_text(errors="replace").count("ENOBUFS") if log.exists() else 0
    needle = f"dst={vip} "
    for line in path.read_text(errors="replace").splitlines():
        if needle not in line:
            continue
        elif "[NEW]" in line:
            new += 1
        elif "[UPDATE]" in line and " SYN_RECV " in line:
            replied += 1
    return new, replied, enobufs


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def storm_pods(b: _Bench) -> tuple[Any, Any]:
    """The storm's client pod (every source port usable) and the web pod behind the storm
    Service (``STORM_VIP``) and the probe Service (``PROBE_VIP``), its server listening."""
    from cttrace.lab.cluster import Workload
    from cttrace.lab.plumbing import sysctl

    lab = b.lab
    client = lab.start_pod(Workload("bench", "loadgen", "5b7c9", "bench/loadgen"))
    web = lab.start_pod(Workload("bench", "web", "6c8d7", "bench/web"))
    sysctl(client.netns, {"net.ipv4.ip_local_port_range": "1024 65535"})
    b.serve(web)
    for name, vip in (("storm", STORM_VIP), ("probe", PROBE_VIP)):
        lab.add_service("bench", name, app=name, vip=vip, target_port=STORM_PORT,
                        endpoints=[web])
    return client, web


def run_storms(rates: list[float], seconds: float, max_count: int, *, latency_conns: int,
               work: Path, log: Callable[[str], None] = print) -> LabResult:
    from cttrace.lab.cluster import Workload
    from cttrace.lab.node import Lab
    from cttrace.lab.plumbing import run

    work.mkdir(parents=True, exist_ok=True)
    result = LabResult()
    with Lab() as lab:
        b = _Bench(lab, work)
        try:
            client, _ = storm_pods(b)
            slow = lab.start_pod(Workload("bench", "slow", "7d9e8", "bench/slow"))
            b.serve(slow)
            lab.add_service("bench", "slow", app="slow", vip=SLOW_VIP, target_port=STORM_PORT,
                            endpoints=[slow])
            # The slow pod drops the first SYN of each source port: answered on the retransmit.
            run(["ip", "netns", "exec", slow.netns, "iptables", "-A", "INPUT", "-p", "tcp",
                 "--syn", "-m", "hashlimit", "--hashlimit-upto", "1/hour",
                 "--hashlimit-burst", "1", "--hashlimit-mode", "srcip,srcport",
                 "--hashlimit-name", "ctlfirst", "--hashlimit-htable-size", "65536",
                 "--hashlimit-htable-max", "65536", "-j", "DROP"])
            node = lab.node_netns
            for target in rates:
                run(["ip", "netns", "exec", node, "conntrack", "-F"])
                ours, out, progress = b.listener("cttrace", STORM_VIP)
                anchor_out, anchor_log = work / "conntrack-E.txt", work / "conntrack-E.log"
                anchor_log.unlink(missing_ok=True)
                with anchor_out.open("wb") as f:
                    anchor = b.spawn(["ip", "netns", "exec", node, "conntrack", "-E"],
                                     "conntrack-E", stdout=f)
                b.client(client.netns, "probe", PROBE_VIP, rate=0, count=1)
                _wait(lambda out=anchor_out: PROBE_VIP in out.read_text(),  # type: ignore[misc]
                      "conntrack -E subscribed")
                cpu0 = _proc_cpu(anchor.pid)
                count = max_count if target <= 0 else int(target * seconds)
                log(f"  storm: {'max' if target <= 0 else f'{target:,.0f}/s'} "
                    f"x {count:,} connections")
                res = b.client(client.netns, "storm", STORM_VIP, rate=target, count=count)
                _stable([anchor_out, progress])
                anchor_cpu = _proc_cpu(anchor.pid) - cpu0
                anchor.send_signal(signal.SIGINT)
                anchor.wait(timeout=30)
                mine = b.finish_listener(ours, out)
                new, replied, enobufs = _count_anchor(anchor_out, anchor_log, STORM_VIP)
                step = Step(target, res, mine,
                            {"new": new, "replied": replied, "enobufs": enobufs,
                             "cpu_s": anchor_cpu})
                result.steps.append(step)
                log(f"    {res['rate']:,.0f} conn/s achieved; cttrace NEW {mine['new']:,} "
                    f"reply {mine['replied']:,} cpu {mine['cpu_s']:.2f}s; conntrack -E NEW "
                    f"{new:,} reply {replied:,} cpu {anchor_cpu:.2f}s enobufs {enobufs}")
            if latency_conns:
                _latency(b, lab, client.netns, latency_conns, work, result, log)
        finally:
            b.stop_all()
    return result


def _latency(b: _Bench, lab: Any, client_netns: str, conns: int, work: Path,
             result: LabResult, log: Callable[[str], None]) -> None:
    from cttrace.lab.plumbing import run

    sys.path.insert(0, str(ROOT))
    from tests.fixtures.alertmanager import Alertmanager

    run(["ip", "netns", "exec", lab.node_netns, "conntrack", "-F"])
    am = Alertmanager(work / "alertmanager")
    am.start()
    try:
        ours, out, _ = b.listener("cttrace-latency", SLOW_VIP, late_after=0.5,
                                  alertmanager=am.url)
        first_seen: dict[str, float] = {}
        stop = threading.Event()

        def poll() -> None:
            query = urllib.parse.urlencode([("filter", 'alertname="CttraceLateEstablish"')])
            url = f"{am.url}/api/v2/alerts?{query}"
            while not stop.is_set():
                try:
                    with urllib.request.urlopen(url, timeout=5) as resp:
                        alerts = json.load(resp)
                except OSError:
                    alerts = []
                now = time.time()
                for alert in alerts:
                    first_seen.setdefault(alert["labels"].get("tuple", ""), now)
                stop.wait(0.01)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        record = work / "latency-connected.json"
        log(f"  latency: {conns} connections answered on the SYN retransmit")
        res = b.client(client_netns, "latency", SLOW_VIP, rate=20, count=conns,
                       concurrency=conns, record=record)
        mine_done = time.monotonic() + 10
        while time.monotonic() < mine_done and len(first_seen) < res["completed"]:
            time.sleep(0.05)
        stop.set()
        poller.join()
        mine = b.finish_listener(ours, out)
    finally:
        am.stop()
    decided: dict[str, float] = mine["decided"]
    pod_ip = next(p.ip for p in lab.pods.values() if p.name.startswith("loadgen"))
    for sport, t_conn in json.loads(record.read_text()):
        key = f"{pod_ip}:{sport}->{SLOW_VIP}:80"
        if key in decided:
            result.latency_finding_ms.append((decided[key] - t_conn) * 1000)
        if key in first_seen:
            result.latency_alert_ms.append((first_seen[key] - t_conn) * 1000)
    result.latency_connections = int(res["completed"])
    log(f"    findings {len(result.latency_finding_ms)}, alerts {len(result.latency_alert_ms)}"
        f" of {res['completed']} connections")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("server")
    p.add_argument("--ip", required=True)
    p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("client")
    p.add_argument("--dst", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--record", type=Path)
    p = sub.add_parser("listen")
    p.add_argument("--netns", required=True)
    p.add_argument("--ready", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--progress", type=Path, required=True)
    p.add_argument("--vip", required=True)
    p.add_argument("--late-after", type=float)
    p.add_argument("--alertmanager")
    p = sub.add_parser("lab", help="run the storms and the latency measure, print the numbers")
    p.add_argument("--rates", default="2000,4000,8000,0")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--max-count", type=int, default=40000)
    p.add_argument("--latency", type=int, default=200)
    p.add_argument("--work", type=Path, default=Path("/tmp/cttrace-bench"))
    opts = parser.parse_args()
    if opts.mode == "server":
        serve(opts.ip, opts.port)
    elif opts.mode == "client":
        res = storm(opts.dst, opts.port, rate=opts.rate, count=opts.count,
                    concurrency=opts.concurrency, record=opts.record)
        opts.out.write_text(json.dumps(res))
    elif opts.mode == "listen":
        listen(opts.netns, opts.ready, opts.out, opts.progress, opts.vip, opts.late_after,
               opts.alertmanager)
    else:
        lr = run_storms([float(x) for x in opts.rates.split(",")], opts.seconds,
                        opts.max_count, latency_conns=opts.latency, work=opts.work)
        fin, al = lr.latency_finding_ms, lr.latency_alert_ms
        print(f"latency to finding p50 {median(fin):.1f} ms p99 {percentile(fin, 99):.1f} ms; "
              f"to Alertmanager p50 {median(al):.1f} ms p99 {percentile(al, 99):.1f} ms")


if __name__ == "__main__":
    main()
