"""kube-proxy's nftables mode, reduced to what the scenarios need, applied in the node netns.

kube-proxy has an nftables proxier only from Kubernetes 1.29 (pkg/proxy/nftables),
newer than the Kubernetes the lab can build, so the lab writes rules of the same
shapes itself::

    table ip kube-proxy
      nat-prerouting / nat-output (type nat, priority dstnat) -> services
      services:  ip daddr . meta l4proto . th dport vmap @service-ips
      @service-ips:  VIP . tcp . port : goto service-<hash>-ns/name/tcp/port
      service-<hash>-...:  numgen random mod N vmap { 0 : goto endpoint-<hash>-..., ... }
      endpoint-<hash>-...__ip/port:  meta l4proto tcp dnat to ip:port
      filter-input/forward/output: ct state new -> service-endpoints-check
      service-endpoints-check:  ... vmap @no-endpoint-services
      @no-endpoint-services:  VIP . tcp . port : goto reject-chain

and on an IPv6 node the same in ``table ip6 kube-proxy`` (``ip6 daddr``,
``ipv6_addr``); a dual-stack node has both tables, as kube-proxy runs one
proxier per family.

Chain names use the proxier's own scheme (8 base32 characters of the sha256 of
the name, then the name). The DNAT is netfilter's nf_nat, as in iptables mode,
so the conntrack entries carry the same NAT status bits. Like kube-proxy, a sync
replaces a family's whole table in one ``nft -f`` transaction; nothing outside the
``kube-proxy`` tables of the lab's node namespace is touched.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

from cttrace import addr
from cttrace.lab.addressing import IPV4, AddressPlan, address_in
from cttrace.lab.cluster import LabService
from cttrace.lab.plumbing import in_netns, run

TABLE = "kube-proxy"


def _hash_and_name(name: str) -> str:
    # proxier.go hashAndTruncate: base32(sha256(name))[:8] + "-" + name (names here are short).
    return base64.b32encode(hashlib.sha256(name.encode()).digest()).decode()[:8] + "-" + name


def _port_name(svc: LabService) -> str:
    return f"{svc.namespace}/{svc.name}/tcp/{svc.port_name}"


def service_chain(svc: LabService) -> str:
    """``service-<hash>-ns/name/tcp/port``, as the nftables proxier names a Service's chain."""
    return "service-" + _hash_and_name(_port_name(svc))


def endpoint_chain(svc: LabService, ip: str, port: int) -> str:
    """``endpoint-<hash>-ns/name/tcp/port__ip/port`` of one endpoint (an IPv6 address with
    its colons as dots: a colon cannot stand in an unquoted nft chain name)."""
    return "endpoint-" + _hash_and_name(f"{_port_name(svc)}__{ip.replace(':', '.')}/{port}")


def render_rules(services: Sequence[LabService], *, tag: str, plan: AddressPlan = IPV4) -> str:
    """The ``nft -f`` input that (re)creates ``plan``'s family's ``kube-proxy`` table
    (``table ip``, ``table ip6``) for the Services' addresses of that family.

    As in iptables mode, kube-proxy runs one nftables proxier per family, each with its
    own table; an endpoint without an address of the family is not in that table."""
    fam, daddr = _FAMILY[plan.version]
    key_type = f"ipv{plan.version}_addr . inet_proto . inet_service : verdict"
    head = f"{fam} {TABLE}"
    lines = [
        # Create-then-delete makes the delete valid on the first sync too; the whole
        # file is one transaction, so no packet sees a half-written table.
        f"add table {head}",
        f"delete table {head}",
        f'add table {head} {{ comment "rules for kube-proxy ({tag})" ; }}',
        f"add set {head} cluster-ips {{ type ipv{plan.version}_addr ;"
        ' comment "Active ClusterIPs" ; }',
        f"add map {head} service-ips {{ type {key_type} ;"
        ' comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }',
        f"add map {head} no-endpoint-services {{ type {key_type} ;"
        ' comment "vmap to drop or reject packets to services with no endpoints" ; }',
        f"add chain {head} nat-prerouting {{ type nat hook prerouting priority -100 ; }}",
        f"add chain {head} nat-output {{ type nat hook output priority -100 ; }}",
        f"add chain {head} services",
        f"add chain {head} service-endpoints-check",
        f'add chain {head} reject-chain {{ comment "helper for @no-endpoint-services" ; }}',
        f"add rule {head} nat-prerouting jump services",
        f"add rule {head} nat-output jump services",
        f"add rule {head} services {daddr} . meta l4proto . th dport vmap @service-ips",
        f"add rule {head} service-endpoints-check"
        f" {daddr} . meta l4proto . th dport vmap @no-endpoint-services",
        # In an ip6 table, `reject` answers with ICMPv6 port unreachable.
        f"add rule {head} reject-chain reject",
    ]
    for hook in ("input", "forward", "output"):
        lines += [
            f"add chain {head} filter-{hook} {{ type filter hook {hook} priority 0 ; }}",
            f"add rule {head} filter-{hook} ct state new jump service-endpoints-check",
        ]
    for svc in services:
        vip = address_in(svc.vips, plan.version)
        if vip is None:
            continue
        key = f"{vip} . tcp . {svc.port}"
        lines.append(f"add element {head} cluster-ips {{ {vip} }}")
        endpoints = [(ip, svc.target_port) for pod in svc.endpoints
                     if (ip := address_in(pod.ips, plan.version))]
        if not endpoints:
            lines.append(f'add element {head} no-endpoint-services {{ {key} comment'
                         f' "{svc.port_key}" : goto reject-chain }}')
            continue
        chain = service_chain(svc)
        targets = [endpoint_chain(svc, ip, port) for ip, port in endpoints]
        # numgen random mod N picks 0..N-1 uniformly: one draw per new connection.
        picks = " , ".join(f"{i} : goto {target}" for i, target in enumerate(targets))
        # The endpoint chains first: a verdict map may only name chains that exist.
        for (ip, port), target in zip(endpoints, targets, strict=True):
            lines += [f"add chain {head} {target}",
                      f"add rule {head} {target} meta l4proto tcp dnat to "
                      f"{addr.endpoint(ip, port)}"]
        lines += [f"add chain {head} {chain}",
                  f"add rule {head} {chain} numgen random mod {len(targets)}"
                  f" vmap {{ {picks} }}"]
        lines.append(f"add element {head} service-ips {{ {key} : goto {chain} }}")
    return "\n".join(lines) + "\n"


#: The nft table family and destination-address expression of each IP version.
_FAMILY = {4: ("ip", "ip daddr"), 6: ("ip6", "ip6 daddr")}


def apply_rules(netns: str, rules: str, plan: AddressPlan = IPV4) -> None:
    """Replace a ``kube-proxy`` table of ``netns`` with ``rules`` (which name the table's
    family, ``plan``'s) in one transaction."""
    del plan  # the rules text names its table family itself
    run(in_netns(netns, ["nft", "-f", "-"]), stdin=rules)
