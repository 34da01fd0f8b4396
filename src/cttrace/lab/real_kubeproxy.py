"""The real kube-proxy in the lab: the Kubernetes binary writes the node's Service rules.

:class:`RealKubeProxy` starts a real kube-apiserver (:mod:`cttrace.lab.control_plane`),
mirrors the lab's identity file into it (:class:`~cttrace.lab.api_mirror.KubeMirror`:
Pods with the status the lab sets, as no kubelet runs; Services; EndpointSlices
as ``discovery.k8s.io/v1beta1``, which kube-proxy 1.20 watches), and runs
``kube-proxy`` inside the node namespace with ``ip netns exec``. A lab ``sync``
then waits until kube-proxy's own rules say what the lab's Services say.

There is no kube-controller-manager: the lab writes each EndpointSlice at the
moment it changes a pod, which is what the EndpointSlice controller does with its
default batch period of 0. kube-proxy's own timing is real: its informers, its
``--iptables-min-sync-period`` (1 s) between syncs and its partial restores.

What kube-proxy would change outside the node namespace, and how it is kept in:

* It runs in the node namespace, so its iptables chains, IPVS services, ipsets,
  the ``kube-ipvs0`` dummy device and every ``net.*`` sysctl it sets
  (``net.ipv4.conf.all.route_localnet``; in IPVS mode ``net.ipv4.vs.conntrack``,
  ``expire_nodest_conn``, ``conn_reuse_mode``, ``ip_forward``) are that
  namespace's own, and go with it.
* ``--conntrack-max-per-core=0``: it leaves ``nf_conntrack_max`` and
  ``/sys/module/nf_conntrack/parameters/hashsize`` alone; the latter is one value
  for the whole machine. (Its per-namespace TCP timeouts, established 24 h and
  close-wait 1 h, are set in the node namespace as on a real node.)
* ``--oom-score-adj=0``: by default it makes itself immune to the OOM killer (-999).
* ``--healthz-bind-address``/``--metrics-bind-address`` on the node namespace's loopback.
* IPVS mode loads kernel modules (``ip_vs``, its schedulers) with modprobe when
  missing: that is machine-wide, so IPVS runs only in the VM tier.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

from cttrace.lab.api_mirror import KubeMirror, MirrorError
from cttrace.lab.cluster import LabService
from cttrace.lab.control_plane import (
    API_URL,
    CONTROL_IP,
    CONTROL_NODE_IP,
    CONTROL_PREFIX,
    ControlPlane,
    LabProcess,
    cached_binary,
    wait_until,
)
from cttrace.lab.kubeproxy import endpoint_chain, service_chain
from cttrace.lab.plumbing import in_netns, ip_batch, run
from cttrace.lab.preconditions import LabError, require_tools

if TYPE_CHECKING:
    from cttrace.lab.node import Lab

Mode = Literal["iptables", "ipvs"]

#: How long one sync may take: the API write, kube-proxy's watch, its min-sync-period
#: (seconds here; a minute or more under the VM tier's emulation, with two Go servers).
SYNC_DEADLINE_S = 120.0

#: What each mode needs besides etcd and openssl (Debian package per binary).
MODE_TOOLS: dict[Mode, dict[str, str]] = {
    "iptables": {"iptables-save": "iptables"},
    "ipvs": {"ipvsadm": "ipvsadm", "ipset": "ipset", "modprobe": "kmod"},
}


class RealKubeProxy:
    """The real kube-proxy in ``mode``; see the module docstring."""

    def __init__(self, mode: Mode) -> None:
        self.mode: Mode = mode
        self.name = "kube-proxy" if mode == "iptables" else "kube-proxy-ipvs"
        self.version = ""
        self._node_netns = ""
        self._control: ControlPlane | None = None
        self._mirror: KubeMirror | None = None
        self._proxy: LabProcess | None = None

    @property
    def description(self) -> str:
        return (f"the real kube-proxy {self.version or '(not started)'} in {self.mode} mode, "
                f"in {self._node_netns or 'the node namespace'}, watching a real kube-apiserver")

    # -- life cycle ------------------------------------------------------------------------------

    def start(self, lab: Lab) -> None:
        proxy_binary = cached_binary("kube-proxy")
        apiserver_binary = cached_binary("kube-apiserver")
        require_tools({"etcd": "etcd-server", "openssl": "openssl", **MODE_TOOLS[self.mode]})
        self.version = run([proxy_binary, "--version"]).split()[-1]
        names = lab.names
        self._node_netns = lab.node_netns
        control = names.control_netns
        lab.add_netns(control)
        ip_batch(lab.node_netns, [f"link add {names.control_link_node} type veth peer name "
                                  f"{names.control_link_control} netns {control}",
                                  f"addr add {CONTROL_NODE_IP}/{CONTROL_PREFIX} "
                                  f"dev {names.control_link_node}",
                                  f"link set {names.control_link_node} up"])
        ip_batch(control, ["link set lo up",
                           f"addr add {CONTROL_IP}/{CONTROL_PREFIX} "
                           f"dev {names.control_link_control}",
                           f"link set {names.control_link_control} up"])
        workdir = lab.state_dir / "control-plane"
        self._control = ControlPlane(control, workdir, apiserver_binary)
        self._control.start()
        self._mirror = KubeMirror(lab.identity_path, _api_client(self._control),
                                  slice_version="v1beta1", netns=control).start()
        kubeconfig = workdir / "kube-proxy.kubeconfig"
        kubeconfig.write_text(json.dumps({  # JSON is YAML
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "lab", "cluster": {
                "server": API_URL, "certificate-authority": str(self._control.ca_file)}}],
            "users": [{"name": "kube-proxy", "user": {"token": self._control.token}}],
            "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "kube-proxy"}}],
            "current-context": "lab",
        }))
        kubeconfig.chmod(0o600)
        self._proxy = LabProcess("kube-proxy", lab.node_netns, [
            proxy_binary,
            f"--kubeconfig={kubeconfig}",
            f"--proxy-mode={self.mode}",
            f"--hostname-override={lab.node_name}",
            f"--bind-address={lab.host_ip}",
            # Traffic to a VIP from outside the pod network is masqueraded (KUBE-MARK-MASQ).
            f"--cluster-cidr={lab.pod_cidr}",
            # Leave nf_conntrack_max and the machine-wide conntrack hashsize alone.
            "--conntrack-max-per-core=0",
            # Do not make the process immune to this machine's OOM killer.
            "--oom-score-adj=0",
            "--healthz-bind-address=127.0.0.1:10256",
            "--metrics-bind-address=127.0.0.1:10249",
            "--v=2",
        ], workdir / "kube-proxy.log")
        self._wait("kube-proxy's first sync", self._synced_once)

    def sync(self, services: Sequence[LabService]) -> None:
        assert self._mirror is not None, "start() first"
        try:
            self._mirror.wait_caught_up(timeout=SYNC_DEADLINE_S)
        except MirrorError as err:
            raise LabError(f"the lab's objects did not reach the kube-apiserver: {err}") from None
        self._wait("kube-proxy's rules for " + ", ".join(s.port_key for s in services),
                   lambda: self._rules_match(services))

    def stop(self) -> None:
        if self._mirror is not None:
            self._mirror.close(raise_error=False)
            self._mirror = None
        if self._proxy is not None:
            self._proxy.stop()
            self._proxy = None
        if self._control is not None:
            self._control.stop()
            self._control = None

    def _wait(self, what: str, check: Callable[[], bool]) -> None:
        assert self._proxy is not None
        wait_until(what, check, SYNC_DEADLINE_S, [self._proxy])

    # -- reading kube-proxy's rules back -----------------------------------------------------------

    def _synced_once(self) -> bool:
        if self.mode == "ipvs":
            # The apiserver's own `kubernetes` Service, 10.96.0.1:443, is the first one synced.
            return "TCP  10.96.0.1:443" in self._ipvsadm()
        return ":KUBE-SERVICES " in self._iptables_save("nat")

    def _rules_match(self, services: Sequence[LabService]) -> bool:
        if self.mode == "ipvs":
            real = ipvs_real_servers(self._ipvsadm())
            return all(real.get(f"{s.vip}:{s.port}", set()) ==
                       {f"{p.ip}:{s.target_port}" for p in s.endpoints} for s in services)
        nat, filter_table = self._iptables_save("nat"), self._iptables_save("filter")
        jumps = iptables_jumps(nat)
        for svc in services:
            want = {endpoint_chain(svc.port_key, f"{p.ip}:{svc.target_port}")
                    for p in svc.endpoints}
            if jumps.get(service_chain(svc.port_key), set()) != want:
                return False
            # A Service without endpoints gets kube-proxy's REJECT, and loses it again.
            rejected = f'"{svc.port_key} has no endpoints"' in filter_table
            if rejected != (not svc.endpoints):
                return False
        return True

    def _iptables_save(self, table: str) -> str:
        return run(in_netns(self._node_netns, ["iptables-save", "-t", table]))

    def _ipvsadm(self) -> str:
        return run(in_netns(self._node_netns, ["ipvsadm", "-Ln"]))


def iptables_jumps(nat: str) -> dict[str, set[str]]:
    """``{KUBE-SVC-x: {KUBE-SEP-y, ...}}`` from an ``iptables-save -t nat``."""
    jumps: dict[str, set[str]] = {}
    for match in re.finditer(r"^-A (KUBE-SVC-\S+) .*-j (KUBE-SEP-\S+)$", nat, re.MULTILINE):
        jumps.setdefault(match.group(1), set()).add(match.group(2))
    return jumps


def ipvs_real_servers(listing: str) -> dict[str, set[str]]:
    """``{"VIP:port": {"ip:port", ...}}`` from ``ipvsadm -Ln``: the real servers with a weight
    above 0 (kube-proxy first sets a removed endpoint's weight to 0, and deletes it once its
    connections are gone)."""
    servers: dict[str, set[str]] = {}
    current: set[str] | None = None
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] in ("TCP", "UDP", "SCTP"):
            current = servers.setdefault(fields[1], set())
        elif current is not None and len(fields) >= 3 and fields[0] == "->" \
                and fields[1][0].isdigit() and int(fields[3]) > 0:
            current.add(fields[1])
    return servers


def _api_client(control: ControlPlane) -> object:
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = API_URL
    cfg.ssl_ca_cert = str(control.ca_file)
    cfg.api_key = {"authorization": f"Bearer {control.token}"}
    return client.ApiClient(cfg)
