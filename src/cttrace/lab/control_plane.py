"""A real kube-apiserver and its etcd, run inside the lab's own control-plane namespace.

``--proxy kube-proxy`` needs a Kubernetes API for the real kube-proxy to watch.
Both servers run in ``ctl-<instance>-ctrl``, a network namespace of the lab's,
joined to the node namespace by one veth on a private /30::

    node netns  ctl<i>cp0 10.0.3.1/30  <-veth->  ctl<i>cp1 10.0.3.2/30  control-plane netns
    kube-proxy --kubeconfig -> https://10.0.3.2:6443         kube-apiserver, etcd on 127.0.0.1

So the node reaches its API over a link, as a real node does (one conntrack
entry per watch connection in the node's table), and nothing is bound, routed
or written in the machine's root namespace. The lab's own Python reaches the API
from a thread that entered the control-plane namespace (setns(2) moves only that
thread; its sockets stay there), see :class:`cttrace.lab.api_mirror.KubeMirror`.

The API serves TLS with the certificate the apiserver makes for itself (its
self-signed CA is what the clients trust), knows one bearer token, made afresh
for each lab, and authorizes whoever has it (``AlwaysAllow``): only processes
inside the lab's namespaces can reach it at all. The
binaries are the ones ``scripts/build-kube.sh`` caches; etcd is Debian's.
"""

from __future__ import annotations

import glob
import os
import secrets
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from cttrace.lab.plumbing import in_netns, run
from cttrace.lab.preconditions import LabError
from cttrace.netns import entered_netns

#: The /30 between the node and the control plane (10.0.0.0/24 is the fabric link,
#: 10.0.1.0/24 and 10.0.2.0/24 the pods).
CONTROL_NODE_IP = "10.0.3.1"
CONTROL_IP = "10.0.3.2"
CONTROL_PREFIX = 30
API_PORT = 6443
API_URL = f"https://{CONTROL_IP}:{API_PORT}"

#: Holds every Service VIP the scenarios use (10.100.x.x); the apiserver's own
#: ``kubernetes`` Service takes the first address, 10.96.0.1.
SERVICE_CIDR = "10.96.0.0/12"

ETCD = "/usr/bin/etcd"
KUBE_CACHE = Path(os.environ.get("CTTRACE_KUBE_CACHE", "/var/cache/cttrace"))
BUILD_HINT = ("run `scripts/build-kube.sh kube-apiserver kube-proxy` as root once "
              "(~15 min on 2 cores; `make test-deps` does it)")

#: kube-apiserver answers /readyz within ~10 s here, minutes under the VM tier's emulation.
START_DEADLINE_S = 300.0


def apiserver_flags(*, tokens: Path, sa_public: Path, sa_private: Path,
                    service_cidr: str) -> list[str]:
    """The kube-apiserver flags every API cttrace starts shares (the lab's, the tests'): bearer
    tokens from a file, everyone authorized, the service-account key flags 1.20 requires,
    and nothing that waits for a controller-manager."""
    return [
        f"--token-auth-file={tokens}",
        "--authorization-mode=AlwaysAllow",
        f"--service-account-key-file={sa_public}",
        f"--service-account-signing-key-file={sa_private}",
        "--service-account-issuer=https://kubernetes.default.svc",
        f"--service-cluster-ip-range={service_cidr}",
        # No controller-manager: nothing would create service accounts or keep
        # the `kubernetes` Service's endpoints.
        "--disable-admission-plugins=ServiceAccount",
        "--endpoint-reconciler-type=none",
        "--profiling=false",
        "--v=1",
    ]


def cached_binary(component: str) -> str:
    """The binary scripts/build-kube.sh cached for ``component`` (``kube-proxy``), or the path
    in ``CTTRACE_KUBE_PROXY`` / ``CTTRACE_KUBE_APISERVER``."""
    explicit = os.environ.get("CTTRACE_" + component.upper().replace("-", "_"))
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise LabError(f"{explicit} (from the environment) is not an executable")
        return explicit
    found = sorted(glob.glob(str(KUBE_CACHE / f"{component}-*" / component)))
    if not found:
        raise LabError(f"no {component} is built on this machine: {BUILD_HINT}")
    return found[-1]


