"""The lab's addresses for each IP family, and what differs between the families' tools.

A lab node is IPv4, IPv6 or dual-stack (``--family 4|6|dual``). Everything
that depends on the family (the node's and fabric's addresses, the pod
networks, the Service VIPs, the iptables binary, the REJECT type, how an
address is added) is looked up in one :class:`AddressPlan`, so the node's
plumbing and kube-proxy's rules are written once for both.

IPv6 addresses mirror the IPv4 ones so a person can tell them apart at a
glance: pod 10.0.1.10 is fd00:10:1::a, Service 10.100.37.12 is fd00:100::37:12.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum

from cttrace.addr import canonical, is_ipv6
from cttrace.errors import UserError


class Family(StrEnum):
    """``--family``: the node's IP families (dual: both, traffic over IPv6)."""

    V4 = "4"
    V6 = "6"
    DUAL = "dual"

    @classmethod
    def parse(cls, text: str) -> Family:
        try:
            return cls(text)
        except ValueError:
            raise UserError(f"unknown IP family {text!r}: use one of "
                            f"{', '.join(f.value for f in cls)}") from None


@dataclass(frozen=True, slots=True)
class AddressPlan:
    """One IP family's addresses in the lab, and the commands that differ per family."""

    version: int  # 4 or 6
    host_ip: str  # the node's address on the fabric link (a pod's status.hostIP)
    fabric_ip: str  # the fabric's address, the node's default gateway
    link_prefix: int  # prefix length of the fabric link and of the bridge's pod network
    routed_pod_net: str  # routed layout: pods take single addresses (/32, /128) from here
    routed_gateway: str  # routed layout: the pods' gateway, answered for by the node (proxy)
    bridge_pod_net: str  # bridge layout: pods' network, with the bridge as gateway
    bridge_ip: str
    host_prefix: int  # 32 or 128: one address
    iptables: str  # the iptables binary of this family
    reject_with: str  # kube-proxy's REJECT type for a Service without endpoints
    addr_flags: str  # appended to `ip addr add`

    @property
    def iptables_restore(self) -> str:
        return f"{self.iptables}-restore"

    def pod_ip(self, net: str, host: int) -> str:
        """Host number ``host`` of pod network ``net`` (10 -> 10.0.1.10, fd00:10:1::a)."""
        return f"{net}{host:x}" if self.version == 6 else f"{net}{host}"

    def vip(self, ipv4_vip: str) -> str:
        """The Service VIP of this family for the scenario's IPv4 VIP (10.100.37.12 ->
        fd00:100::37:12: the last two octets, written as they read, in a /108 like a
        cluster's IPv6 service-cluster-ip-range)."""
        if self.version == 4:
            return ipv4_vip
        octets = str(ipaddress.IPv4Address(ipv4_vip)).split(".")
        return canonical(f"fd00:100::{octets[2]}:{octets[3]}")


IPV4 = AddressPlan(
    version=4, host_ip="10.0.0.10", fabric_ip="10.0.0.1", link_prefix=24,
    routed_pod_net="10.0.1.", routed_gateway="169.254.1.1",
    bridge_pod_net="10.0.2.", bridge_ip="10.0.2.1", host_prefix=32,
    iptables="iptables", reject_with="icmp-port-unreachable", addr_flags="",
)

#: The routed gateway is link-local, as Calico's is (fe80::1 rather than its MAC-derived
#: one); the node answers for it with proxy NDP. ``nodad``: the addresses are usable at once
#: instead of "tentative" for the ~1 s of duplicate address detection.
IPV6 = AddressPlan(
    version=6, host_ip="fd00:10::10", fabric_ip="fd00:10::1", link_prefix=64,
    routed_pod_net="fd00:10:1::", routed_gateway="fe80::1",
    bridge_pod_net="fd00:10:2::", bridge_ip="fd00:10:2::1", host_prefix=128,
    iptables="ip6tables", reject_with="icmp6-port-unreachable", addr_flags=" nodad",
)


def plans_for(family: Family) -> tuple[AddressPlan, ...]:
    """The families a node of ``family`` has, in the order the API lists them (podIPs,
    clusterIPs): IPv4 first on a dual-stack node, as kubeadm and EKS set it up."""
    return {Family.V4: (IPV4,), Family.V6: (IPV6,), Family.DUAL: (IPV4, IPV6)}[family]


def traffic_plan(family: Family) -> AddressPlan:
    """The family a scenario's connections use. Dual-stack: IPv6, the pod's and the
    Service's *second* address, which is what a dual-stack node adds to what an IPv4
    node already shows."""
    return IPV4 if family is Family.V4 else IPV6


def address_in(addresses: tuple[str, ...], version: int) -> str | None:
    """The first of ``addresses`` of IP version ``version``, if any."""
    return next((a for a in addresses if is_ipv6(a) == (version == 6)), None)
