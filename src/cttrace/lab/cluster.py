"""The lab's small cluster: the workloads, pods and Services it pretends Kubernetes has.

These records are the single source for both faces of the lab: the kernel side
(namespaces, veths, kube-proxy rules) and the identity side (the watch events
an API server would send). Keeping one record per object makes the two agree,
except where a scenario deliberately lets them drift apart (kubelet lag).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cttrace.addr import is_ipv6
from cttrace.identity.model import PodRef, ServiceRef

if TYPE_CHECKING:
    from cttrace.lab.processes import PodServer


@dataclass(frozen=True, slots=True)
class Workload:
    """A Deployment's pod template, as far as the lab needs one.

    Pods are named like the ReplicaSet controller names them:
    ``<deployment>-<pod-template-hash>-<5 random chars>``.
    """

    namespace: str
    app: str  # Deployment name and value of the `app` label
    template_hash: str  # pod-template-hash label; the ReplicaSet is "<app>-<hash>"
    image: str
    container_port: int = 8080

    @property
    def replicaset(self) -> str:
        return f"{self.app}-{self.template_hash}"

    def pod_name(self, suffix: str) -> str:
        return f"{self.replicaset}-{suffix}"


@dataclass(slots=True, eq=False)
class LabPod:
    workload: Workload
    name: str
    uid: str
    replicaset_uid: str
    ip: str
    node_name: str
    host_ip: str
    netns: str
    slot: int  # numbers this pod's veth ends (naming.LabNames.pod_link_*)
    created_at: float
    server: PodServer | None = None
    other_ips: tuple[str, ...] = ()  # dual-stack: the address of the other family

    @property
    def ips(self) -> tuple[str, ...]:
        """status.podIPs: one per family, IPv4 first; ``ip`` is the one traffic uses."""
        return _api_order(self.ip, self.other_ips)

    @property
    def namespace(self) -> str:
        return self.workload.namespace

    @property
    def port(self) -> int:
        return self.workload.container_port

    @property
    def ref(self) -> PodRef:
        return PodRef(
            uid=self.uid,
            namespace=self.namespace,
            name=self.name,
            workload=f"ReplicaSet/{self.workload.replicaset}",
            node=self.node_name,
        )

    @property
    def identity_line(self) -> str:
        """What the pod's server answers first on every connection."""
        return f"pod={self.namespace}/{self.name} uid={self.uid} ip={self.ip}"


@dataclass(slots=True, eq=False)
class LabService:
    """A ClusterIP Service with one TCP port and its one EndpointSlice."""

    namespace: str
    name: str
    uid: str
    vip: str
    port: int
    target_port: int
    port_name: str
    app: str  # selector: app=<app>
    slice_name: str
    slice_uid: str
    created_at: float
    endpoints: list[LabPod] = field(default_factory=list)
    slice_generation: int = 1
    other_vips: tuple[str, ...] = ()  # dual-stack: the VIP of the other family

    @property
    def vips(self) -> tuple[str, ...]:
        """spec.clusterIPs: one per family, IPv4 first; ``vip`` is the one traffic uses."""
        return _api_order(self.vip, self.other_vips)

    @property
    def ref(self) -> ServiceRef:
        return ServiceRef(namespace=self.namespace, name=self.name, uid=self.uid)

    @property
    def port_key(self) -> str:
        """kube-proxy's ServicePortName text: ``namespace/name:port-name``."""
        return f"{self.namespace}/{self.name}:{self.port_name}"


def _api_order(ip: str, others: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted((ip, *others), key=is_ipv6))
