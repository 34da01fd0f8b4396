"""A small client / node / server namespace set-up with a kube-proxy-style DNAT, for the VM tier.

    client netns ──veth── node netns ──veth── server netns
    10.251.1.2            .1.1 | .2.1           10.251.2.2
                          PREROUTING: VIP 10.251.100.10:<80+n> -> 10.251.2.2:<8080+n>

The node is a namespace of its own, as in the lab (and on a real node the
conntrack entries the bpf source reports live in the node's namespace,
while the sockets live in the clients'). Ports are assigned per test so that
tests sharing one tracer never see each other's tuples. Everything is named
``ctl<instance>…`` and removed by :meth:`Topology.destroy`, even after a failure.

The full scenarios (recycled IPs, dead endpoints, bridges) use
:mod:`cttrace.lab`; this is only the minimum to exercise every BPF hook.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

CLIENT_IP = "10.251.1.2"
CLIENT_GW = "10.251.1.1"
SERVER_IP = "10.251.2.2"
SERVER_GW = "10.251.2.1"
VIP = "10.251.100.10"
#: Destination the client namespace itself DNATs to VIP (an entry in another netns).
CLIENT_LOCAL_VIP = "10.251.200.1"

#: (VIP port, server port) pairs; the node DNATs each VIP port to its server port.
SERVICE_PORTS = {80: 8080, 81: 8081, 82: 8082, 83: 8083, 84: 8084}
#: Server ports with a listener (8081 has none: connecting there draws a RST).
LISTEN_PORTS = (8080, 8082, 8083, 8084)

_SERVER_CODE = r"""
import socket, sys, threading
def serve(conn):
    with conn:
        while conn.recv(4096):
            pass
def listen(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(64)
    return s
socks = [listen(int(p)) for p in sys.argv[1:]]
def loop(s):
    while True:
        conn, _ = s.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
for s in socks:
    threading.Thread(target=loop, args=(s,), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

_CLIENT_CODE = r"""
import socket, sys
dst, dport, sport, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = socket.socket()
s.bind(("0.0.0.0", sport))
if mode == "nowait":
    s.setblocking(False)
    s.connect_ex((dst, dport))
    print("sent", flush=True)
else:
    s.settimeout(60)
    try:
        s.connect((dst, dport))
        print("connected", flush=True)
    except OSError as exc:
        print("error", exc.errno, flush=True)
sys.stdin.read()
s.close()
"""


_LOAD_CODE = r"""
import socket, sys
dst, port = sys.argv[1], int(sys.argv[2])
print("started", flush=True)
while True:
    s = socket.socket()
    try:
        s.connect((dst, port))
    except OSError:
        pass
    s.close()
"""


def run(*args: str) -> str:
    """Run a command; raise with its stderr if it fails."""
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def in_ns(ns: str, *args: str) -> str:
    return run("ip", "netns", "exec", ns, *args)


@dataclass
class Process:
    """A helper Python process in a namespace, driven through stdin/stdout."""

    proc: subprocess.Popen[str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expect_line(self, timeout: float = 60.0) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"process {self.pid} printed nothing within {timeout} s")
        line = self.proc.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"process {self.pid} exited: {self.proc.wait()}")
        return line

    def comm(self) -> str:
        return Path(f"/proc/{self.pid}/comm").read_text().strip()

    def cgroup_path(self) -> str:
        for line in Path(f"/proc/{self.pid}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
        return ""

    def stop(self) -> None:
        """Close stdin (the helper then closes its socket and exits) and reap it."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Topology:
    instance: str = field(default_factory=lambda: secrets.token_hex(2))
    processes: list[Process] = field(default_factory=list)

    @property
    def client_ns(self) -> str:
        return f"ctl{self.instance}c"

    @property
    def node_ns(self) -> str:
        return f"ctl{self.instance}n"

    @property
    def server_ns(self) -> str:
        return f"ctl{self.instance}s"

    def netns_ino(self, ns: str) -> int:
        return os.stat(f"/run/netns/{ns}").st_ino

    def create(self) -> None:
        i = self.instance
        for ns in (self.client_ns, self.node_ns, self.server_ns):
            run("ip", "netns", "add", ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
        for side, ns, addr, gw in (
            ("c", self.client_ns, CLIENT_IP, CLIENT_GW),
            ("s", self.server_ns, SERVER_IP, SERVER_GW),
        ):
            outer, inner = f"ctl{i}{side}n", f"ctl{i}{side}0"
            run("ip", "link", "add", inner, "netns", ns, "type", "veth",
                "peer", "name", outer, "netns", self.node_ns)
            in_ns(ns, "ip", "addr", "add", f"{addr}/24", "dev", inner)
            in_ns(ns, "ip", "link", "set", inner, "up")
            in_ns(ns, "ip", "route", "add", "default", "via", gw)
            in_ns(self.node_ns, "ip", "addr", "add", f"{gw}/24", "dev", outer)
            in_ns(self.node_ns, "ip", "link", "set", outer, "up")
        in_ns(self.node_ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        for vip_port, server_port in SERVICE_PORTS.items():
            in_ns(self.node_ns, "iptables", "-t", "nat", "-A", "PREROUTING", "-p", "tcp",
                  "-d", VIP, "--dport", str(vip_port),
                  "-j", "DNAT", "--to-destination", f"{SERVER_IP}:{server_port}")
        # An entry NATed in the client's own namespace: the tracer, filtered to
        # the node's namespace, must not report it.
        in_ns(self.client_ns, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp",
              "-d", CLIENT_LOCAL_VIP, "--dport", "80",
              "-j", "DNAT", "--to-destination", f"{VIP}:84")
        server = self.spawn(self.server_ns, _SERVER_CODE, *map(str, LISTEN_PORTS))
        if server.expect_line() != "ready":
            raise RuntimeError("server did not start")

    def spawn(self, ns: str, code: str, *args: str) -> Process:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", code, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        process = Process(proc)
        self.processes.append(process)
        return process

    def client(self, dst: str, dport: int, sport: int, *, wait: bool = True) -> Process:
        """A client socket bound to ``sport`` connecting to ``dst:dport`` from the client netns.

        ``wait``: block until connected (prints ``connected`` or ``error <errno>``);
        otherwise send the SYN and print ``sent``.
        """
        return self.spawn(self.client_ns, _CLIENT_CODE, dst, str(dport), str(sport),
                          "wait" if wait else "nowait")

    @contextlib.contextmanager
    def load(self, vip_port: int = 80) -> Iterator[Process]:
        """Connection load through the Service for the ``with`` block: a client in the
        client netns connects to ``VIP:vip_port`` and closes, again and again, as fast
        as it can (each connection a new NATed entry in the node's conntrack)."""
        load = self.spawn(self.client_ns, _LOAD_CODE, VIP, str(vip_port))
        try:
            if load.expect_line() != "started":
                raise RuntimeError("the load did not start")
            yield load
        finally:
            load.proc.kill()
            load.proc.wait()

    def conntrack_delete(self, sport: int) -> None:
        in_ns(self.node_ns, "conntrack", "-D", "-p", "tcp", "--orig-port-src", str(sport))

    def block_server_port(self, port: int, blocked: bool) -> None:
        """Silently drop SYNs to ``port`` in the server netns (the entry stays SYN_SENT)."""
        in_ns(self.server_ns, "iptables", "-A" if blocked else "-D", "INPUT", "-p", "tcp",
              "--dport", str(port), "-j", "DROP")

    def destroy(self) -> None:
        for process in self.processes:
            if process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait()
        for ns in (self.client_ns, self.node_ns, self.server_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