class LabProcess:
    """A server started with ``ip netns exec`` (which execs: the pid is the server's own),
    in a session of its own so that a terminal's Ctrl-C reaches only the lab."""

    def __init__(self, what: str, netns: str, argv: Sequence[str], log: Path) -> None:
        self.what = what
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self.proc = subprocess.Popen(in_netns(netns, argv), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise LabError(f"{self.what} exited with status {self.proc.returncode}"
                           f"{self.last_words()}")

    def last_words(self) -> str:
        """``": <last log line>"``, or nothing."""
        try:
            lines = [line.strip() for line in
                     self.log.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        return f": {lines[-1]}" if lines else ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers; always reaped."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()


def wait_until(what: str, check: Callable[[], bool], deadline_s: float,
               alive: Sequence[LabProcess] = ()) -> None:
    """Poll ``check`` until true; fail at the deadline, or as soon as one of ``alive`` died."""
    deadline = time.monotonic() + deadline_s
    while not check():
        for proc in alive:
            proc.check_alive()
        if time.monotonic() > deadline:
            words = alive[-1].last_words() if alive else ""
            raise LabError(f"{what}: not within {deadline_s:g} s{words}")
        time.sleep(0.1)


def http_ok(netns: str, url: str, cafile: Path | None = None, token: str = "") -> bool:
    """Whether ``url`` answers 200 from inside ``netns`` (HTTPS: trusting ``cafile``)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                     if token else {})
    try:
        context = None if cafile is None else ssl.create_default_context(cafile=str(cafile))
        with entered_netns(netns), \
                urllib.request.urlopen(request, timeout=2, context=context) as resp:
            return bool(resp.status == 200)
    except (OSError, ssl.SSLError, urllib.error.HTTPError):
        return False


class ControlPlane:
    """etcd and kube-apiserver in ``netns``; state (data, keys, logs) under ``workdir``."""

    def __init__(self, netns: str, workdir: Path, apiserver: str) -> None:
        self.netns = netns
        self.workdir = workdir
        self.apiserver_binary = apiserver
        self.processes: list[LabProcess] = []
        self.token = secrets.token_hex(16)

    @property
    def ca_file(self) -> Path:
        """The certificate file the apiserver writes for itself at start-up: its serving
        certificate and the self-signed CA that signed it (k8s.io/client-go/util/cert
        GenerateSelfSignedCertKey), so it works as the clients' CA bundle."""
        return self.workdir / "certs" / "apiserver.crt"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # 1.20 requires a service-account signing key even with nothing to sign for.
        sa_key = self.workdir / "sa.key"
        run(["openssl", "genrsa", "-out", str(sa_key), "2048"])
        tokens = self.workdir / "tokens.csv"
        tokens.write_text(f"{self.token},lab-admin,lab-admin,system:masters\n")
        tokens.chmod(0o600)
        etcd = LabProcess("etcd", self.netns, [
            ETCD, "--name=ctl", f"--data-dir={self.workdir / 'etcd'}",
            "--listen-client-urls=http://127.0.0.1:2379",
            "--advertise-client-urls=http://127.0.0.1:2379",
            "--listen-peer-urls=http://127.0.0.1:2380",
            "--initial-advertise-peer-urls=http://127.0.0.1:2380",
            "--initial-cluster=ctl=http://127.0.0.1:2380", "--log-level=warn",
        ], self.workdir / "etcd.log")
        self.processes.append(etcd)
        wait_until("etcd in " + self.netns,
                   lambda: http_ok(self.netns, "http://127.0.0.1:2379/health"),
                   START_DEADLINE_S, self.processes)
        apiserver = LabProcess("kube-apiserver", self.netns, [
            self.apiserver_binary,
            "--etcd-servers=http://127.0.0.1:2379",
            f"--advertise-address={CONTROL_IP}",
            f"--bind-address={CONTROL_IP}",
            f"--secure-port={API_PORT}",
            f"--cert-dir={self.workdir / 'certs'}",  # it makes its own certificate there
            *apiserver_flags(tokens=tokens, sa_public=sa_key, sa_private=sa_key,
                             service_cidr=SERVICE_CIDR),
        ], self.workdir / "kube-apiserver.log")
        self.processes.append(apiserver)
        wait_until("kube-apiserver in " + self.netns,
                   lambda: self.ca_file.exists()
                   and http_ok(self.netns, f"{API_URL}/readyz", self.ca_file, self.token),
                   START_DEADLINE_S, self.processes)

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()
