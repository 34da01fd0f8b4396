"""Who writes the lab's Service rules: cttrace's own kube-proxy imitations, or the real one.

A :class:`ServiceProxy` turns the lab's Services and endpoints into rules in the
node namespace. ``sync`` returns only once the rules match, so a scenario's next
packet always meets the rules it expects, whoever wrote them:

``iptables``         cttrace writes kube-proxy's iptables-mode chains itself
                     (:mod:`cttrace.lab.kubeproxy`), one iptables-restore (and
                     ip6tables-restore) per sync.
``nftables``         cttrace writes the shapes of kube-proxy's nftables proxier
                     (:mod:`cttrace.lab.kubeproxy_nft`), one nft transaction per family
                     (``table ip`` / ``table ip6 kube-proxy``) per sync.
``kube-proxy``       the real kube-proxy (iptables mode) against a real kube-apiserver
                     (:mod:`cttrace.lab.real_kubeproxy`); IPv4 nodes only.
``kube-proxy-ipvs``  the same, in IPVS mode (needs the ip_vs modules, ipset, ipvsadm).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from cttrace.lab import kubeproxy, kubeproxy_nft
from cttrace.lab.addressing import AddressPlan, Family
from cttrace.lab.cluster import LabService
from cttrace.lab.preconditions import LabError, require_tools

if TYPE_CHECKING:
    from cttrace.lab.node import Lab

#: The --proxy choices, the lab's own first, each with what `cttrace lab list` says of it.
PROXY_SUMMARIES = {
    "iptables": "cttrace writes kube-proxy's iptables-mode chains (iptables-restore)",
    "nftables": "cttrace writes the shapes of kube-proxy's nftables mode (1.29+; nft)",
    "kube-proxy": "the real kube-proxy 1.20, iptables mode, against a real kube-apiserver "
                  "(IPv4 node only)",
    "kube-proxy-ipvs": "the real kube-proxy 1.20, IPVS mode (ip_vs modules, ipvsadm, ipset; "
                       "IPv4 node only)",
}
PROXIES = tuple(PROXY_SUMMARIES)
DEFAULT_PROXY = "iptables"


class ServiceProxy(Protocol):
    name: str  # one of PROXIES

    @property
    def description(self) -> str:
        """Who wrote the rules, for the narration and the result (``kube-proxy v1.20.2 ...``)."""
        ...

    def start(self, lab: Lab) -> None:
        """Called once the node namespace exists, before the first ``sync``."""
        ...

    def sync(self, services: Sequence[LabService]) -> None:
        """Make the node's rules match ``services``; return once they do."""
        ...

    def stop(self) -> None:
        """Stop whatever ``start`` started (the lab deletes the namespaces afterwards)."""
        ...


class LabRules:
    """cttrace writes the rules itself. Like kube-proxy, one proxier per IP family of the
    node: each sync renders every Service's addresses of that family and replaces the
    family's tables in one transaction, as kube-proxy's full syncs do."""

    def __init__(self, name: str, description: str, render: Callable[..., str],
                 apply: Callable[[str, str, AddressPlan], None], tools: dict[str, str]) -> None:
        self.name = name
        self.description = description
        self._render = render  # (services, *, tag, plan) -> the rules text
        self._apply = apply  # (netns, rules, plan)
        self._tools = tools
        self._netns = ""
        self._tag = ""
        self._plans: tuple[AddressPlan, ...] = ()

    def start(self, lab: Lab) -> None:
        require_tools(self._tools)
        self._netns, self._tag, self._plans = lab.node_netns, lab.names.tag, lab.plans

    def sync(self, services: Sequence[LabService]) -> None:
        for plan in self._plans:
            self._apply(self._netns, self._render(services, tag=self._tag, plan=plan), plan)

    def stop(self) -> None:
        pass  # the rules go with the node namespace


#: The real kube-proxy runs single-stack IPv4 here: 1.20's dual-stack is an alpha feature
#: gate, and the lab's control plane serves an IPv4 Service range only.
REAL_KUBE_PROXIES = ("kube-proxy", "kube-proxy-ipvs")


def make_proxy(name: str, family: Family | str = Family.V4) -> ServiceProxy:
    """The proxy called ``name`` (one of :data:`PROXIES`) for a node of IP ``family``, not
    started yet; a combination the proxy cannot run is refused here, before anything exists."""
    if name not in PROXIES:
        raise LabError(f"unknown proxy {name!r}: use one of {', '.join(PROXIES)}")
    if name in REAL_KUBE_PROXIES and Family.parse(family) is not Family.V4:
        raise LabError(f"--proxy {name} runs on an IPv4 node only (the kube-proxy 1.20 built "
                       "here is single-stack IPv4): use --family 4, or --proxy iptables or "
                       "nftables for IPv6 and dual-stack")
    if name == "iptables":
        return LabRules(name, "cttrace's imitation of kube-proxy's iptables mode "
                        "(iptables-restore, ip6tables-restore)", kubeproxy.render_rules,
                        kubeproxy.apply_rules, {})
    if name == "nftables":
        return LabRules(name, "cttrace's imitation of kube-proxy's nftables mode "
                        "(nft, table ip/ip6 kube-proxy)", kubeproxy_nft.render_rules,
                        kubeproxy_nft.apply_rules, {"nft": "nftables"})
    from cttrace.lab.real_kubeproxy import RealKubeProxy  # loads the Kubernetes client

    return RealKubeProxy("ipvs" if name == "kube-proxy-ipvs" else "iptables")
